"""brian2pet: pypet's Brian2 network framework, in one module written to be read.

A Brian2 model that has grown many parts, and must be explored over parameters, is split here into
*components* that build Brian2 objects, *analysers* that record and evaluate, one *runner* that
simulates, and a *manager* that ties them to a pypet ``Environment``. Parameters and results keep
their Brian2 units and are stored in HDF5 by pypet.

References (section numbers below point into the first one):
  - "Using BRIAN2 with pypet", chapter 7 of the pypet documentation, and its three figures:
    the manager and its parts (7.2), the main script (7.3), one simulation run (7.5).
  - pypet.brian2 (``parameter.py``, ``network.py``), whose storage layout this module shares,
    so that files written by either load with the other's classes.
  - Brian2's ``Network`` (store / restore / add / remove) and its monitors.

Reading order follows the spec:
  1. Units as text          get_unit_fast, unit_from_expression
  2. Containers             Brian2Parameter, Brian2Result, Brian2MonitorResult        (7.1)
  3. Components             NetworkComponent, NetworkAnalyser                         (7.4, 7.4.1)
  4. The runner             NetworkRunner and its _execute_network_run                (7.4.2, 7.5)
  5. The manager            NetworkManager                                            (7.2, 7.3)

Beyond the spec (a reader of sections 1-5 needs nothing from here; section 5 calls into 6, 7.3
and 7.7 at one place each, said where):
  6. Random state           every run from the same random numbers: Brian2's random state kept as
                            numbers, which Brian2 2.9's cython target does not do itself
  7. Long explorations      what an exploration needs to run for hours and to share its files:
                            stopping cleanly (stop_cleanly_on_signals); storage that a kill at any
                            moment cannot ruin (CheckpointedHDF5StorageService, prepare_resume);
                            pickled copies of a manager (SCOOP, resume); forked workers that die
                            with the sweep (ForkingEnvironment); files from elsewhere loaded
                            without running anything (load_nodes); SCOOP's exit status
                            (run_command); many runs, each at a cost that does not grow, read
                            back as one table (runs_table)
  8. Standalone devices     compile once, sweep many: StandaloneNetworkManager runs an exploration
                            on Brian2's cpp_standalone (or a device built on it), one compiled
                            program for all runs, each run one execution with its own values

Where this module and pypet.brian2 differ, on purpose (everything else is pypet.brian2's behaviour,
checked by running pypet's own tests of pypet.brian2 against this module):
  - A run's numbers depend neither on how the exploration is spread over processes nor on the runs a
    process simulated before. Every run starts from the same start (the state after pre_build or
    the pre-run, and one random state) and then build() acts; whatever a run builds, adds or
    attaches leaves with it (section 5). pypet.brian2 gets there only with a process per run: in
    one process it fails from the second run on ("has already been simulated"), or, after a
    pre-run, continues each run's random numbers where the previous run stopped.
  - After a pre-run, the objects that components make in build() are simulated. pypet.brian2
    silently leaves them out of the pre-run network.
  - pre_run_network calls the manager's pre_build as the spec says (an override runs), and after
    an explicit pre_build pre-runs what it built; pypet.brian2 builds and simulates everything
    twice then.
  - Networks run with an empty run namespace: a name that no namespace= defines is Brian2's error
    naming it, never a value Brian2 would find in the runner's own frame.
  - Unit text read back from a file is parsed from a small whitelist, never evaluated: a file may
    come from anyone.
  - Errors name the culprit where pypet.brian2 goes on silently or fails far away: a brian_list
    item that is not a Brian2 object names its component, an error in a subrun's step names the
    part that raised it, a subrun group without durations is an error, explored values of other
    dimensions or shapes are named.
"""

import ast
import operator

import numpy as np
from brian2 import (
    EventMonitor,
    Network,
    PopulationRateMonitor,
    SpikeMonitor,
    StateMonitor,
    get_device,
    second,
)
from brian2.core.base import BrianObject
from brian2.units import allunits, stdunits
from brian2.units.fundamentalunits import (
    DIMENSIONLESS,
    Quantity,
    get_dimensions,
    have_same_dimensions,
)
from pypet import pypetconstants
from pypet.parameter import ObjectTable, Parameter, Result
from pypet.pypetexceptions import ParameterLockedException
from pypet.pypetlogging import HasLogger

__all__ = [
    "Brian2Parameter",
    "Brian2Result",
    "Brian2MonitorResult",
    "get_unit_fast",
    "unit_from_expression",
    "NetworkComponent",
    "NetworkAnalyser",
    "NetworkRunner",
    "NetworkManager",
    # 7. Long explorations (beyond the spec)
    "Terminated",
    "signals_deferred",
    "stop_cleanly_on_signals",
    "CheckpointedHDF5StorageService",
    "FileDamaged",
    "restore_checkpoint",
    "remove_from_file",
    "prepare_resume",
    "finished_runs",
    "remove_resume_files",
    "ForkingEnvironment",
    "SAFE_CLASSES",
    "FileRefused",
    "pickles_refused",
    "check_file",
    "load_nodes",
    "run_command",
    "runs_table",
    # 8. Standalone devices (beyond the spec)
    "StandaloneNetworkManager",
]


# ---------------------------------------------------------------------------------------------------
# 1. Units as text
#
# HDF5 holds numbers, so a Quantity is stored as its value in SI base units plus the text of its unit,
# e.g. 0.005 and "1. * second" for 5 ms. The text is what Brian2's repr() prints for a unit quantity.
# Reading it back must not run anything a file says: a file may come from anyone, so the text is
# parsed into a syntax tree and only numbers, Brian2 unit names and plain arithmetic are accepted.
# ---------------------------------------------------------------------------------------------------

# Every name Brian2 itself knows for a unit: "second", "hertz", "siemens", ... and "ms", "mV", ...
_UNIT_NAMES = {name: getattr(allunits, name) for name in allunits.__all__}
_UNIT_NAMES.update(
    (name, value) for name, value in vars(stdunits).items() if isinstance(value, Quantity)
)

# Unit text written by Brian2 is a few dozen characters with exponents of at most 4 or so. These
# bounds only keep hostile text (a megabyte of brackets, 9 ** 9 ** 9) from eating the machine.
_MAX_UNIT_TEXT = 1000
_MAX_EXPONENT = 64

_BINARY_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                     ast.Div: operator.truediv, ast.Pow: operator.pow, ast.Mod: operator.mod}


def get_unit_fast(x):
    """The unit of ``x`` as a Quantity of value 1 (``1. * second`` for 5 ms; ``1`` if unitless)."""
    return Quantity.with_dimensions(1, get_dimensions(x))


def unit_from_expression(expr):
    """Turn unit text such as ``'1. * metre ** 2 * kilogram * second ** -3'`` back into a Quantity.

    Accepts the text or an already parsed ``ast`` node. Allowed: numbers, Brian2 unit names,
    ``+ - * / ** %`` and unary minus. Anything else raises ``ValueError`` quoting the text.
    """
    if isinstance(expr, ast.AST):
        return _evaluate_unit_node(expr, ast.unparse(expr))
    if not isinstance(expr, str):
        raise TypeError(f"unit_from_expression takes unit text, not {type(expr).__name__}: {expr!r}")
    if expr.strip() == "1":
        # A dimensionless quantity's unit prints as plain "1".
        return get_unit_fast(1)
    if len(expr) > _MAX_UNIT_TEXT:
        raise ValueError(
            f"Unit text of {len(expr)} characters is too long to be a unit "
            f"(at most {_MAX_UNIT_TEXT}): {expr[:60]!r}..."
        )
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise ValueError(f"Unit text {expr!r} is not an arithmetic expression: {error}") from None
    return _evaluate_unit_node(tree.body, expr)


def _evaluate_unit_node(node, text):
    """Walk the syntax tree of unit ``text``; any node outside the whitelist is refused."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in _UNIT_NAMES:
            raise ValueError(f"Unit text {text!r} names {node.id!r}, which is not a Brian2 unit.")
        return _UNIT_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate_unit_node(node.operand, text)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATORS:
        left = _evaluate_unit_node(node.left, text)
        right = _evaluate_unit_node(node.right, text)
        if isinstance(node.op, ast.Pow) and not (
            type(right) in (int, float) and abs(right) <= _MAX_EXPONENT
        ):
            raise ValueError(
                f"Unit text {text!r} raises to the power {right!r}; exponents must be "
                f"plain numbers of at most {_MAX_EXPONENT}."
            )
        try:
            return _BINARY_OPERATORS[type(node.op)](left, right)
        except Exception as error:  # mixed dimensions, division by zero, ...
            raise ValueError(f"Unit text {text!r} cannot be computed: {error}") from None
    raise ValueError(
        f"Unit text {text!r} contains {type(node).__name__!r}; only numbers, Brian2 unit names, "
        f"+ - * / ** % and unary minus are allowed."
    )


# ---------------------------------------------------------------------------------------------------
# 2. Containers (spec 7.1): parameters and results that keep their Brian2 units
#
# Storage layout, shared with pypet.brian2 (identifier "__brn2__"):
#   Brian2Parameter  table  data__brn2__           columns value (SI float), unit (text)
#                    table  explored_data__brn2__  column value, when the parameter is explored
#   Brian2Result     items  NAME__brn2__value      the numbers in SI base units
#                           NAME__brn2__unit       the unit text
#   Brian2MonitorResult     the same, plus the item monitor_type
# Everything that is not a Quantity is stored exactly as pypet stores it.
# ---------------------------------------------------------------------------------------------------


def _si_numbers(quantity):
    """The numbers of ``quantity`` in SI base units: a float for a scalar, else a plain array.
    They are the Quantity's own numbers (5 ms is 0.005): nothing is rounded, and a big monitor
    array is not copied."""
    numbers = np.asarray(quantity)
    return float(numbers) if numbers.shape == () else numbers


class Brian2Parameter(Parameter):
    """A pypet Parameter that also holds a Brian2 Quantity: a scalar such as ``5 * ms`` or an
    array of any shape such as ``[[6, 7, 8], [9, 10, 11]] * ms``.

    Explored values must all have the default's dimensions (a range of ms and mV is refused), and
    explored arrays one shape.
    """

    IDENTIFIER = "__brn2__"
    __slots__ = ()

    def f_supports(self, data):
        return isinstance(data, Quantity) or super().f_supports(data)

    def _values_of_same_type(self, val1, val2):
        # Two quantities are "the same type" when their dimensions agree: 5 ms and 2 second are,
        # 5 ms and 5 mV are not. A quantity and a plain number never are (unless unitless).
        if isinstance(val1, Quantity) or isinstance(val2, Quantity):
            try:
                return have_same_dimensions(val1, val2)
            except TypeError:  # the other value has no dimensions at all, e.g. a string
                return False
        return super()._values_of_same_type(val1, val2)

    def _data_sanity_checks(self, explore_iterable):
        # pypet's own check would say "not of the same type"; the dimensions say which value.
        values = list(explore_iterable)
        if isinstance(self._default, Quantity):
            for value in values:
                if not self._values_of_same_type(value, self._default):
                    raise TypeError(
                        f"Cannot explore `{self.v_full_name}` with {value!r}: it does not have the "
                        f"dimensions of the default {self._default!r}. Give every explored value "
                        f"in units of {get_unit_fast(self._default)!r}."
                    )
            # The file keeps the range as one column of equally shaped arrays; pypet.brian2 would
            # fail only when storing it.
            shapes = {np.shape(value) for value in list(self._explored_range or ()) + values}
            if len(shapes) > 1:
                raise TypeError(
                    f"Cannot explore `{self.v_full_name}` with arrays of the shapes "
                    f"{sorted(shapes)}: every explored value of one parameter needs the same shape."
                )
        return super()._data_sanity_checks(values)

    def _store(self):
        if not isinstance(self._data, Quantity):
            return super()._store()
        unit = get_unit_fast(self._data)
        table = {"value": [_si_numbers(self._data)], "unit": [repr(unit)]}
        store_dict = {"data" + self.IDENTIFIER: ObjectTable(data=table)}
        if self.f_has_range():
            # One row per run; an array parameter makes a column of arrays, one per row.
            explored = [_si_numbers(value) for value in self._explored_range]
            store_dict["explored_data" + self.IDENTIFIER] = ObjectTable(data={"value": explored})
        self._locked = True
        return store_dict

    def _load(self, load_dict):
        if self.v_locked:
            raise ParameterLockedException(f"Parameter `{self.v_full_name}` is locked!")
        if "data" + self.IDENTIFIER not in load_dict:
            # Written by pypet's plain Parameter: nothing of Brian2 in it.
            super()._load(load_dict)
        else:
            table = load_dict["data" + self.IDENTIFIER]
            dimensions = get_dimensions(unit_from_expression(str(table["unit"][0])))
            self._data = Quantity(table["value"][0], dim=dimensions)
            if "explored_data" + self.IDENTIFIER in load_dict:
                column = load_dict["explored_data" + self.IDENTIFIER]["value"]
                self._explored_range = [Quantity(value, dim=dimensions) for value in column]
                self._explored = True
        self._default = self._data
        self._locked = True


class Brian2Result(Result):
    """A pypet Result that also holds Brian2 Quantities, scalars or arrays of any shape."""

    IDENTIFIER = Brian2Parameter.IDENTIFIER
    __slots__ = ()

    def f_set_single(self, name, item):
        if self.IDENTIFIER in name:
            # The identifier marks the two stored halves of a quantity; a name holding it could not
            # be told apart from them on loading.
            raise AttributeError(
                f"Result name `{name}` contains `{self.IDENTIFIER}`, which marks Brian2 data in the "
                f"file. Choose a name without `{self.IDENTIFIER}`."
            )
        super().f_set_single(name, item)

    def _supports(self, data):
        return isinstance(data, Quantity) or super()._supports(data)

    def _store(self):
        store_dict = {}
        for name, value in self._data.items():
            if isinstance(value, Quantity):
                store_dict[name + self.IDENTIFIER + "value"] = _si_numbers(value)
                store_dict[name + self.IDENTIFIER + "unit"] = repr(get_unit_fast(value))
            else:
                store_dict[name] = value
        return store_dict

    def _store_flags(self):
        # PyTables cannot make its default compressed array (CArray) with a zero-length axis, such as
        # a StateMonitor's (neurons x 0 steps) before it ran. A plain Array can: ask pypet for one.
        flags = {}
        for name, value in self._data.items():
            if isinstance(value, np.ndarray) and value.size == 0 and value.ndim > 1:
                stored_name = name + self.IDENTIFIER + "value" if isinstance(value, Quantity) else name
                flags[stored_name] = pypetconstants.ARRAY
        return flags

    def _load(self, load_dict):
        for key, value in load_dict.items():
            if self.IDENTIFIER not in key:
                self._data[key] = value
            elif key.endswith(self.IDENTIFIER + "value"):
                name = key[: -len(self.IDENTIFIER + "value")]
                unit_key = name + self.IDENTIFIER + "unit"
                if unit_key not in load_dict:
                    raise ValueError(
                        f"Result `{self.v_full_name}` has `{key}` but no `{unit_key}` in the file, "
                        f"so the unit of `{name}` is unknown. The file is incomplete or not brian2pet's."
                    )
                dimensions = get_dimensions(unit_from_expression(str(load_dict[unit_key])))
                if dimensions is DIMENSIONLESS:
                    self._data[name] = Quantity(value)
                else:
                    self._data[name] = Quantity(value, dim=dimensions, copy=False)


def _copy_of(recorded):
    """A copy, keeping the unit: a monitor's t, i, rate, ... are views of Brian2's growing buffers,
    which a monitor that records on may reallocate under a result that only held the view."""
    return recorded[:].copy()


class Brian2MonitorResult(Brian2Result):
    """A Brian2Result that copies the data out of one Brian2 monitor (never the monitor itself).

    Pass the monitor at construction or with ``f_set``. The items it keeps are pypet.brian2's:
      SpikeMonitor           source, num_spikes, when, name, record_variables, and, once there
                             are spikes, t, i and every recorded variable
      EventMonitor           the same with num_events, plus event (the spec's "any kind of
                             monitor"; pypet.brian2 refuses an EventMonitor)
      StateMonitor           record_variables, record, when, source, name, and, once there are
                             steps, t (plain seconds, as pypet.brian2 keeps it) and the variables
      PopulationRateMonitor  source, name, and, once there are steps, t and rate
    ``source`` is ``str()`` of the recorded group, and ``v_monitor_type`` the monitor's class name.
    """

    __slots__ = ("_monitor_type",)

    def __init__(self, full_name, *args, **kwargs):
        self._monitor_type = None
        super().__init__(full_name, *args, **kwargs)

    @property
    def v_monitor_type(self):
        """Class name of the monitor the data came from, e.g. ``'SpikeMonitor'``; None before."""
        return self._monitor_type

    def f_set_single(self, name, item):
        if isinstance(item, (EventMonitor, StateMonitor, PopulationRateMonitor)):
            if self.v_stored:
                self._logger.warning(
                    f"Result `{self.v_full_name}` is already stored; the new monitor data reaches "
                    f"the file only if you store it again with overwrite."
                )
            self._extract_monitor_data(item)
        elif isinstance(item, BrianObject):
            raise TypeError(
                f"Brian2MonitorResult `{self.v_full_name}` cannot take {type(item).__name__} "
                f"`{item.name}`: it extracts SpikeMonitor, EventMonitor, StateMonitor and "
                f"PopulationRateMonitor data only. Store other objects' values in a Brian2Result."
            )
        else:
            super().f_set_single(name, item)

    def _extract_monitor_data(self, monitor):
        if self._monitor_type is not None:
            raise TypeError(
                f"Result `{self.v_full_name}` already holds the data of a {self._monitor_type}; "
                f"one result keeps one monitor. Use a new result for {type(monitor).__name__} "
                f"`{monitor.name}`."
            )
        # SpikeMonitor is a subclass of EventMonitor in Brian2, so it is asked first.
        if isinstance(monitor, SpikeMonitor):
            self._extract_event_monitor(monitor, count_name="num_spikes")
        elif isinstance(monitor, EventMonitor):
            self._extract_event_monitor(monitor, count_name="num_events")
            self.f_set(event=monitor.event)
        elif isinstance(monitor, StateMonitor):
            self._extract_state_monitor(monitor)
        else:
            self._extract_population_rate_monitor(monitor)
        self._monitor_type = type(monitor).__name__

    # What is kept, and that a monitor which recorded nothing keeps no t (nor i, variables, rate),
    # follows pypet.brian2, so that code reading results works unchanged with either module.

    def _extract_event_monitor(self, monitor, count_name):
        self.f_set(source=str(monitor.source), **{count_name: getattr(monitor, count_name)})
        self.f_set(when=monitor.when, name=monitor.name)
        if monitor.record_variables:
            # t and i among them. Brian2 keeps a set, whose order changes from process to
            # process; sorted, every process stores the same list.
            self.f_set(record_variables=sorted(monitor.record_variables))
        # A monitor made with record=False counts spikes but has no t to read.
        if monitor.record and len(monitor.t) > 0:
            self.f_set(t=_copy_of(monitor.t), i=_copy_of(monitor.i))
            for variable in sorted(set(monitor.record_variables) - {"t", "i"}):
                self.f_set(**{variable: _copy_of(getattr(monitor, variable))})

    def _extract_state_monitor(self, monitor):
        self.f_set(record_variables=monitor.record_variables, record=monitor.record)
        self.f_set(when=monitor.when, source=str(monitor.source), name=monitor.name)
        if len(monitor.t) > 0:
            self.f_set(t=np.array(monitor.t[:]))  # numbers in seconds, without the unit
            for variable in monitor.record_variables:
                # Brian2 already hands out a (neurons x steps) copy of a recorded variable.
                self.f_set(**{variable: getattr(monitor, variable)})

    def _extract_population_rate_monitor(self, monitor):
        self.f_set(source=str(monitor.source), name=monitor.name)
        if len(monitor.t) > 0:
            self.f_set(t=_copy_of(monitor.t), rate=_copy_of(monitor.rate))

    def _store(self):
        store_dict = super()._store()
        if self._monitor_type is not None:
            store_dict["monitor_type"] = self._monitor_type
        return store_dict

    def _load(self, load_dict):
        load_dict = dict(load_dict)
        self._monitor_type = load_dict.pop("monitor_type", None)
        super()._load(load_dict)


# ---------------------------------------------------------------------------------------------------
# 3. Components (spec 7.4): the building blocks a user writes
#
# Every method is a no-op, so a component implements only what it needs. Arguments:
#   traj          the pypet Trajectory, where parameters are read and results added
#   brian_list    flat list of Brian2 objects; the manager makes Network(*brian_list) from it
#   network_dict  anything components share that is not in the trajectory
#   network       the Brian2 Network being simulated
#   current_subrun / subrun_list   the Brian2Parameter about to run / those still to come (7.5)
# ---------------------------------------------------------------------------------------------------


class NetworkComponent(HasLogger):
    """A part of the network: adds its parameters and builds, adds and removes Brian2 objects."""

    def add_parameters(self, traj):
        """Add the parameters this component needs to ``traj``."""

    def pre_build(self, traj, brian_list, network_dict):
        """Build objects that stay the same for every run of the exploration (called once)."""

    def build(self, traj, brian_list, network_dict):
        """Build objects that are made anew in every run."""

    def add_to_network(self, traj, network, current_subrun, subrun_list, network_dict):
        """Add objects to ``network`` just before ``current_subrun`` runs, e.g. a monitor."""

    def remove_from_network(self, traj, network, current_subrun, subrun_list, network_dict):
        """Take objects out of ``network`` after ``current_subrun`` ran and was analysed."""


class NetworkAnalyser(NetworkComponent):
    """A component that also evaluates the network's output after every subrun (spec 7.4.1)."""

    def analyse(self, traj, network, current_subrun, subrun_list, network_dict):
        """Read monitors, compute statistics, add results to ``traj``; may edit ``subrun_list``."""


# ---------------------------------------------------------------------------------------------------
# 4. The runner (spec 7.4.2, 7.5): one run is a sequence of subruns
# ---------------------------------------------------------------------------------------------------


def _call_step(step, arguments):
    """One part's step of a subrun, e.g. ``component.add_to_network``. An error gets a note (PEP
    678, printed with the traceback) naming the part, the step and the subrun."""
    try:
        step(*arguments)
    except Exception as error:
        error.add_note(f"raised by {type(step.__self__).__name__}.{step.__name__}() in subrun "
                       f"`{arguments[2].v_name}`")
        raise


class NetworkRunner(NetworkComponent):
    """Simulates a network subrun by subrun. Subclass it to add the subruns' durations (7.4.2).

    The subruns are the Brian2Parameters in the group ``durations_group_name`` (for a pre-run,
    ``pre_durations_group_name``), run in ascending ``v_annotations.order``. ``report`` and
    ``report_period`` are passed to Brian2's ``Network.run``.
    """

    def __init__(
        self,
        report="text",
        report_period=10 * second,
        durations_group_name="simulation.durations",
        pre_durations_group_name="simulation.pre_durations",
    ):
        self._report = report
        self._report_period = 10 * second if report_period is None else report_period
        self._durations_group_name = durations_group_name
        self._pre_durations_group_name = pre_durations_group_name
        self._set_logger()

    def execute_network_pre_run(self, traj, network, network_dict, component_list, analyser_list):
        """Run the pre-run's subruns (from the pre-durations group) on ``network``."""
        self._execute_network_run(traj, network, network_dict, component_list, analyser_list, True)

    def execute_network_run(self, traj, network, network_dict, component_list, analyser_list):
        """Run one exploration run's subruns (from the durations group) on ``network``."""
        self._execute_network_run(traj, network, network_dict, component_list, analyser_list)

    def _extract_subruns(self, traj, pre_run=False):
        """The group's Brian2Parameters, sorted by ``v_annotations.order`` (gaps allowed)."""
        group_name = self._pre_durations_group_name if pre_run else self._durations_group_name
        by_order = {}
        for group in traj.f_get_all(group_name):
            if group.v_is_leaf:
                continue
            for duration in group.f_iter_leaves(with_links=False):
                if not isinstance(duration, Brian2Parameter):
                    raise TypeError(
                        f"`{duration.v_full_name}` is a {type(duration).__name__}, but every "
                        f"entry of the subrun group `{group_name}` must be a Brian2Parameter "
                        f"holding a duration, e.g. 500 * ms."
                    )
                if "order" not in duration.v_annotations:
                    raise RuntimeError(
                        f"Subrun `{duration.v_full_name}` has no order. Set its "
                        f"`v_annotations.order`; subruns run in ascending order."
                    )
                order = duration.v_annotations.order
                if order in by_order:
                    raise RuntimeError(
                        f"Subruns `{by_order[order].v_full_name}` and `{duration.v_full_name}` "
                        f"both have order {order}; give each subrun its own order."
                    )
                by_order[order] = duration
        if not by_order:
            raise RuntimeError(
                f"No subruns: the trajectory has no Brian2Parameter in `{group_name}`, so there is "
                f"nothing to simulate. Add one, e.g. traj.f_add_parameter(Brian2Parameter, "
                f"'{group_name}.run', 1 * second).v_annotations.order = 0."
            )
        return [by_order[order] for order in sorted(by_order)]

    def _execute_network_run(
        self, traj, network, network_dict, component_list, analyser_list, pre_run=False
    ):
        """Run every subrun through the four steps of spec 7.5 (figure 'network run')."""
        # subrun_list is live: an analyser may empty it (cancel the rest of this run, say on
        # pathological activity) or append to it (run longer). Hence a while loop, not a for.
        subrun_list = self._extract_subruns(traj, pre_run=pre_run)
        while subrun_list:
            current_subrun = subrun_list.pop(0)
            arguments = (traj, network, current_subrun, subrun_list, network_dict)

            # 1. add_to_network: components, then analysers, then the runner itself.
            for part in [*component_list, *analyser_list, self]:
                _call_step(part.add_to_network, arguments)

            # 2. run: simulate for the duration the current subrun holds. The run namespace is
            # empty: Brian2 would otherwise look a name that no namespace= defines up in the frame
            # calling run(), which is this one and never the user's script (a model using
            # `duration` would get this method's variable). Such a name is Brian2's error instead.
            duration = current_subrun.f_get()
            self._logger.info(f"Subrun `{current_subrun.v_name}` for {duration}")
            network.run(duration, report=self._report, report_period=self._report_period,
                        namespace={})

            # 3. analyse: every analyser, in the order the manager was given them.
            for analyser in analyser_list:
                _call_step(analyser.analyse, arguments)

            # 4. remove_from_network: the runner, then analysers, then components.
            for part in [self, *analyser_list, *component_list]:
                _call_step(part.remove_from_network, arguments)


# ---------------------------------------------------------------------------------------------------
# 5. The manager (spec 7.2, 7.3): builds networks and hands them to the runner
#
# Every run starts from the same START, then build() acts (spec 7.3: "The state after the pre run is
# preserved for all coming simulation runs"). The start is what the runs met when they began:
#   - what pre_build made, in ONE Network holding brian_list (and what the pre-run added to it), as
#     pre_build or the pre-run left it: state variables, operations attached (run_regularly),
#     namespaces, active flags. Brian2 refuses an object another Network simulated, hence one
#     Network, stored once and restored at every run's start;
#   - other objects pre_build or the pre-run made (a monitor added in some subruns), as they were;
#   - Brian2's random state of the moment the runs began (section 6 keeps it as numbers).
# Whatever a run builds, adds or attaches leaves with it; with nothing pre-built, each run gets a new
# Network of its own objects. So a run gives the same numbers in one process after other runs as in
# a process forked from the main script (spec 7.3.1), which sees the start as the script left it. A
# pickled copy of the manager (SCOOP, pypet's resume) makes the start again (section 7.3).
# ---------------------------------------------------------------------------------------------------


def _live_brian_objects():
    # Brian2's weak references to every BrianObject (Trackable.__instances__, what its magic network
    # uses; Brian2 2.9 and 2.11) find pre-built objects wherever a component keeps them.
    return {ref() for ref in BrianObject.__instances__()} - {None}


def _check_brian_list(part, method_name, brian_list):
    # At once, while we know whom to blame: Network() would fail later, far from the component.
    for item in brian_list:
        if not isinstance(item, BrianObject):
            raise TypeError(
                f"{type(part).__name__}.{method_name}() put {item!r} ({type(item).__name__}) into "
                f"brian_list. brian_list is passed to Network(*brian_list) and holds Brian2 objects "
                f"only, one by one (no nested lists); put other shared items into network_dict."
            )


def _copy_for_one_run(value):
    """A run's own copy of a network_dict value: lists, tuples, dicts, sets and arrays (nested too)
    are copied, so no later run sees what one run appended; Brian2 objects and others are shared."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if type(value) in (list, tuple, set):
        return type(value)(_copy_for_one_run(item) for item in value)
    if type(value) is dict:
        return {key: _copy_for_one_run(item) for key, item in value.items()}
    return value


class _RunStart:
    """The start of every run once something is pre-built: ``restore`` brings it back,
    ``remove_run_additions`` takes off what a run added to the network and to pre-built objects.

    Reaches into Brian2 (2.9 and 2.11) where Network.store and restore stop: ``_full_state`` and
    ``_restore_from_full_state`` for pre-built objects outside the network, and ``_network``,
    Brian2's mark that an object was simulated, with which Network.add would refuse it.
    """

    def __init__(self, network, objects_before_pre_build):
        self.network = network
        network.store("brian2pet_start")
        self.members = set(network.objects)
        self.pre_built = _live_brian_objects() - objects_before_pre_build
        in_network = set(network)  # the members and the objects they contain
        self.outside = {obj: obj._full_state() for obj in self.pre_built - in_network
                        if hasattr(obj, "_full_state")}
        self.attached = {obj: list(obj.contained_objects) for obj in self.pre_built}
        self.active = {obj: obj.active for obj in self.pre_built}
        # A run may change a namespace's entries or give an object another namespace dict.
        self.namespaces = {obj: (obj.namespace, dict(obj.namespace)) for obj in self.pre_built
                           if isinstance(getattr(obj, "namespace", None), dict)}

    def restore(self):
        self.remove_run_additions()
        for obj in self.pre_built - set(self.network.objects):
            if obj._network == self.network.id:  # simulated here by an earlier run, then taken out
                obj._network = None
        self.network.add(*(self.members - set(self.network.objects)))
        for obj, state in self.outside.items():
            obj._restore_from_full_state(state)
        self.network.restore("brian2pet_start")
        for obj, active in self.active.items():
            obj.active = active
        for obj, (namespace, entries) in self.namespaces.items():
            namespace.clear()
            namespace.update(entries)
            obj.namespace = namespace

    def remove_run_additions(self):
        self.network.remove(*(set(self.network.objects) - self.members))
        for obj, attached in self.attached.items():
            obj.contained_objects[:] = attached


class NetworkManager(HasLogger):
    """Calls components, analysers and the runner in the documented order, and owns the networks.

    ``component_list`` and ``analyser_list`` are used in the order given: a component that uses
    another's objects must come after it. ``network_constructor`` makes the network from the
    brian_list (Brian2's ``Network`` by default).
    """

    def __init__(self, network_runner, component_list, analyser_list=(), network_constructor=None):
        self.components = component_list
        self.analysers = analyser_list
        self.network_runner = network_runner
        self._network_constructor = Network if network_constructor is None else network_constructor
        self._brian_list = []  # what pre_build made, and
        self._network_dict = {}  # what it shared
        self._pre_built = False
        self._pre_run = False
        self._objects_before_pre_build = set()
        self._start = None  # a _RunStart once something is pre-built
        self._random_state = None  # Brian2's random state at the start of every run
        self._set_logger()

    def _parts_in_order(self):
        """Components, analysers, then the runner: the order of every manager step (spec 7.3)."""
        return [*self.components, *self.analysers, self.network_runner]

    def add_parameters(self, traj):
        """Let every component, analyser and the runner add its parameters to ``traj``."""
        for part in self._parts_in_order():
            part.add_parameters(traj)

    def pre_build(self, traj):
        """Build, once, what stays the same in every run (spec 7.3, optional)."""
        if self._pre_built:
            # pypet.brian2 would build every pre-built object a second time and simulate both.
            raise RuntimeError(
                "This manager is already pre-built; pre_build builds once (pre_run_network calls "
                "it when it was not called). Make a new NetworkManager for a new exploration."
            )
        _note_what_copies_redo(self, traj)  # a pickled copy redoes pre_build (section 7.3)
        self._objects_before_pre_build = _live_brian_objects()
        for part in self._parts_in_order():
            part.pre_build(traj, self._brian_list, self._network_dict)
            _check_brian_list(part, "pre_build", self._brian_list)
        self._pre_built = True
        self._take_start(self._network_constructor(*self._brian_list))

    def build(self, traj):
        """Build one run's objects; returns that run's ``(brian_list, network_dict)``, which start
        as copies of what pre_build made, so that nothing built here outlives the run."""
        brian_list = list(self._brian_list)
        network_dict = {key: _copy_for_one_run(value) for key, value in self._network_dict.items()}
        for part in self._parts_in_order():
            part.build(traj, brian_list, network_dict)
            _check_brian_list(part, "build", brian_list)
        return brian_list, network_dict

    def pre_run_network(self, traj):
        """Pre-build (unless done), then simulate the pre-durations once: the runs' start (7.3)."""
        if not self._pre_built:
            self.pre_build(traj)
        self._logger.info("Pre-running the network")
        self.network_runner.execute_network_pre_run(traj, self._start.network, self._network_dict,
                                                    self.components, self.analysers)
        self._pre_run = True
        self._take_start(self._start.network)

    def _take_start(self, network):
        """What every run starts from: ``network`` and the pre-built objects, as they are now."""
        self._start = _RunStart(network, self._objects_before_pre_build)

    def run_network(self, traj):
        """One run of the exploration: pass this to ``Environment.run`` (spec 7.3).

        Every run starts from the start above, with Brian2's random state of when the first run
        began (or pypet pickled this manager): runs draw the same numbers unless they seed
        themselves, e.g. ``brian2.seed(traj.trial)`` in a build(), with ``trial`` explored."""
        if self._copy_redoes is not None:  # a pickled copy, in a new process (section 7.3)
            _redo_in_this_process(self, traj)
        if self._random_state is None:
            self._random_state = _random_state()
        if self._start is not None:
            self._start.restore()
        _set_random_state(self._random_state)

        with _collecting_only_the_runs_garbage():  # cost per run flat (section 7.7)
            self._build_and_simulate(traj)

    def _build_and_simulate(self, traj):
        brian_list, network_dict = self.build(traj)
        if self._start is None:
            network = self._network_constructor(*brian_list)
        else:
            network = self._start.network
            network.add(*[obj for obj in brian_list if obj not in self._start.members])
        try:
            self.network_runner.execute_network_run(traj, network, network_dict,
                                                    self.components, self.analysers)
        finally:
            if self._start is not None:
                self._start.remove_run_additions()

    _copy_redoes = None  # in a pickled copy: "pre_build" or "pre_run", to redo (section 7.3)

    def __getstate__(self):
        # pypet pickles the manager (with the run function) for SCOOP's workers and to resume; a
        # copy travels without Brian2's objects, which mostly cannot be pickled (section 7.3).
        return _state_of_a_copy(self, super().__getstate__())


# ===================================================================================================
# 6. Every run from the same random numbers: Brian2's random state, kept as numbers
#
# Beyond the spec from here on: sections 1-5 are the spec's framework; 6-8 are what brian2pet adds.
# ===================================================================================================
#
# Section 5 gives every run Brian2's random state of the moment the runs began, and a pickled copy of
# the manager carries it to other processes. Brian2's get_random_state() is numpy's generator state
# plus, for the cython target, the buffers of 20,000 numbers that rand() and randn() draw from. Brian2
# 2.11 keeps a buffer's numbers in that state; Brian2 2.9 (the newest for Python 3.11) keeps only the
# buffer's ADDRESS: set back after a run that used a buffer up (Brian2 then frees it and allocates
# another), it points at freed memory, and in another process at nothing (wrong numbers, then
# "double free or corruption" or a segmentation fault). So brian2pet keeps the state as numbers: the
# numpy state, each buffer's index, and the numbers of a buffer in use (one at index 0 is refilled
# before its next draw). A Brian2 that keeps its state in yet another way (its pull request #1745
# moves the generator into C++) is refused, naming its version, rather than guessed at.
# ---------------------------------------------------------------------------------------------------

import ctypes  # noqa: E402 - each section imports what only it needs

import brian2  # noqa: E402

_RANDOM_STATE_KEYS = {"numpy_state", "rand_buffer", "rand_buffer_index", "randn_buffer",
                      "randn_buffer_index"}


def _buffers_hold(state):
    """'numbers' (Brian2 2.11) or 'address' (Brian2 2.9): what the buffers of Brian2's random
    state hold. Raises for a state brian2pet does not know."""
    buffer = np.asarray(state.get("rand_buffer")) if isinstance(state, dict) else None
    if buffer is not None and set(state) == _RANDOM_STATE_KEYS:
        if buffer.dtype == np.float64 and buffer.ndim == 1:
            return "numbers"
        if buffer.dtype == np.intp and buffer.shape == (1,):
            return "address"
    raise RuntimeError(
        f"brian2pet does not know how Brian2 {brian2.__version__} keeps its random state "
        f"(get_random_state() gives {type(state).__name__} "
        f"{sorted(state) if isinstance(state, dict) else ''}); brian2pet was tested with Brian2 2.9 and 2.11. "
        f"Runs would not start from the same random numbers: install brian2<2.12, or a brian2pet "
        f"that knows this Brian2."
    )


def _random_state():
    """Brian2's random state as numbers (see above); None on a device whose generator lives outside
    Python (the standalone devices, section 8)."""
    try:
        state = get_device().get_random_state()
    except NotImplementedError:
        return None
    holds = _buffers_hold(state)
    by_value = {"numpy_state": state["numpy_state"]}
    for name in ("rand", "randn"):
        index = int(np.asarray(state[f"{name}_buffer_index"])[0])
        numbers = None
        if index and holds == "numbers":
            numbers = np.array(state[f"{name}_buffer"])
        elif index:  # the buffer in use, read where Brian2 2.9's cython code keeps it
            numbers = np.ctypeslib.as_array(
                (ctypes.c_double * _buffer_size()).from_address(int(state[f"{name}_buffer"][0]))
            ).copy()
        by_value.update({f"{name}_buffer_index": index, f"{name}_buffer": numbers})
    return by_value


def _set_random_state(state):
    """Make ``state`` (from _random_state, maybe of another process) Brian2's random state."""
    if state is None:
        return
    device = get_device()
    brian2_state = device.get_random_state()
    if _buffers_hold(brian2_state) == "numbers":  # Brian2 2.11 takes numbers itself
        brian2_state["numpy_state"] = state["numpy_state"]
        for name in ("rand", "randn"):
            brian2_state[f"{name}_buffer_index"] = np.array([state[f"{name}_buffer_index"]],
                                                            dtype=np.int32)
            if state[f"{name}_buffer"] is not None:
                brian2_state[f"{name}_buffer"] = state[f"{name}_buffer"]
        device.set_random_state(brian2_state)
        return
    # Brian2 2.9: its set_random_state would write an address. The numbers go where the cython code
    # reads them instead, into the buffer of now.
    np.random.set_state(state["numpy_state"])
    for name in ("rand", "randn"):
        getattr(device, f"{name}_buffer_index")[:] = state[f"{name}_buffer_index"]
        numbers = state[f"{name}_buffer"]
        if numbers is None:
            continue  # index 0: the buffer is refilled from numpy before its next draw
        address = getattr(device, f"{name}_buffer")
        if address[0] == 0:  # this process never drew: give it a buffer, which Brian2 will free()
            address[0] = _malloc(numbers.nbytes)
        ctypes.memmove(int(address[0]), numbers.ctypes.data, numbers.nbytes)


def _buffer_size():
    from brian2.codegen.generators import cython_generator

    return cython_generator._BUFFER_SIZE  # 20,000 in Brian2 2.9


def _malloc(size):
    try:
        malloc = ctypes.CDLL(None).malloc
    except (OSError, AttributeError, TypeError):
        raise RuntimeError("brian2pet cannot reach the C library's malloc here, which Brian2 2.9's "
                           "cython random numbers need in a new process: use Brian2 2.11 (Python "
                           "3.12+) or the numpy target") from None
    malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    return malloc(size)


# ---------------------------------------------------------------------------------------------------
# 7. Long explorations: running for hours, and sharing the files
#
# An exploration that runs for hours on many cores meets what a short script never does: a scheduler's
# time limit (SIGTERM), Ctrl-C, the OOM killer or `kill -9` (SIGKILL, which no program can catch),
# a worker process that dies, and results files that travel to colleagues. This section gives what
# every such exploration needs, each piece usable with pypet's own Environment:
#
#   7.1 Stopping cleanly      signals_deferred, stop_cleanly_on_signals, Terminated
#   7.2 Storage a kill        CheckpointedHDF5StorageService (Environment(storage_service=...)),
#       cannot ruin           restore_checkpoint, prepare_resume, finished_runs, remove_from_file,
#                             remove_resume_files
#   7.3 Pickled copies        of a manager, which SCOOP's workers and pypet's resume run
#   7.4 Forked workers        ForkingEnvironment (pypet's Environment, multiproc without a pool)
#   7.5 Files from elsewhere  load_nodes, check_file, pickles_refused, FileRefused
#   7.6 SCOOP's exit status   run_command
#   7.7 Many runs             a run's fixed cost flat however many came before; runs_table
#
# Linux-only calls (prctl for workers, /proc for SCOOP) are used where they exist; elsewhere the
# feature is skipped with a warning that says what is missing, and everything else works.
# ---------------------------------------------------------------------------------------------------

import contextlib  # noqa: E402
import logging  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
import weakref  # noqa: E402

from pypet import Environment, Trajectory  # noqa: E402
from pypet.storageservice import HDF5StorageService  # noqa: E402

_log = logging.getLogger("brian2pet")
_warned = set()


def _warn_once(key, message):
    """Log ``message`` as a warning once per process (a feature this platform lacks, say)."""
    if key not in _warned:
        _warned.add(key)
        _log.warning(message)


def _first_line(error):
    """'ErrorType: first line of its message', for errors that must fit on one line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


# ---------------------------------------------------------------------------------------------------
# 7.1 Stopping cleanly
#
# Ctrl-C (SIGINT) and SIGTERM may come at any moment. Two moments matter:
#   - inside a write to the HDF5 file, which a stop must never cut: signals_deferred holds both
#     signals back until the write is done (CheckpointedHDF5StorageService writes inside it);
#   - inside a run: the run must not be stored as finished. An exception in a run keeps pypet from
#     storing it, so stop_cleanly_on_signals makes both signals raise one, wherever they land:
#     KeyboardInterrupt for SIGINT, Terminated for SIGTERM; `finally` clauses run (workers are
#     stopped, files closed) instead of the process vanishing. Without it, Brian2 takes a Ctrl-C
#     during Network.run as a request to end the subrun early, which the analysers would then take
#     for a whole one; and a process that inherited an ignored SIGINT (a background job of a script)
#     would meet Brian2's handler calling SIG_IGN. Where Python cannot let a stop through (a handler
#     that ran inside a finalizer), the next store raises it instead.
# ---------------------------------------------------------------------------------------------------

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(BaseException):
    """SIGTERM arrived inside stop_cleanly_on_signals. A BaseException, as KeyboardInterrupt is, so
    that no ``except Exception`` of a model takes it for an error and carries on."""


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM back inside the block; deliver them, once each, when it ends.

    The handler that was in place before then runs as usual (raises KeyboardInterrupt, Terminated,
    or ends the process for SIGTERM's default). Python runs signal handlers in the main thread only,
    so in other threads the block changes nothing; nor for a signal whose handler was set outside
    Python, which could not be put back.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = {}
    for signum in _STOP_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is not None:
            previous[signum] = handler
            signal.signal(signum, lambda number, frame: held.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


def _raise_terminated(signum, frame):
    raise Terminated("SIGTERM")


# Stops that a signal handler raised where Python cannot let an exception through (see
# _note_swallowed_stops); _raise_swallowed_stop raises them where it can.
_swallowed_stops = []


def _note_swallowed_stops(previous_hook):
    """A sys.unraisablehook for stop_cleanly_on_signals.

    A signal handler runs wherever the main thread happens to be, also inside a ``__del__`` or a
    weakref callback (Brian2 runs one whenever one of its objects dies). An exception raised there
    cannot propagate: Python hands it to sys.unraisablehook, prints "Exception ignored in ...", and
    carries on, so the run would go on to be stored as finished. This hook keeps such a stop instead
    (making the signal pending again does not help: its handler would run inside this very hook), and
    the storage service raises it before its next store. Other exceptions go to the previous hook.
    """
    def hook(unraisable):
        if isinstance(unraisable.exc_value, (Terminated, KeyboardInterrupt)):
            _swallowed_stops.append(unraisable.exc_value)
        else:
            previous_hook(unraisable)
    return hook


def _raise_swallowed_stop():
    """Raise the first stop (Terminated or KeyboardInterrupt) that arrived inside
    stop_cleanly_on_signals where Python could not raise it, if there was one. The storage service
    calls it before every store, so that the run such a stop interrupted is never stored."""
    if _swallowed_stops:
        stop = _swallowed_stops[0]
        _swallowed_stops.clear()
        raise type(stop)(*stop.args)


def _not_a_stop(record):
    """Logging filter: False for pypet's report of a run that a stop ended, which is no error."""
    return not (record.exc_info and isinstance(record.exc_info[1], (KeyboardInterrupt, Terminated)))


@contextlib.contextmanager
def stop_cleanly_on_signals():
    """Inside the block Ctrl-C (SIGINT) raises KeyboardInterrupt and SIGTERM raises Terminated in
    the main thread, wherever they land, also inside Network.run; pypet does not log either as a
    failed run (it logs every exception of a run with its traceback). Call it in the main thread,
    around ``env.run`` or ``env.resume``.

    With CheckpointedHDF5StorageService, which holds both signals back while it writes: a stop never
    cuts a write, and the run it interrupts is never stored as finished.
    """
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated)}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _note_swallowed_stops(previous_hook)
    _swallowed_stops.clear()
    pypet_logger = logging.getLogger("pypet")
    pypet_logger.addFilter(_not_a_stop)
    try:
        yield
        _raise_swallowed_stop()  # a stop swallowed after the last store still ends the block
    finally:
        pypet_logger.removeFilter(_not_a_stop)
        sys.unraisablehook = previous_hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        # A stop raised inside Network.run leaves Brian2's flag that a network runs (Brian2 2.9 and
        # 2.11), with which Brian2's own Ctrl-C handler would take the next Ctrl-C for a stop.
        Network._globally_running = False


# ---------------------------------------------------------------------------------------------------
# 7.2 Storage that a kill cannot ruin, at a cost that does not grow with the file
#
# HDF5 has no journal: a process killed inside a write can leave the file unreadable, and with it
# every run stored before. Copying the whole file before every write would protect it, but the copy
# grows with the file until a long exploration spends its time copying. Instead the file is copied
# now and then, at checkpoints, and a marker file says when a write is under way:
#
#   FILE.checkpoint   a complete copy of FILE as it was between two writes
#   FILE.writing      exists from the start to the end of a write: FILE may be half written
#
# After a kill, FILE is intact unless FILE.writing exists; then FILE goes back to the checkpoint, and
# the runs stored after the checkpoint run again. prepare_resume does that, and brings pypet's resume
# files in step with the file, before pypet's Environment.resume.
#
# The other cost that grows is pypet's layout: every run's results in a group of their own,
# results.runs.run_00000042, all side by side. Every store opens the file, and PyTables, opening
# results.runs, first lists all its children: a run cost 3 times more after 2,000 runs than at the
# start, and ever more after. pypet's own remedy is its '$set' wildcard (results.runs.$set.$): sets
# of 1,000 runs, results.runs.run_set_00000.run_00000042, for those who name their results so.
# This service stores every run that way, whatever names the run gave: a group named after a run
# (pypet's results.runs.run_00000042, or wherever a name held '$') goes into its set group in the
# file, unless it is in one already, or the file holds it outside one (a file that pypet.brian2
# began goes on as it began). The file then has exactly the layout of pypet's '$set', which pypet's
# load_trajectory loads as it is (the loaded trajectory names the run's group
# results.runs.run_set_00000.run_00000042, which pypet's shortcuts such as
# traj.f_get('results.runs.run_00000042.x') and f_get_from_runs find; runs_table, section 7.7,
# reads either layout). The trajectory in memory keeps the names pypet gave it.
# ---------------------------------------------------------------------------------------------------

from pypet.trajectory import make_set_name  # noqa: E402


def _checkpoint_of(filename):
    return filename + ".checkpoint"


def _marker_of(filename):
    return filename + ".writing"


def _copy_then_rename(source, target):
    """Make ``target`` a copy of ``source`` (an empty file if ``source`` is None): under its final
    name only once complete, and on disk (fsync), so that it is either the old one or the new one."""
    partial = target + ".partial"
    if source is None:
        open(partial, "wb").close()
    else:
        shutil.copyfile(source, partial)
    with open(partial, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, target)


class FileDamaged(RuntimeError):
    """An HDF5 file that cannot be repaired; the message is one line naming it and what to do."""


class CheckpointedHDF5StorageService(HDF5StorageService):
    """pypet's HDF5 storage service, under which a kill at any moment, also inside a write, loses no
    finished run after a resume; at a cost per store that does not grow with the file.

    Use it as pypet's: ``Environment(..., storage_service=CheckpointedHDF5StorageService)``. Made for
    one writing process: the main process of an exploration (pypet's wrap_mode='LOCAL', SCOOP, or one
    core). Before a kill's resume call prepare_resume (with pypet's resume files) or
    restore_checkpoint (without).

    Every store:
      - holds Ctrl-C and SIGTERM back until it is done (signals_deferred);
      - refuses to write to a file whose last write a kill cut short (repair it first);
      - first copies the file to FILE.checkpoint if a checkpoint is due: at this service's first
        store (so that going back never crosses an earlier exploration's end), if the checkpoint is
        missing, and when copying has taken less than ``checkpoint_share`` of the time since the
        last one, i.e. every (time of the last copy / checkpoint_share) seconds or less often;
      - creates FILE.writing for the time of the write.
    pypet's Environment calls ``finalize`` after its last store; the checkpoint is then removed.
    A run's results go into pypet's run sets, results.runs.run_set_00000.run_00000042 (see the
    comment above), so that what a store costs does not grow with the runs stored before it.
    With pypet's resume files (resumable=True) pass delete_resume=False, and remove them with
    remove_resume_files once every run completed: pypet's own deletion comes before its final
    stores, and a kill in those would leave nothing to resume.

    What it costs:
      - time: about ``checkpoint_share`` (5 %) of the time, whatever the size of the file, plus a
        few file operations per store (the marker, the signal handlers);
      - disk: one more copy of the file while the exploration runs;
      - after a kill outside a write: nothing. After a kill inside a write: the runs stored since
        the last checkpoint, which run again. At most (last copy time / checkpoint_share) seconds of
        stored runs: e.g. a 1 GB file that copies in 1 s is copied at most every 20 s, so a kill
        inside a write costs the runs stored in the last 20 s or less. A larger checkpoint_share
        copies more often and loses less; set it on the class or on the instance
        (``traj.v_storage_service.checkpoint_share = 0.2``).
    It protects against the process being killed; a machine losing power may also lose what the
    operating system had not yet written to disk.
    """

    checkpoint_share = 0.05

    def store(self, msg, stuff_to_store, *args, **kwargs):
        _raise_swallowed_stop()
        if getattr(self, "_in_store", False) or self.is_open:
            # A store within a store (pypet stores a list item by item), or the file kept open from
            # an earlier store: that store's marker still covers the file.
            return super().store(msg, stuff_to_store, *args, **kwargs)
        filename = os.path.abspath(kwargs.get("filename") or self.filename)
        self._in_store = True
        try:
            with signals_deferred():
                _refuse_if_cut_short(filename)
                self._checkpoint_if_due(filename)
                open(_marker_of(filename), "wb").close()
                try:
                    return super().store(msg, stuff_to_store, *args, **kwargs)
                finally:
                    # An error inside pypet's store leaves the HDF5 library's state whole; only a
                    # killed process leaves the marker behind. A file kept open keeps it too.
                    if not self.is_open:
                        os.remove(_marker_of(filename))
        finally:
            self._in_store = False

    @property
    def references(self):
        # pypet's Environment asks its storage service for references after a run when it was given
        # wrap_mode='LOCAL', even with multiproc=False, where it never wrapped the service.
        raise RuntimeError(
            "pypet's Environment was given wrap_mode='LOCAL' with multiproc=False: with one process "
            "leave wrap_mode at its default, or use brian2pet.ForkingEnvironment, which takes the "
            "same options on one core. The runs stored so far are kept."
        )

    def checkpoint(self):
        """Copy the file to FILE.checkpoint now: e.g. right after the trajectory's parameters are
        stored, so that a kill never takes the file back to before they were."""
        if self.is_open:
            raise RuntimeError(f"{self.filename} is open for writing; checkpoint between stores")
        self._take_checkpoint(os.path.abspath(self.filename))

    def _checkpoint_if_due(self, filename):
        last = getattr(self, "_last_checkpoint", None)  # (file, when it ended, seconds it took)
        if (last is not None and last[0] == filename and os.path.exists(_checkpoint_of(filename))
                and time.monotonic() - last[1] < last[2] / self.checkpoint_share):
            return
        self._take_checkpoint(filename)

    def _take_checkpoint(self, filename):
        started = time.monotonic()
        os.makedirs(os.path.dirname(filename), exist_ok=True)  # as pypet makes it for the file
        # No file yet: an empty checkpoint stands for "no file" (an HDF5 file is never empty).
        _copy_then_rename(filename if os.path.exists(filename) else None, _checkpoint_of(filename))
        ended = time.monotonic()
        self._last_checkpoint = (filename, ended, ended - started)

    def finalize(self):
        """Called by pypet's Environment after its last store: the file is complete, and its
        checkpoint no longer needed. The next store takes a new one."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(_checkpoint_of(os.path.abspath(self.filename)))
        self._last_checkpoint = None

    def __getstate__(self):
        # pypet pickles the service with the trajectory for its resume files; a copy in another
        # process starts without this process's checkpoint timing.
        state = super().__getstate__()
        state.pop("_last_checkpoint", None)
        state.pop("_in_store", None)
        state.pop("_leaf_to_index", None)
        state.pop("_index_pending", None)
        return state

    # Runs in sets (see above). pypet finds the HDF5 group of a node of the trajectory by following
    # the node's names from the trajectory's group, in the four places overridden here: the walk
    # that stores a node and its subtree (_tree_store_nodes_dfs); the walk along a dotted branch
    # before it (_tree_store_sub_branch: the stores of a run, of a subtree, of a whole trajectory);
    # the one that makes the groups above a single item (_all_create_or_get_groups: f_store_item);
    # and the one to a link's target (_tree_store_link). Here each steps into a run's set through
    # _file_parent. Relies on those four methods' signatures and on a trajectory node's _children
    # and _links, the same in pypet 0.6.1 and 0.7.0. Loading is pypet's own.

    def _file_parent(self, hdf5_group, name, make_set=None):
        """The HDF5 group that holds the node ``name`` of the trajectory's group stored as
        ``hdf5_group``: ``hdf5_group`` itself, or the run set for a run's group; None if that set
        is missing and ``make_set`` (which makes it, as pypet would at that place) is not given."""
        set_name = _set_of_run(name, hdf5_group._v_name)
        if set_name is None or name in hdf5_group:  # not a run's group, or one stored flat before
            return hdf5_group
        if set_name in hdf5_group:
            return hdf5_group._f_get_child(set_name)
        return None if make_set is None else make_set(set_name, hdf5_group)

    def _new_group(self, name, hdf5_group):
        # as pypet's walk makes a group: no title, no attributes
        return self._hdf5file.create_group(hdf5_group, name, filters=self._all_get_filters())

    def _titled_group(self, name, hdf5_group):
        # as pypet makes the groups above a single item: titled with their name
        return self._all_create_or_get_group(name, hdf5_group)[0]

    def _file_node(self, full_name):
        """The HDF5 node of the trajectory's node ``full_name`` (e.g. 'results.runs'), or None."""
        node = self._trajectory_group
        for name in full_name.split(".") if full_name else ():
            node = self._file_parent(node, name)
            if node is None or name not in node:
                return None
            node = node._f_get_child(name)
        return node

    def _tree_store_nodes_dfs(self, parent_traj_node, name, store_data, with_links, recursive,
                              max_depth, current_depth, parent_hdf5_group):
        parent_hdf5_group = self._file_parent(parent_hdf5_group, name, self._new_group)
        node = parent_traj_node._children[name]
        if not recursive or name in parent_traj_node._links or node.v_is_leaf:
            return super()._tree_store_nodes_dfs(parent_traj_node, name, store_data, with_links,
                                                 recursive, max_depth, current_depth,
                                                 parent_hdf5_group)
        # pypet's own walk would reach a run's group below without stepping into its set: the
        # group alone, then each child by this method.
        super()._tree_store_nodes_dfs(parent_traj_node, name, store_data, with_links, False,
                                      max_depth, current_depth, parent_hdf5_group)
        if current_depth < (float("inf") if max_depth is None else max_depth):
            hdf5_group = parent_hdf5_group._f_get_child(name)
            for child in list(node._children):
                self._tree_store_nodes_dfs(node, child, store_data, with_links, True, max_depth,
                                           current_depth + 1, hdf5_group)

    def _tree_store_sub_branch(self, traj_node, branch_name, store_data=pypetconstants.STORE_DATA,
                               with_links=True, recursive=False, max_depth=None, hdf5_group=None):
        if hdf5_group is None:
            hdf5_group = self._file_node(traj_node.v_full_name)  # None: pypet stores the path
        first, _, rest = branch_name.partition(".")
        if hdf5_group is None or not rest:
            return super()._tree_store_sub_branch(traj_node, branch_name, store_data, with_links,
                                                  recursive, max_depth, hdf5_group)
        # Along the branch, one group at a time, stepping into a run's set where pypet would not.
        if store_data == pypetconstants.STORE_NOTHING or (max_depth is not None and max_depth < 1):
            return
        self._tree_store_nodes_dfs(traj_node, first, store_data, with_links, False, max_depth, 1,
                                   hdf5_group)
        self._tree_store_sub_branch(
            traj_node._children[first], rest, store_data, with_links, recursive,
            None if max_depth is None else max_depth - 1,
            self._file_parent(hdf5_group, first)._f_get_child(first),
        )

    def _all_create_or_get_groups(self, key, start_hdf5_group=None):
        group = self._trajectory_group if start_hdf5_group is None else start_hdf5_group
        created = False
        for name in key.split(".") if key else ():
            parent = self._file_parent(group, name, self._titled_group)
            group, created = self._all_create_or_get_group(name, parent)
        return group, created

    def _tree_store_link(self, node_in_traj, link, hdf5_group):
        if link in hdf5_group:
            return
        target = node_in_traj._links[link]
        target_node = self._file_node(target.v_full_name)
        if target_node is None:  # not stored yet: the target first, as pypet does
            self._tree_store_sub_branch(target.v_root, target.v_full_name,
                                        store_data=pypetconstants.STORE_DATA_SKIPPING,
                                        with_links=False, recursive=False,
                                        hdf5_group=self._trajectory_group)
            target_node = self._file_node(target.v_full_name)
        self._hdf5file.create_soft_link(hdf5_group, link, target_node)

    # The index of runs (section 7.7), written in the same store as what it indexes. pypet stores
    # every leaf through _prm_store_parameter_or_result, whatever the store (a run's end in this
    # process, the references that forked workers or SCOOP send back to it, f_store_item, a whole
    # trajectory), which hands the leaf's items (its _store()) and HDF5 group to
    # _prm_store_from_dict: a leaf's rows go in once the leaf is stored in full. pypet deletes a
    # node through _all_delete_parameter_or_result_or_group: the index learns it first (a row that
    # sends runs_table to the nodes is always right), and the node is looked for in its run's set.
    # A store's rows wait in _index_pending and go in at its end, at pypet's closing of the store
    # (_srvc_closing_routine, also after an error), in one append: appending leaf by leaf opened
    # the index's nodes three times a run, which doubled the cost of a run in the benchmark.
    # Relies on these four methods' signatures, the same in pypet 0.6.1 and 0.7.0.

    def _prm_store_from_dict(self, fullname, store_dict, hdf5_group, store_flags, kwargs):
        place = _place_in_runs(hdf5_group._v_pathname, self._trajectory_name)
        if place is not None and place[1]:
            # A group that holds items already may hold some the index does not know of (stored
            # by pypet's own service): then the index sends runs_table to its nodes.
            items = store_dict if hdf5_group._v_nchildren == 0 else None
            self._leaf_to_index = (*place, items, store_flags)
        return super()._prm_store_from_dict(fullname, store_dict, hdf5_group, store_flags, kwargs)

    def _prm_store_parameter_or_result(self, instance, *args, **kwargs):
        self._leaf_to_index = None
        super()._prm_store_parameter_or_result(instance, *args, **kwargs)
        if self._leaf_to_index is not None:
            run, result, items, flags = self._leaf_to_index
            self._leaf_to_index = None
            if (instance.f_get_class_name() not in _SAFE_CLASS_NAMES
                    or not instance.v_annotations.f_is_empty()):
                items = None  # runs_table must read the node, and check it as check_file does
            pending = getattr(self, "_index_pending", None)
            if pending is None or pending[0] is not self._trajectory_group:
                self._append_pending_rows()
                pending = self._index_pending = (self._trajectory_group, [])
            pending[1].extend(_index_rows(run, result, items, flags))

    def _all_delete_parameter_or_result_or_group(self, instance, delete_only=None,
                                                 remove_from_item=False, recursive=False,
                                                 _hdf5_group=None):
        if _hdf5_group is None:  # None if missing: pypet's own search then says so
            _hdf5_group = self._file_node(instance.v_full_name)
        if _hdf5_group is not None:
            self._append_pending_rows()  # rows keep their order: a later row counts
            path = _hdf5_group._v_pathname
            place = _place_in_runs(path, self._trajectory_name)
            if delete_only is None:
                rows = _removed_from_index(self._hdf5file, path)
            elif place is not None and place[1]:  # some items of a run's result
                rows = [_marker_row(place[0], _FROM_NODES, place[1].encode())]
            else:
                rows = []
            _append_to_index(self._hdf5file, self._trajectory_group, rows)
        return super()._all_delete_parameter_or_result_or_group(
            instance, delete_only=delete_only, remove_from_item=remove_from_item,
            recursive=recursive, _hdf5_group=_hdf5_group)

    def _srvc_closing_routine(self, closing):
        # The end of a store (closing: it opened the file), or of one while the file is kept open.
        if closing or not getattr(self, "_in_store", False):
            self._append_pending_rows()
        return super()._srvc_closing_routine(closing)

    def _append_pending_rows(self):
        pending, self._index_pending = getattr(self, "_index_pending", None), None
        if pending and pending[1] and self.is_open:
            _append_to_index(self._hdf5file, *pending)


def _run_index(name):
    """The index of the run a group named ``name`` belongs to (pypet's run_00000042), or None."""
    digits = name[len(pypetconstants.RUN_NAME):]
    if name.startswith(pypetconstants.RUN_NAME) and digits.isdigit():
        if pypetconstants.FORMATTED_RUN_NAME % int(digits) == name:
            return int(digits)
    return None


def _set_of_run(name, parent_name):
    """The name of the set group (run_set_00000) that a group ``name`` under a group
    ``parent_name`` goes into, or None: not a run's group, or in a set already."""
    idx = _run_index(name)
    if idx is None or parent_name.startswith(pypetconstants.SET_NAME):
        return None
    return make_set_name(idx)


def restore_checkpoint(filename):
    """If a kill cut a write to ``filename`` short, put the file back as it was at its last
    checkpoint (see CheckpointedHDF5StorageService) and return True; otherwise change nothing and
    return False. Raises FileDamaged when there is no checkpoint to go back to."""
    filename = os.path.abspath(filename)
    if not os.path.exists(_marker_of(filename)):
        return False
    checkpoint = _checkpoint_of(filename)
    if not os.path.exists(checkpoint):
        raise FileDamaged(
            f"{filename}: a write to it was cut short and there is no checkpoint "
            f"({os.path.basename(checkpoint)}) to go back to; move it away and start again"
        )
    if os.path.getsize(checkpoint) == 0:  # there was no file at the checkpoint
        with contextlib.suppress(FileNotFoundError):
            os.remove(filename)
    else:
        _copy_then_rename(checkpoint, filename)  # a copy: a kill now just means doing it again
    os.remove(_marker_of(filename))
    return True


def _refuse_if_cut_short(filename):
    if os.path.exists(_marker_of(filename)):
        raise FileDamaged(
            f"{filename}: its last write was cut short (was its process killed?); call "
            f"brian2pet.prepare_resume or restore_checkpoint before writing to it"
        )


def remove_from_file(filename, paths):
    """Remove the HDF5 groups or arrays ``paths`` (e.g. '/my_trajectory') from ``filename``, safe
    against a kill as CheckpointedHDF5StorageService's stores are: a checkpoint first if there is
    none, the marker during the removal, signals held back. A run's group may be named as pypet
    names it in a run ('/t/results/runs/run_00000042'), also where the service put it into its set.
    Returns the paths it removed (those the file held, as the file names them); raises FileDamaged
    for a file that HDF5 cannot read."""
    import tables

    filename = os.path.abspath(filename)
    if not os.path.exists(filename):
        return []
    with signals_deferred():
        _refuse_if_cut_short(filename)
        if not os.path.exists(_checkpoint_of(filename)):
            _copy_then_rename(filename, _checkpoint_of(filename))
        open(_marker_of(filename), "wb").close()
        try:
            with pickles_refused(), tables.open_file(filename, "a") as h5:
                removed = [held for held in (_held_path(h5, path) for path in paths) if held]
                for path in removed:  # the index first (section 7.7): it then sends to the nodes
                    trajectory = h5.get_node("/" + path.strip("/").split("/")[0])
                    _append_to_index(h5, trajectory, _removed_from_index(h5, path))
                for path in removed:
                    h5.remove_node(path, recursive=True)
        except (tables.HDF5ExtError, OSError) as error:
            raise FileDamaged(
                f"{filename}: damaged, HDF5 cannot read it ({_hdf5_reason(error)}); move it away"
            ) from None
        finally:
            os.remove(_marker_of(filename))  # only a kill leaves it
    return removed


def _held_path(h5, path):
    """``path`` as ``h5`` holds it, stepping into a run's set where the path names none; or None."""
    if path in h5:
        return path
    held = ""
    for name in path.strip("/").split("/"):
        set_name = _set_of_run(name, held.rsplit("/", 1)[-1])
        if f"{held}/{name}" not in h5 and set_name is not None:
            held = f"{held}/{set_name}"
        held = f"{held}/{name}"
        if held not in h5:
            return None
    return held


def remove_resume_files(resume_folder, trajectory_name):
    """Remove pypet's resume files of ``trajectory_name`` once ``env.run`` or ``env.resume`` returned
    with every run complete, in one rename, so that a kill never leaves half of them. (pypet's own
    delete_resume=True deletes them before its final stores, which a kill may then cut with nothing
    left to resume: pass delete_resume=False and call this after.)"""
    folder = os.path.join(resume_folder, trajectory_name)
    if os.path.isdir(folder):
        os.replace(folder, folder + ".done")
        shutil.rmtree(folder + ".done")


# pypet's resume files, as pypet 0.6.1 and 0.7.0 write them (the one place that reads them): in
# RESUME_FOLDER/TRAJECTORY, 'environment.ecnt' (the trajectory and run function, written just before
# the first run) and one '*.rcnt' per run pypet counts as finished, holding ((run index, what the
# run function returned), run information), written right after the run was stored.


class _Opaque:
    """What a resume file's classes and functions become when it is read (see _PlainUnpickler)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _PlainUnpickler(pickle.Unpickler):
    """Reads a pickle without running anything from it: every class or function it names becomes
    _Opaque, so only its numbers, text and containers come out as they were."""

    def find_class(self, module, name):
        return _Opaque


def _counted_runs(resume_folder, trajectory_name):
    """{run index: its .rcnt file} for the runs pypet counts as finished."""
    folder = os.path.join(resume_folder, trajectory_name)
    counted = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.endswith(".rcnt"):  # pypet writes .ncnt, then renames: an .rcnt is complete
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                counted[int(_PlainUnpickler(handle).load()[1]["idx"])] = path
    return counted


def finished_runs(resume_folder, trajectory_name):
    """Sorted indices of the runs that pypet's resume files count as finished (none if there are no
    resume files): those a resume keeps."""
    return sorted(_counted_runs(resume_folder, trajectory_name))


def _groups_of_runs(h5, trajectory_name):
    """{run name: HDF5 paths of its groups}: pypet stores what a run adds under groups named after
    the run (results.runs.run_00000002, or wherever a name holds pypet's run wildcard '$'), which
    this module's service puts into sets (results.runs.run_set_00000.run_00000002)."""
    found = {}

    def look_in(group):
        # By the names PyTables lists, opening no run's group: a resume of 20,000 runs opens only
        # the groups around them.
        for name in list(group._v_groups):
            if _run_index(name) is not None:
                found.setdefault(name, []).append(f"{group._v_pathname}/{name}")
            else:
                look_in(group._f_get_child(name))

    for branch in ("results", "derived_parameters"):
        if f"/{trajectory_name}/{branch}" in h5:
            look_in(h5.get_node(f"/{trajectory_name}/{branch}"))
    return found


def prepare_resume(filename, resume_folder, trajectory_name):
    """Make ``filename`` (written with CheckpointedHDF5StorageService) and pypet's resume files agree
    after a stop or kill at any moment; call it before ``Environment.resume``.

    - A write cut short: the file goes back to its checkpoint (restore_checkpoint).
    - A run counted as finished whose results the file does not hold (stored after the checkpoint):
      its resume file is removed, so that it runs again.
    - A run the file holds but pypet did not count (killed between pypet's store and its count):
      it is removed from the file, so that it runs again and is stored once.

    Returns the number of runs left to do; or None when there is nothing to resume: no run was
    counted as finished, or the file went back to before the trajectory was stored. Start the
    exploration afresh then (remove its trajectory from the file with remove_from_file, and its
    resume folder): no finished run is lost that a resume could have kept. Raises FileDamaged, in
    one line, for a file that cannot be read and has no checkpoint to go back to.
    """
    import tables

    filename = os.path.abspath(filename)
    restore_checkpoint(filename)
    counted = _counted_runs(resume_folder, trajectory_name)
    if not counted:
        return None
    held, groups = False, {}
    try:
        if os.path.exists(filename):
            with pickles_refused(), tables.open_file(filename, "r") as h5:
                held = f"/{trajectory_name}" in h5
                groups = _groups_of_runs(h5, trajectory_name) if held else {}
    except Exception as error:
        # No write to it was cut short (else restore_checkpoint put the checkpoint back):
        # something else damaged it, the disk or another program.
        raise FileDamaged(
            f"{filename} is damaged beyond repair ({_hdf5_reason(error)}), and no write of this "
            f"exploration was cut short; its {len(counted)} finished run(s) are lost with it: "
            f"start the exploration again without resuming"
        ) from None
    if not held:
        _log.warning(f"{filename} went back to before '{trajectory_name}' was stored: its "
                     f"{len(counted)} finished run(s) run again")
        return None
    total = len(load_nodes(filename, trajectory_name, nodes=()))
    run_name = pypetconstants.FORMATTED_RUN_NAME
    stored = {idx for idx in range(total) if run_name % idx in groups}
    for idx in set(counted) - stored:
        os.remove(counted[idx])
    uncounted = [path for idx in sorted(stored - set(counted))
                 for path in groups[run_name % idx]]
    if uncounted:
        remove_from_file(filename, uncounted)
    return total - len(stored & set(counted))


# ---------------------------------------------------------------------------------------------------
# 7.3 Pickled copies of a manager: SCOOP's workers and pypet's resume
#
# pypet pickles the run function, and with it the manager, to hand runs to SCOOP's workers (a copy
# per run) and to resume an exploration in a new process. Brian2 objects cannot travel: a copy leaves
# what pre_build and the pre-run made behind and makes it again in its process before its first run,
# once per process, as the original made it: from the same random state, seeing what pre_build saw
# (the parameters' default values, the results of then), on a copy of the trajectory, so that the
# pre-run's results, stored with the original, are not stored again. In a process that holds the
# original, or a copy that already made it, a copy takes that one's start over instead.
# ---------------------------------------------------------------------------------------------------

# {exploration: the manager whose start its copies in this process take over (the original only
# weakly, so that it may go)}. One exploration at a time: pre_build of a new one forgets the others.
_made_in_this_process = {}


def _added_names(traj):
    """Full names of the results and derived parameters that ``traj`` holds."""
    return set(traj.f_get_results(copy=False)) | set(traj.f_get_derived_parameters(copy=False))


def _note_what_copies_redo(manager, traj):
    """Called as pre_build begins: a copy redoes it from this random state and these results."""
    _made_in_this_process.clear()
    manager._before_pre_build = (_random_state(), _added_names(traj))


def _state_of_a_copy(manager, state):
    """The pickled state of ``manager``: without Brian2 objects, and saying what to redo."""
    if manager._random_state is None:  # fixed now, so that copies and the original agree
        manager._random_state = state["_random_state"] = _random_state()
    if manager._pre_built:
        if getattr(manager, "_exploration", None) is None:
            manager._exploration = state["_exploration"] = uuid.uuid4().hex
            _made_in_this_process[manager._exploration] = weakref.ref(manager)
        state.update(_brian_list=[], _network_dict={}, _pre_built=False, _pre_run=False,
                     _objects_before_pre_build=set(), _start=None,
                     _copy_redoes="pre_run" if manager._pre_run else "pre_build")
    return state


def _redo_in_this_process(manager, traj):
    """In a pickled copy, before its first run: take over the start made in this process, or make
    it as the original did (see above)."""
    redo, manager._copy_redoes = manager._copy_redoes, None
    made = _made_in_this_process.get(manager._exploration)
    made = made() if isinstance(made, weakref.ref) else made
    if made is not None and made._start is not None:
        manager._logger.info(f"Taking over the {redo} made in this process")
        manager._brian_list, manager._network_dict = made._brian_list, made._network_dict
        manager._start, manager._pre_built, manager._pre_run = made._start, True, made._pre_run
        return
    manager._logger.info(f"Redoing the original manager's {redo} in this process")
    random_state, names = manager._before_pre_build
    as_before = traj.f_copy(copy_leaves="explored")
    as_before.f_restore_default()
    for name in _added_names(as_before) - names:
        as_before.f_remove_item(name)
    _set_random_state(random_state)
    if redo == "pre_run":
        manager.pre_run_network(as_before)
    else:
        manager.pre_build(as_before)
    _made_in_this_process[manager._exploration] = manager


# ---------------------------------------------------------------------------------------------------
# 7.4 Forked workers that die with the sweep, and whose death fails only their own run
#
# With multiproc=True and use_pool=False pypet forks one worker per run, so nothing built before the
# runs (pre_build, the pre-run) needs pickling. Two things go wrong with pypet's own way:
#   - A forked process outlives its parent: a killed sweep leaves its workers running.
#   - All workers hand their results to the main process through ONE multiprocessing Queue. A worker
#     killed halfway through its message (the OOM killer picks the biggest process: a worker holding
#     its results) leaves the Queue's shared write lock taken and half a message in its pipe; the
#     other workers wait for the lock, the main process for the rest of the message, for ever.
# ForkingEnvironment gives each worker a pipe of its own: a dead worker's pipe just ends (end of
# file), its run fails, and the others go on.
# ---------------------------------------------------------------------------------------------------

# Set while a ForkingEnvironment runs; read in every forked child (see _in_forked_worker).
_forking = {"registered": False, "armed": False, "parent": None}


def _before_fork():
    _forking["parent"] = os.getpid()


def _in_forked_worker():
    """Runs in every child forked while a ForkingEnvironment runs, before the child does anything."""
    if not _forking["armed"]:
        return
    # A terminal sends Ctrl-C to every process of its group: the main process stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    prctl = _libc_function("prctl")
    if prctl is not None:
        pr_set_pdeathsig = 1  # Linux: the kernel sends this child SIGKILL when its parent dies
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != _forking["parent"]:
            os._exit(1)  # the parent died before prctl took effect


def _libc_function(name):
    """A function of the C library through ctypes, or None where there is no such function."""
    import ctypes

    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError, TypeError):
        return None


class _ResultPipe:
    """One worker's way to hand its run's results to the main process. pypet's worker function calls
    ``put`` once, then ``close``, as it would on its Queue."""

    def __init__(self):
        self.reader, self.writer = multiprocessing.Pipe(duplex=False)

    def put(self, result):
        self.writer.send(result)  # no feeder thread, no lock: this process writes it all, or dies

    def close(self):
        self.writer.close()


class _ArrivedResults:
    """A Queue's ``empty`` and ``get``, over the pipes of the running workers: what pypet's main loop
    reads the results from."""

    def __init__(self, environment):
        self._environment = environment
        self._arrived = []

    def empty(self):
        if not self._arrived:
            self._arrived = self._environment._receive_results()
        return not self._arrived

    def get(self):
        return self._arrived.pop(0)


class ForkingEnvironment(Environment):
    """pypet's Environment, for forking one worker per run (multiproc=True, use_pool=False; with
    wrap_mode='LOCAL' the main process is the one writer of the file). Differences:

      - Each worker hands its results over through a pipe of its own: a worker that dies, also
        halfway through handing them over, fails only its own run; the others go on.
      - Workers die with the main process, even with SIGKILL (Linux: prctl PR_SET_PDEATHSIG).
        Elsewhere a warning says so: a worker then ends when it hands over its results to a main
        process that is gone.
      - Workers ignore Ctrl-C, which a terminal sends to all of them: the main process stops them.
        When ``run`` or ``resume`` ends with an exception (Ctrl-C, Terminated, an error), the workers
        it started that still run are stopped (SIGTERM, then SIGKILL after ``stop_timeout`` s).
    In every other way, and in other modes (one process, a pool, SCOOP), it is pypet's Environment.

    The one place in this module that calls into pypet's private methods (tested with pypet 0.6.1
    and 0.7.0), because pypet offers no public way to give its workers another result channel. (Two
    of pypet's file formats are read elsewhere, each where it is read: its resume files in 7.2, its
    HDF5 node attributes in 7.5.) It relies on:
      - ``_make_iterator(start_run_idx, copy_data, **kwargs)`` yielding one task dict per run, with
        the result queue under 'result_queue' when forking; pypet forks the worker right after
        taking a task, and its worker function calls ``put`` then ``close`` on that queue;
      - ``_get_results_from_queue(result_queue, results, n, total_runs)`` being called after every
        fork, before the next, and reading with ``empty()`` and ``get()``;
      - pypet's @prefix_naming ``__setattr__``, which a subclass must replace (below).
    """

    stop_timeout = 5.0
    _pipes = ()  # of the workers whose results have not come yet

    def __setattr__(self, name, value):
        # pypet's Environment sets attributes through super(type(self), self), which in a subclass
        # calls itself for ever. Its "v_" prefix is an alias of the plain name.
        object.__setattr__(self, name[2:] if name.startswith("v_") else name, value)

    def run(self, *args, **kwargs):
        self._no_wrap_without_multiproc()
        with self._workers_in_hand():
            return super().run(*args, **kwargs)

    def resume(self, *args, **kwargs):
        self._no_wrap_without_multiproc()
        with self._workers_in_hand():
            return super().resume(*args, **kwargs)

    def _no_wrap_without_multiproc(self):
        # pypet (0.6.1, 0.7.0) wraps the storage service only with multiproc=True, but reads a LOCAL
        # wrap's references after every run even without it, and fails. The same options then run
        # on one core as well as on several.
        if not self._multiproc and self._wrap_mode == pypetconstants.WRAP_MODE_LOCAL:
            self._wrap_mode = pypetconstants.WRAP_MODE_LOCK  # pypet's default, unused in one process

    @contextlib.contextmanager
    def _workers_in_hand(self):
        if not _forking["registered"]:
            os.register_at_fork(before=_before_fork, after_in_child=_in_forked_worker)
            _forking["registered"] = True
        if _libc_function("prctl") is None:
            _warn_once("prctl", "brian2pet: this system has no prctl: forked workers cannot be made "
                                "to die with the main process; if it is killed, each ends when it "
                                "hands over its results")
        before = set(multiprocessing.active_children())
        _forking["armed"] = True
        try:
            yield
        except BaseException:
            self._stop_workers(set(multiprocessing.active_children()) - before)
            raise
        finally:
            _forking["armed"] = False

    def _stop_workers(self, workers):
        for worker in workers:
            worker.terminate()
        deadline = time.monotonic() + self.stop_timeout
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                worker.kill()
                worker.join()

    def _make_iterator(self, start_run_idx, copy_data=False, **kwargs):
        tasks = super()._make_iterator(start_run_idx, copy_data, **kwargs)
        if "result_queue" not in kwargs:  # not forking: pypet's own way
            return tasks
        return self._tasks_with_own_pipes(tasks)

    def _tasks_with_own_pipes(self, tasks):
        for task in tasks:
            # A resumed exploration's run function is a pickled copy of its manager, which redoes
            # pre_build and the pre-run before its first run (section 5). Done here, before the
            # first fork, every worker inherits it, instead of each redoing it for its one run.
            manager = getattr(task.get("runfunc"), "__self__", None)
            if isinstance(manager, NetworkManager) and manager._copy_redoes is not None:
                _redo_in_this_process(manager, task["traj"])
            pipe = _ResultPipe()
            self._pipes += (pipe,)
            yield dict(task, result_queue=pipe)

    def _get_results_from_queue(self, result_queue, results, n, total_runs):
        # pypet's Queue (result_queue) stays unused; pypet's own loop reads from the pipes instead.
        return super()._get_results_from_queue(_ArrivedResults(self), results, n, total_runs)

    def _receive_results(self):
        """The results of every worker that handed them over since the last call."""
        received = []
        for pipe in self._pipes:
            # The worker forked with this pipe holds the write end; this process must let go of its
            # own copy (nor may the next worker inherit it), or the pipe would not end when the
            # worker dies.
            if not pipe.writer.closed:
                pipe.writer.close()
            if not pipe.reader.poll():
                continue
            try:
                received.append(pipe.reader.recv())  # the whole message, or end of file
            except (EOFError, OSError):
                pass  # the worker died: its run stays incomplete
            pipe.reader.close()
            self._pipes = tuple(other for other in self._pipes if other is not pipe)
        return received


# ---------------------------------------------------------------------------------------------------
# 7.5 Files from elsewhere: loading one runs nothing from it
#
# pypet's generic loading (load_trajectory, f_load with data) rebuilds a PickleResult, a
# PickleParameter and any item it stored through pandas by unpickling it, and PyTables unpickles
# every node attribute that looks like a pickle as soon as it opens the node (pypet stores
# annotations as attributes). pypet also imports the class a node names. So loading a file that way
# runs whatever its author put in. load_nodes loads only the nodes asked for, in two steps:
#   1. check_file walks exactly those nodes with PyTables and refuses the file, in one line naming
#      the first bad node, if any holds a class other than SAFE_CLASSES, an item pypet would read
#      through pandas or pickle, a link, or an attribute that is a pickle;
#   2. pypet loads the nodes.
# Both steps run inside pickles_refused, so that even a check that missed something could not run
# code. The names pypet gives its node attributes (SRVC_LEAF, SRVC_INIT_CLASS_NAME, SRVC_STORE) are
# pypet's file format, the same in pypet 0.6.1 and 0.7.0.
# ---------------------------------------------------------------------------------------------------

# pypet's containers of numbers and text, and brian2pet's: none of them unpickles when it loads.
SAFE_CLASSES = (Parameter, Result, Brian2Parameter, Brian2Result, Brian2MonitorResult)
_SAFE_CLASS_NAMES = frozenset(cls.__name__ for cls in SAFE_CLASSES)  # as a node's attributes name them
# How pypet stored a container's items (attribute SRVC_STORE) when it reads them back as HDF5 arrays
# and tables of numbers and text. Its other ways (pandas frames and series, nested and shared data)
# go through pandas, whose object columns are pickles.
_SAFE_STORAGE = ("ARRAY", "CARRAY", "EARRAY", "TABLE", "DICT")


class FileRefused(ValueError):
    """A file that cannot or must not be loaded; the message is one line naming the file and the
    first thing wrong: missing, not HDF5, damaged, not holding the trajectory, or a node whose
    content would unpickle or that is not one of SAFE_CLASSES."""


# Whether the audit hook is installed, and, per thread, whether it refuses now: a program that reads
# a file in one thread may unpickle its own data in another.
_pickle_guard = {"installed": False}
_refusing = threading.local()


def _refuse_pickled_globals(event, args):
    # Python announces (as the audit event pickle.find_class) every class or function a pickle names
    # before the pickle may call it; without one, a pickle builds only numbers, text and containers.
    if event == "pickle.find_class" and getattr(_refusing, "now", False):
        raise FileRefused(f"refused to unpickle {args[0]}.{args[1]}")


@contextlib.contextmanager
def pickles_refused():
    """Inside the block no pickle can name a class or function, so no pickle can run code.

    PyTables then leaves a pickled attribute as its bytes, and pypet's pickle containers raise. The
    audit hook stays installed (Python cannot remove one) but does nothing outside the block, nor in
    other threads.
    """
    if not _pickle_guard["installed"]:
        sys.addaudithook(_refuse_pickled_globals)
        _pickle_guard["installed"] = True
    previous = getattr(_refusing, "now", False)
    _refusing.now = True
    try:
        yield
    finally:
        _refusing.now = previous


def _hdf5_reason(error):
    """The innermost message of HDF5's error stack, e.g. 'truncated file: eof = ...'."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "End of HDF5 error back trace" in lines:
        return lines[lines.index("End of HDF5 error back trace") - 1]
    return _first_line(error)


def check_file(filename, trajectory_names, nodes=("parameters", "results")):
    """Raise FileRefused unless ``filename`` holds at least one of ``trajectory_names`` (a name or a
    list) and, for each it holds, its ``nodes`` (pypet names such as 'results.runs'; each with its
    whole subtree) load without unpickling and with SAFE_CLASSES only. Runs nothing from the file.
    Returns {trajectory name: the names of ``nodes`` it holds}.
    """
    import tables

    if isinstance(trajectory_names, str):
        trajectory_names = [trajectory_names]
    if not os.path.isfile(filename):
        raise FileRefused(f"{filename}: no such file")
    try:
        with pickles_refused():
            if not tables.is_hdf5_file(filename):
                raise FileRefused(f"{filename}: not an HDF5 file")
            with tables.open_file(filename, "r") as h5:
                held = [name for name in trajectory_names if f"/{name}/overview" in h5]
                if not held:
                    raise FileRefused(
                        f"{filename}: holds no trajectory {' or '.join(map(repr, trajectory_names))}"
                    )
                return {name: _check_nodes(h5, filename, name, nodes) for name in held}
    except (tables.HDF5ExtError, OSError) as error:
        raise FileRefused(
            f"{filename}: damaged, HDF5 cannot read it (cut short by a crash or an interrupted "
            f"copy?): {_hdf5_reason(error)}"
        ) from None


def _check_nodes(h5, filename, trajectory_name, nodes):
    trajectory = f"/{trajectory_name}"
    # pypet also reads the file's root, the trajectory group, its direct subgroups and the overview
    # tables (run information, explored parameters, storage settings).
    walked = [h5.root, *h5.iter_nodes(trajectory), *h5.walk_nodes(f"{trajectory}/overview")]
    present = []
    for name in nodes:
        path = f"{trajectory}/{name.replace('.', '/')}"
        if path in h5:
            present.append(name)
            walked.extend(h5.walk_nodes(path))
    for node in walked:
        # An item of a container is reported by the container's name.
        named = node._v_parent if "SRVC_LEAF" in node._v_parent._v_attrs else node
        where = named._v_pathname[len(trajectory) + 1:].replace("/", ".") or named._v_pathname
        problem = _unsafe_node(node)
        if problem:
            raise FileRefused(
                f"{filename}: {trajectory_name}.{where}: {problem}; refused (it could run code)"
            )
    return present




def _unsafe_node(node):
    """What makes reading ``node`` unsafe, or None. Called inside pickles_refused."""
    import tables

    if isinstance(node, tables.link.Link):
        return "a link, which pypet would follow elsewhere"
    attributes = node._v_attrs
    for name in attributes._f_list("all"):
        # Read as PyTables reads it: a pickle that names a class or function is refused and stays
        # bytes (which end with a pickle's STOP byte, '.'); one that names none comes out as a list,
        # a dict, None, ... : something other than what PyTables stores natively.
        value = getattr(attributes, name)
        native = (np.generic, np.ndarray, str, bytes, int, float, tables.Filters)
        if (isinstance(value, np.bytes_) and value.endswith(b".")) or not isinstance(value, native):
            return f"attribute {name} holds a pickle"
    if isinstance(node, tables.Group) and "SRVC_LEAF" in attributes:
        class_name = str(attributes.SRVC_INIT_CLASS_NAME)
        if class_name not in _SAFE_CLASS_NAMES:
            return (f"stored as {class_name}, not one of the containers loaded here "
                    f"({', '.join(cls.__name__ for cls in SAFE_CLASSES)})")
    if isinstance(node, tables.Leaf) and not isinstance(node, (tables.Array, tables.Table)):
        # e.g. a VLArray of Python objects, which PyTables unpickles when it reads them
        return f"data stored as a PyTables {type(node).__name__}"
    if "SRVC_LEAF" in node._v_parent._v_attrs:  # an item of a container
        storage = str(getattr(attributes, "SRVC_STORE", "none"))
        if storage not in _SAFE_STORAGE:
            return (f"item {node._v_name} stored as {storage}, which pypet reads through pandas "
                    f"or pickle")
    return None


def load_nodes(filename, trajectory_name, nodes=("parameters", "results")):
    """Trajectory ``trajectory_name`` of a file from anywhere, with only ``nodes`` loaded (pypet
    names, each with its whole subtree, e.g. ('parameters', 'results.runs')), and its run
    information; nothing from the file is run. Checked first with check_file; loaded with
    SAFE_CLASSES only, with every pickle refused.

    Raises FileRefused, with a one-line message naming the file and the node, for a file that fails
    the check or that pypet cannot read.
    """
    present = check_file(filename, [trajectory_name], nodes)[trajectory_name]
    # pypet logs a failed load at length before raising; the error below says it in one line.
    pypet_logger = logging.getLogger("pypet")
    level = pypet_logger.level
    pypet_logger.setLevel(logging.CRITICAL)
    try:
        with pickles_refused():
            traj = Trajectory(trajectory_name, add_time=False, filename=filename,
                              dynamic_imports=list(SAFE_CLASSES))
            # Run information and explored names only; then the nodes, each with its subtree.
            traj.f_load(name=trajectory_name, load_parameters=0, load_derived_parameters=0,
                        load_results=0, load_other_data=0, force=True)
            for name in present:
                traj.f_load_child(name, recursive=True, load_data=2)
    except FileRefused:
        raise
    except Exception as error:  # whatever pypet raises on a file it cannot read
        raise FileRefused(
            f"{filename}: damaged, pypet cannot read it: {_hdf5_reason(error)}"
        ) from error
    finally:
        pypet_logger.setLevel(level)
    return traj


# ---------------------------------------------------------------------------------------------------
# 7.6 SCOOP's exit status
#
# Under SCOOP (python -m scoop script.py) the script's main runs in SCOOP's root worker, whose exit
# status SCOOP 0.7.2 drops: the command exits 0 whatever happened, so a failed exploration looks
# like a finished one to a batch system. run_command fixes that, and is `sys.exit(main())` anywhere
# else.
# ---------------------------------------------------------------------------------------------------


def run_command(main):
    """Call ``main()`` and exit with its status (an int, or a SystemExit it raises), as
    ``sys.exit(main())`` does, also in SCOOP's root worker."""
    scoop = sys.modules.get("scoop")  # imported by SCOOP's bootstrap before the script
    if not (scoop is not None and getattr(scoop, "IS_RUNNING", False)
            and getattr(scoop, "IS_ORIGIN", False)):
        sys.exit(main())
    # SCOOP prints a SystemExit of its root worker as a traceback and drops its status.
    try:
        failed = main() not in (None, 0)
    except SystemExit as stop:
        failed = stop.code not in (None, 0)
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    except Exception:
        import traceback

        traceback.print_exc()
        failed = True
    if failed:
        import atexit

        atexit.register(_fail_scoop_command)


def _fail_scoop_command():
    """Make ``python -m scoop`` exit non-zero; runs in the failed root worker as it exits.

    Reaches inside SCOOP 0.7.2 (the one place here that does): the command takes its exit status
    from the process that started the root worker (``scoop.launch``), which exits 0 whatever the
    root's status; only a launch process ended by a signal fails the command. So the root ends its
    sibling workers, as the launch process would have, then the launch process, and then itself at
    once: the launcher now closes SCOOP's brokers, and the root's remaining clean-up would wait for
    them for ever. Workers on other hosts end when the launcher closes their ssh. Finding the launch
    process and its children takes Linux's /proc; without it a warning says the command exits 0.
    """
    launch = os.getppid()
    try:
        with open(f"/proc/{launch}/cmdline", "rb") as handle:
            if b"scoop.launch" not in handle.read():
                return
        with open(f"/proc/{launch}/task/{launch}/children") as handle:
            siblings = [int(pid) for pid in handle.read().split() if int(pid) != os.getpid()]
    except OSError:
        print("brian2pet: no /proc here to find SCOOP's launcher: the command exits 0 although "
              "the script failed", file=sys.stderr)
        return
    for pid in siblings:
        os.kill(pid, signal.SIGTERM)
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(launch, signal.SIGTERM)
    os._exit(1)


# ---------------------------------------------------------------------------------------------------
# 7.7 Many runs: a run's fixed cost flat however many runs came before, and all runs as one table
#
# Brian2 2.9 collects all of a process's garbage at the start of every Network.run (to warn of
# objects that no network simulated; Brian2 2.11 only while that warning is on). A full collection
# visits every object the process holds, pypet's trajectory among them: 137 of the 160 ms a run of
# an empty network took. From the moment a run begins to build until its last analyser is done,
# what lived before the run is frozen (Python's gc.freeze keeps it out of collections), so Brian2's
# collections visit only what the run made, and collect the run's garbage as before (a weakref
# callback of an object build() dropped still runs within the run). When the run is done, what it
# made and dropped (its network, its synapses) is collected while the rest is still frozen, at the
# cost of the run's own objects: frozen by the next run, it would stay, with its memory, until one
# of Python's rare full collections. Then the rest is unfrozen. Measured in CPU time with issue
# 23's benchmark (runs of an empty network through NetworkManager, each storing three results
# through CheckpointedHDF5StorageService; Python 3.11, Brian2 2.9): 106 ms a run without the
# freeze, 9 ms with it over the first 30 runs; over 20,000 runs, 14.5 ms a run over the first 1,000
# and 14.0 over the last (a store lists the runs of its set, up to 1,000: section 7.2).
# ---------------------------------------------------------------------------------------------------

import gc  # noqa: E402

from brian2.units.fundamentalunits import get_unit  # noqa: E402


@contextlib.contextmanager
def _collecting_only_the_runs_garbage():
    if gc.get_freeze_count():  # frozen by someone else, who will unfreeze it: left as it is
        yield
        return
    gc.freeze()
    try:
        yield
        gc.collect()  # what the run made and dropped, visiting only what it made
    finally:
        gc.unfreeze()


# Runs as one table. pypet loads a run's results as a tree of Python objects, one container at a
# time: three minutes for the benchmark's 20,000 runs of three results each (and its generic
# loading of a file from elsewhere would unpickle). runs_table reads the HDF5 nodes itself, with
# PyTables, where pypet's layout puts them (section 2's layout comment; pypet 0.6.1 and 0.7.0
# write the same):
#   TRAJ/overview/runs            a table with a row per run: its index and name
#   TRAJ/overview/explorations    the names of the explored parameters
#   TRAJ/parameters/A/B           a parameter: its explored values in the table explored_data
#                                 (pypet) or explored_data__brn2__ (Brian2Parameter), whose unit is
#                                 in data__brn2__
#   TRAJ/results/runs/[run_set_00000/]run_00000042/NAME   a run's result: a group whose leaves are
#                                 its items (NAME__brn2__value and NAME__brn2__unit for a Quantity)
# A node's attributes say what it holds: SRVC_INIT_CLASS_NAME its class, SRVC_STORE how an item is
# stored, SRVC_DATA_COLL_TYPE and SRVC_DATA_SCALAR_TYPE (SRVC_COLUMN_<column>_... in a table)
# whether it was a scalar, list or array, and of which Python type. Every node read is checked as
# check_file checks it (section 7.5), inside pickles_refused; unit text is parsed (section 1).
# What it costs is PyTables' opening of each node, some 0.25 ms here: the benchmark's runs have 8
# nodes each (the run's group, three results' groups, four items), 2.5 ms a run, 25 s for 10,000.
# No reading node by node gets near 2 s for 10,000 runs (one node a run already costs 3 s), so
# CheckpointedHDF5StorageService also writes an index of the runs' numbers, which runs_table reads
# first, in two reads.
#
# The index. As the service stores a leaf inside a run's group, it appends the leaf's numbers, as
# the leaf gave them to pypet (its _store()), to three plain PyTables nodes in the trajectory's
# group. pypet's loading walks only the groups under a trajectory's group, so it never sees them:
#   TRAJ/brian2pet_items   a table (_INDEX_ITEM), a row per kind of item, as the runs share them:
#                          the result's name relative to the run's group ('statistics.rates'); the
#                          item's name as pypet stores it ('e__brn2__value'); its unit's text
#                          (section 1), '' for a plain number; its dtype, number of dimensions, and
#                          pypet's collection and scalar type (what pypet's attributes
#                          SRVC_DATA_COLL_TYPE and _SCALAR_TYPE hold)
#   TRAJ/brian2pet_runs    a table (_INDEX_ROW), a row per item of a run: the run's index, what the
#                          row says (below), its kind of item (a row of brian2pet_items), its
#                          shape, and where its numbers start in brian2pet_values
#   TRAJ/brian2pet_values  a float64 EArray: every row's numbers, flattened, one after another
# Rows are only appended, and a later row counts over an earlier one. Besides items, a row may say:
#   _FROM_NODES  read this run's result from its nodes: it holds what the index does not (text, a
#                pickle, a class or annotation a check must see, more than _MAX_INDEXED_SIZE
#                numbers, items stored before, items deleted);
#   _REMOVED     this run's result, group of results ('' : the whole run) left the file: its
#                earlier rows no longer count (pypet's deletions, remove_from_file, prepare_resume).
# The rows are written in the leaf's own store, so the marker and the checkpoint (7.2) cover them
# as the file: a kill takes the file and its index back together. runs_table keeps each item's
# last row that counts, for runs whose group the file holds, and reads from the nodes any named
# result that the index lacks for a run (files of pypet, pypet.brian2 or an older brian2pet have
# no index). The index holds numbers, booleans and numeric arrays of at most _MAX_INDEXED_SIZE
# elements: what it saves is a fixed ~0.3 ms an item, whatever its size, while runs_table reads it
# whole whatever the results named, and the copy doubles the item on disk. A thousand numbers (8 KB)
# keeps a table's cells (counts, rates, a trace, a rate per neuron of a small group) and leaves out
# the monitors' spikes and traces, which figures read a run at a time.
# The nodes are not compressed: every store rewrites their last chunk, and a compressed chunk that
# grows moves, leaving space that HDF5 does not reuse once the file was closed (19 MB for the
# benchmark's 10,000 runs, with rows that held their texts). Uncompressed, a chunk stays in place.
# Measured on the benchmark's 10,000-run file (python ../shared/bench/many_runs.py --runs 10000,
# Python 3.11, 2 cores): runs_table of its three results 0.7 s from the index, 22.5 s from the
# nodes; the index costs a store some 6 ms (13.4 ms a run at the start of 2,000 runs, 7.6 without).

_BRIAN2_VALUE, _BRIAN2_UNIT = "__brn2__value", "__brn2__unit"  # section 2's item names
_STORED_COLUMN = "stored"
_INDEX_ITEMS, _INDEX_TABLE, _INDEX_VALUES = "brian2pet_items", "brian2pet_runs", "brian2pet_values"
_ITEM, _FROM_NODES, _REMOVED = 0, 1, 2  # what an index row says (its column 'state')
_MAX_INDEXED_SIZE = 1000
_MAX_INDEXED_DIMENSIONS = 4
_INDEX_ITEM = np.dtype([
    ("result", "S200"), ("item", "S100"), ("unit", "S100"), ("dtype", "S4"),
    ("collection", "S16"), ("scalar_type", "S16"), ("ndim", "i1"),
])
_INDEX_ROW = np.dtype([
    ("run", "<i8"), ("state", "i1"), ("item", "<i4"), ("shape", "<i4", (_MAX_INDEXED_DIMENSIONS,)),
    ("start", "<i8"),
])
# Numbers that float64 holds exactly, in this machine's byte order: booleans, integers (checked to
# be within 2**53), floats of up to 64 bits.
_INDEXED_DTYPES = {np.dtype(code).str for code in "?bBhHiIlLqQefd"}
_EXACT_INTEGERS = 2 ** 53
_INDEXED_COLLECTIONS = ("COLL_SCALAR", "COLL_LIST", "COLL_TUPLE", "COLL_NDARRAY")
# pypet's names of the numeric scalar types ('' : none, for an array)
_INDEXED_TYPE_NAMES = {"", *(name for name, kind in pypetconstants.PARAMETERTYPEDICT.items()
                             if issubclass(kind, (int, float, np.bool_, np.integer, np.floating)))}


def _place_in_runs(path, trajectory_name):
    """(run index, name of the result relative to the run's group, '' for the run's group itself)
    of the HDF5 node ``path`` where runs_table reads runs (TRAJ/results/runs/[SET/]RUN/...), or
    None elsewhere."""
    prefix = f"/{trajectory_name}/results/runs/"
    if not path.startswith(prefix):
        return None
    names = path[len(prefix):].split("/")
    if len(names) > 1 and names[0].startswith(pypetconstants.SET_NAME):
        names = names[1:]
    idx = _run_index(names[0])
    return None if idx is None else (idx, ".".join(names[1:]))


def _indexable(value):
    """(numbers, pypet's collection type, scalar type name) of an item the index holds, or None.
    The collection and scalar type follow pypet's rules (_all_set_attributes_to_recall_natives in
    pypet 0.6.1 and 0.7.0), so that reading them gives what reading the item's node gives."""
    kind = type(value)
    if kind is np.ndarray:
        numbers, collection, type_name = value, "COLL_NDARRAY", ""
    elif kind in (list, tuple):
        numbers = np.asarray(value)  # as PyTables turns a list into an array
        collection = "COLL_LIST" if kind is list else "COLL_TUPLE"
        type_name = type(value[0]).__name__ if value else ""
        if numbers.ndim != 1:
            return None
    elif kind in pypetconstants.PARAMETER_SUPPORTED_DATA:
        numbers, collection, type_name = np.asarray(value), "COLL_SCALAR", kind.__name__
    else:
        return None
    if (numbers.dtype.str not in _INDEXED_DTYPES or numbers.size > _MAX_INDEXED_SIZE
            or numbers.ndim > _MAX_INDEXED_DIMENSIONS
            or type_name not in _INDEXED_TYPE_NAMES):
        return None
    if numbers.dtype.kind in "iu" and numbers.size and (
            numbers.min() < -_EXACT_INTEGERS or numbers.max() > _EXACT_INTEGERS):
        return None
    return numbers, collection, type_name


def _index_rows(run, result, store_dict, store_flags):
    """The index rows for the items ``store_dict`` (None: items the index cannot hold) of a run's
    result, each (run, state, kind of item as a row of brian2pet_items, shape, numbers): a row per
    item, or one _FROM_NODES row if any item is not indexable."""
    result = result.encode()
    from_nodes = [_marker_row(run, _FROM_NODES, result)]
    if store_dict is None:
        return from_nodes
    rows = []
    for key, value in store_dict.items():
        unit = ""
        if key.endswith(_BRIAN2_UNIT):
            if key[:-len(_BRIAN2_UNIT)] + _BRIAN2_VALUE not in store_dict:
                return from_nodes  # a unit without its value: as the nodes have it
            continue
        if key.endswith(_BRIAN2_VALUE):
            unit = store_dict.get(key[:-len(_BRIAN2_VALUE)] + _BRIAN2_UNIT)
            if not isinstance(unit, str):
                return from_nodes
        found = None
        if store_flags.get(key) in (HDF5StorageService.ARRAY, HDF5StorageService.CARRAY,
                                    HDF5StorageService.EARRAY) and "." not in key:
            found = _indexable(value)  # other flags: tables, pandas, VLArrays, nested groups
        if found is None:
            return from_nodes
        data, collection, type_name = found
        kind = (result, key.encode(), unit.encode(), data.dtype.str.encode(), collection.encode(),
                type_name.encode(), data.ndim)
        if any(len(text) > _INDEX_ITEM[column].itemsize  # too long for a column: not indexed
               for text, column in zip(kind[:3], _INDEX_ITEM.names)):
            return from_nodes
        shape = list(data.shape) + [0] * (_MAX_INDEXED_DIMENSIONS - data.ndim)
        rows.append((run, _ITEM, kind, shape, data.reshape(-1)))
    return rows


def _marker_row(run, state, result):
    """A row that says _FROM_NODES or _REMOVED of a run's ``result`` (bytes)."""
    return run, state, (result, b"", b"", b"", b"", b"", 0), [0] * _MAX_INDEXED_DIMENSIONS, None


def _append_to_index(h5, trajectory_group, rows):
    """Append ``rows`` (as _index_rows gives them) to the index in ``trajectory_group`` of the open
    file ``h5``, making the index if there is none and a row holds an item."""
    import tables

    if not rows:
        return
    if _INDEX_TABLE in trajectory_group:
        kinds, table, values = (trajectory_group._f_get_child(name)
                                for name in (_INDEX_ITEMS, _INDEX_TABLE, _INDEX_VALUES))
    elif not any(row[1] == _ITEM for row in rows):
        return  # no index to amend
    else:
        # expectedrows sets the chunks: a few kinds of item, ~100,000 rows (30,000 runs of three
        # items) and their numbers fill a few chunks each.
        kinds = h5.create_table(trajectory_group, _INDEX_ITEMS, description=_INDEX_ITEM,
                                expectedrows=100)
        table = h5.create_table(trajectory_group, _INDEX_TABLE, description=_INDEX_ROW,
                                expectedrows=100_000)
        values = h5.create_earray(trajectory_group, _INDEX_VALUES, atom=tables.Float64Atom(),
                                  shape=(0,), expectedrows=1_000_000)
    known = {kind: number for number, kind in enumerate(kinds.read().tolist())}
    new_kinds, full_rows, numbers, start = [], [], [], values.nrows
    for run, state, kind, shape, data in rows:
        if kind not in known:
            known[kind] = len(known)
            new_kinds.append(kind)
        full_rows.append((run, state, known[kind], shape, start))
        if data is not None:
            numbers.append(data)
            start += data.size
    if new_kinds:
        kinds.append(np.array(new_kinds, dtype=_INDEX_ITEM))
    if numbers:
        values.append(np.concatenate(numbers).astype(np.float64))
    table.append(np.array(full_rows, dtype=_INDEX_ROW))


def _removed_from_index(h5, path):
    """The _REMOVED rows that removing the HDF5 node ``path`` of an indexed trajectory calls for:
    the run's result or group below a run, or every run below ``path``."""
    trajectory_name = path.strip("/").split("/")[0]
    if (path.strip("/") == trajectory_name
            or f"/{trajectory_name}/{_INDEX_TABLE}" not in h5):  # the index goes with it, or none
        return []
    place = _place_in_runs(path, trajectory_name)
    if place is not None:
        return [_marker_row(place[0], _REMOVED, place[1].encode())]
    runs = f"/{trajectory_name}/results/runs"
    if not (runs.startswith(path + "/") or path == runs or path.startswith(runs + "/")):
        return []  # elsewhere: parameters, derived parameters, ...
    removed = []
    for held in (held for paths in _groups_of_runs(h5, trajectory_name).values()
                 for held in paths if held.startswith(path + "/")):
        place = _place_in_runs(held, trajectory_name)
        if place is not None:  # a run's group where runs_table reads runs
            removed.append(_marker_row(place[0], _REMOVED, b""))
    return removed


def runs_table(filename, trajectory_name, results=(), from_nodes=False):
    """The runs of exploration ``trajectory_name`` in ``filename`` as a pandas DataFrame: one row
    per run, indexed by the run's index (named 'run'), with

      - a column per explored parameter, labelled with its name without 'parameters.' ('model.tau');
      - a column per item of each result named in ``results``, names relative to a run's group
        (results=('statistics.rates', 'count') reads results.runs.run_00000042.statistics.rates
        and ...count). A result whose one item is named as the result (pypet's
        f_add_result('count', 7)) gives one column labelled with the name as given; any other
        item gives 'NAME.ITEM' ('statistics.rates.e');
      - 'stored': whether the run stored at least one of the named results. A run that stored
        none (it failed, was cancelled, never ran) keeps its row, with NaN or None for its results.

    A Brian2 quantity's label ends with its unit in SI, as Brian2's get_unit writes it, and its
    cells hold the numbers in that unit, as stored: 'model.tau (s)', 'statistics.rates.e (Hz)'.
    Arrays, lists and a table's columns go into cells as they are. Reads files written by brian2pet
    (runs in pypet's run sets, and an index of their numbers that makes reading fast) and by pypet
    or pypet.brian2 (runs side by side), and never unpickles or evaluates anything: every node it
    reads is checked as check_file checks it. Raises FileRefused in one line naming the file and the
    node for a file that fails the check, and ValueError for a name in ``results`` that names a
    group of results rather than one.

    The index knows what brian2pet's storage service stored and deleted. A run's result that
    another writer (pypet's own service, e.g. f_store_item(..., overwrite=True) after pypet's
    load_trajectory) overwrote or deleted afterwards keeps its indexed numbers: pass
    ``from_nodes=True`` to read every result from its nodes, as for a file without an index
    (slower: some 2.5 ms a run). Results that another writer added are read from their nodes.
    """
    import pandas
    import tables

    names = list(dict.fromkeys([results] if isinstance(results, str) else results))
    check_file(filename, [trajectory_name], nodes=())  # missing, not HDF5, damaged, no trajectory
    try:
        with pickles_refused(), tables.open_file(filename, "r") as h5:
            reader = _RunsReader(h5, filename, trajectory_name)
            overview = h5.get_node(f"/{trajectory_name}/overview")
            run_names = [name.decode() for name in overview.runs.col("name")]
            columns = [reader.explored_values(name, len(run_names))
                       for name in _explored_names(overview)]
            run_groups = reader.run_groups()
            if not from_nodes:
                reader.read_index()
            stored, found = reader.results(run_names, run_groups, names)
    except (tables.HDF5ExtError, OSError) as error:
        raise FileRefused(
            f"{filename}: damaged, HDF5 cannot read it: {_hdf5_reason(error)}"
        ) from None
    columns = [(_STORED_COLUMN, stored), *columns, *found]
    labels = [label for label, _ in columns]
    if len(set(labels)) < len(labels):
        raise ValueError(f"Two columns of {filename}'s table would be labelled alike: {labels}")
    return pandas.DataFrame({label: _without_missing(cells) for label, cells in columns},
                            index=pandas.RangeIndex(len(run_names), name="run"))


_MISSING = object()  # a run without the result, until the cells go into the table


def _without_missing(cells):
    """The cells of a column as pandas takes them: NaN for a missing number, None for others."""
    if isinstance(cells, np.ndarray):
        return cells
    numbers = (bool, int, float, np.number, np.bool_)
    if all(cell is _MISSING or isinstance(cell, numbers) for cell in cells):
        return [np.nan if cell is _MISSING else cell for cell in cells]
    return [None if cell is _MISSING else cell for cell in cells]


def _explored_names(overview):
    if "explorations" not in overview:  # older pypet files: no explored parameter to show
        return []
    return [name.decode() for name in overview.explorations.col("explorations")]


class _RunsReader:
    """Reads the nodes of one trajectory for runs_table, each checked as check_file checks it."""

    def __init__(self, h5, filename, trajectory_name):
        self.h5, self.filename, self.trajectory_name = h5, filename, trajectory_name
        self.unit_labels = {}  # unit text: its label
        self.indexed = {}  # run index: {result name: {item name as stored: index row}}
        self.from_nodes = set()  # (run index, result name) that the index sends to the nodes

    def refused(self, node, problem):
        # An item of a container is reported by the container's name.
        named = node._v_parent if "SRVC_LEAF" in node._v_parent._v_attrs else node
        where = named._v_pathname[len(self.trajectory_name) + 2:].replace("/", ".")
        return FileRefused(f"{self.filename}: {self.trajectory_name}.{where}: {problem}")

    def checked(self, node):
        """``node``, unless check_file would refuse it: then FileRefused, as check_file words it."""
        problem = _unsafe_node(node)
        if problem:
            raise self.refused(node, f"{problem}; refused (it could run code)")
        return node

    def child(self, group, name):
        """The checked node ``name`` of ``group``, or None."""
        # By the names PyTables listed when it opened the group: `name in group` would ask HDF5.
        return self.checked(self.h5.get_node(group, name)) if name in group._v_children else None

    def run_groups(self):
        """{run name: its group}, in the run sets or side by side under results.runs."""
        where = f"/{self.trajectory_name}/results/runs"
        found = {}
        if where in self.h5:
            runs = self.checked(self.h5.get_node(where))
            for name in list(runs._v_groups):
                if _run_index(name) is not None:
                    found[name] = (runs, name)
                elif name.startswith(pypetconstants.SET_NAME):
                    run_set = self.child(runs, name)
                    found.update((run, (run_set, run)) for run in run_set._v_groups)
        return found

    def explored_values(self, full_name, n_runs):
        """(label, the explored values of parameter ``full_name``, one per run)."""
        path = f"/{self.trajectory_name}/" + full_name.replace(".", "/")
        if path not in self.h5:
            # e.g. an exploration that failed before pypet stored its parameters: the overview
            # names them, the file holds none. No table of runs without what they explored.
            raise FileRefused(f"{self.filename}: {self.trajectory_name}.{full_name}: explored, "
                              f"but the file holds no such parameter (was the trajectory stored "
                              f"in full?)")
        group = self.checked(self.h5.get_node(path))
        label = full_name.split(".", 1)[1] if full_name.startswith("parameters.") else full_name
        brian2 = self.child(group, "explored_data__brn2__")
        table = brian2 if brian2 is not None else self.child(group, "explored_data")
        if table is None:
            raise FileRefused(f"{self.filename}: {self.trajectory_name}.{full_name}: explored, "
                              f"but holds no explored values")
        column = table.colnames[0]
        values = _native(table.col(column), table, f"SRVC_COLUMN_{column}_", many=True)
        if brian2 is not None and "data__brn2__" in group:
            data = self.child(group, "data__brn2__")
            label = self.labelled(label, data.col("unit")[0].decode(), data)
        if len(values) != n_runs:
            raise FileRefused(f"{self.filename}: {self.trajectory_name}.{full_name}: "
                              f"{len(values)} explored values for {n_runs} runs")
        return label, values

    def read_index(self):
        """Read the trajectory's index of runs, if it has one (see the comment above runs_table):
        which items of which runs' results it holds, and their values."""
        import tables

        trajectory = self.h5.get_node(f"/{self.trajectory_name}")
        if _INDEX_TABLE not in trajectory._v_children:
            return
        nodes = [self.child(trajectory, name)
                 for name in (_INDEX_ITEMS, _INDEX_TABLE, _INDEX_VALUES)]
        kinds, table, values = nodes
        if (any(node is None for node in nodes) or not isinstance(kinds, tables.Table)
                or not isinstance(table, tables.Table) or kinds.dtype != _INDEX_ITEM
                or table.dtype != _INDEX_ROW or values.dtype != np.float64 or values.ndim != 1):
            raise self.refused(table, "not brian2pet's index of runs (its nodes, columns or values "
                                      "differ); refused")
        self.kinds = [self.kind_of_item(kinds, number, kind)
                      for number, kind in enumerate(kinds.read().tolist())]
        self.rows, self.values = table.read().tolist(), values.read()
        for number, (run, state, kind, *_) in enumerate(self.rows):
            if not 0 <= kind < len(self.kinds):
                raise self.refused(table, f"row {number} names no kind of item; refused")
            result, item, _, dtype = self.kinds[kind][:4]
            if state == _ITEM and dtype is None:
                raise self.refused(table, f"row {number} names an item without numbers; refused")
            if state == _ITEM:
                self.indexed.setdefault(run, {}).setdefault(result, {})[item] = number
            elif state == _FROM_NODES:
                self.from_nodes.add((run, result))
            elif state == _REMOVED:
                within = result + "."
                kept = {name: items for name, items in self.indexed.get(run, {}).items()
                        if result and name != result and not name.startswith(within)}
                self.indexed[run] = kept
                self.from_nodes = {(idx, name) for idx, name in self.from_nodes
                                   if idx != run or (result and name != result
                                                     and not name.startswith(within))}

    def kind_of_item(self, kinds, number, kind):
        """A row of brian2pet_items as (result, item, unit, dtype, collection, scalar type name,
        dimensions), checked as a node is: it describes numbers, and nothing else."""
        *texts, ndim = kind
        try:
            result, item, unit, dtype, collection, type_name = (text.decode() for text in texts)
        except UnicodeDecodeError:
            raise self.refused(kinds, f"row {number} holds text that is not UTF-8; refused"
                               ) from None
        if kind[1:] == (b"", b"", b"", b"", b"", 0):  # what a _FROM_NODES or _REMOVED row names
            return result, "", "", None, "", "", 0
        if (dtype not in _INDEXED_DTYPES or collection not in _INDEXED_COLLECTIONS
                or type_name not in _INDEXED_TYPE_NAMES
                or not 0 <= ndim <= _MAX_INDEXED_DIMENSIONS):
            raise self.refused(kinds, f"row {number} describes no numbers ({kind}); refused")
        return result, item, unit, np.dtype(dtype), collection, type_name, ndim

    def results(self, run_names, run_groups, names):
        """Whether each run stored any of the results ``names``, and [(label, one cell per run)]
        (``run_groups``: {run name: its (group, name)} in the file). A cell is _MISSING where
        a run has no such result; a name that no run has gets one column, all _MISSING."""
        stored = np.zeros(len(run_names), dtype=bool)
        columns = {name: {} for name in names}
        for idx, run_name in enumerate(run_names):
            place, run = run_groups.get(run_name), None  # the run's group, opened if need be
            if place is None:
                continue  # nothing stored; rows of the index for it no longer count
            indexed = self.indexed.get(idx, {})
            for name in names:
                if name in indexed and (idx, name) not in self.from_nodes:
                    items = self.indexed_items(indexed[name])
                else:
                    run = self.child(*place) if run is None else run
                    result = self.result_group(run, name)
                    if result is None:
                        continue
                    items = self.items(result)
                stored[idx] = True
                for item, (value, unit, source) in items:
                    label = name if item == name.rsplit(".", 1)[-1] else f"{name}.{item}"
                    if unit is not None:
                        label = self.labelled(label, unit, source)
                    columns[name].setdefault(label, [_MISSING] * len(run_names))[idx] = value
        found = []
        for name in names:
            found.extend(columns[name].items() or [(name, [_MISSING] * len(run_names))])
        return stored, found

    def result_group(self, run, name):
        """The checked group of result ``name`` (dotted) in the group of a ``run``, or None."""
        group = run
        for part in name.split("."):
            group = self.child(group, part)
            if group is None:
                return None
        if "SRVC_LEAF" not in group._v_attrs:
            examples = ", ".join(f"'{name}.{child}'" for child in sorted(group._v_children)[:2])
            raise ValueError(f"{self.filename}: {group._v_pathname} is a group of results, not a "
                             f"result; name the results in it ({examples}, ...)")
        return group

    def items(self, result):
        """[(item name, (value, unit text or None, its node))] of a result's group, by name."""
        found = []
        for leaf_name in sorted(result._v_children):  # groups and links too: the check refuses them
            leaf = self.child(result, leaf_name)
            if leaf_name.endswith(_BRIAN2_UNIT):
                continue  # read with its value
            if leaf_name.endswith(_BRIAN2_VALUE):
                item = leaf_name[:-len(_BRIAN2_VALUE)]
                unit = self.child(result, item + _BRIAN2_UNIT)
                found.append((item, (_read_item(leaf), unit and _read_item(unit), unit)))
            else:
                found.append((leaf_name, (_read_item(leaf), None, leaf)))
        return found

    def indexed_items(self, rows_by_item):
        """As items() gives them, from the index: {item name as stored: row number}."""
        found = []
        for stored_name in sorted(rows_by_item):  # by name, as pypet named the nodes
            number = rows_by_item[stored_name]
            _, _, kind, shape, start = self.rows[number]
            _, _, unit, dtype, collection, type_name, ndim = self.kinds[kind]
            shape = tuple(shape[:ndim])
            length = int(np.prod(shape))
            if min(shape, default=0) < 0 or start < 0 or start + length > len(self.values):
                index = self.h5.get_node(f"/{self.trajectory_name}/{_INDEX_TABLE}")
                raise self.refused(index, f"row {number} describes no numbers of the index "
                                          f"(shape {shape} from {start}); refused")
            data = self.values[start:start + length].astype(dtype).reshape(shape)
            value = _natively(data[()] if ndim == 0 else data, collection, type_name)
            where = f"{_INDEX_TABLE}, row {number}"
            if stored_name.endswith(_BRIAN2_VALUE):
                found.append((stored_name[:-len(_BRIAN2_VALUE)], (value, unit, where)))
            else:
                found.append((stored_name, (value, None, where)))
        return found

    def labelled(self, label, unit_text, source):
        """``label`` with the SI unit of ``unit_text`` (read from ``source``, a node or a place in
        the index) in brackets, or none for a plain number."""
        if unit_text not in self.unit_labels:
            try:
                dimensions = get_dimensions(unit_from_expression(unit_text))
            except (TypeError, ValueError) as error:
                where = (source if isinstance(source, str) else
                         source._v_pathname[len(self.trajectory_name) + 2:].replace("/", "."))
                raise FileRefused(f"{self.filename}: {self.trajectory_name}.{where}: {error}"
                                  ) from None
            self.unit_labels[unit_text] = (
                "" if dimensions is DIMENSIONLESS else f" ({get_unit(dimensions)})"
            )
        return label + self.unit_labels[unit_text]


def _read_item(leaf):
    """The value of an item of a result, as pypet stored it (leaves that pypet reads through pandas
    or pickle were refused by the check)."""
    if hasattr(leaf, "colnames"):  # a PyTables Table
        table = leaf.read()
        columns = {column: _native(table[column], leaf, f"SRVC_COLUMN_{column}_", many=True)
                   for column in table.dtype.names}
        if str(getattr(leaf._v_attrs, "SRVC_STORE", "")) == "DICT":  # a dict: one row
            return {column: values[0] for column, values in columns.items()}
        return columns
    return _native(leaf.read(), leaf, "SRVC_DATA_")


def _native(data, node, prefix, many=False):
    """``data`` read from ``node`` as the Python type that pypet stored it from (its attributes
    PREFIX COLL_TYPE and SCALAR_TYPE). ``many``: a table's column, one value per row."""
    if many:
        return [_native(value, node, prefix) for value in data]
    attributes = node._v_attrs
    return _natively(data, str(getattr(attributes, prefix + "COLL_TYPE", "")),
                     str(getattr(attributes, prefix + "SCALAR_TYPE", "")))


def _natively(data, collection, type_name):
    """``data`` as the Python type pypet stored it from, given pypet's collection type and scalar
    type name: text comes back as str, a scalar as a scalar, a list as a list."""
    as_type = str if type_name == "str" else pypetconstants.PARAMETERTYPEDICT.get(type_name)
    if collection == "COLL_SCALAR":
        return _as_type(data.item() if isinstance(data, np.ndarray) else data, as_type)
    if collection in ("COLL_LIST", "COLL_TUPLE"):
        items = [_as_type(item, as_type) for item in data]
        return items if collection == "COLL_LIST" else tuple(items)
    return data


def _as_type(value, as_type):
    if isinstance(value, bytes) and as_type is str:
        return value.decode()
    return value if as_type is None or as_type is str else as_type(value)


# ---------------------------------------------------------------------------------------------------
# 8. Compile once, sweep many: Brian2's standalone devices
#
# In runtime mode (sections 4 and 5) Python steps the network. Brian2's standalone devices instead
# turn a whole simulation into one program: cpp_standalone compiles it with a C++ compiler, and
# brian2cuda's cuda_standalone and brian2genn build on it. The program takes values for variables
# on its command line (Brian2's run_args), so ONE compiled binary serves every run of an
# exploration that changes only values. StandaloneNetworkManager does that with the spec's steps:
#
#   pre_build / pre_run_network   pre_build as in 7.3, and (pre_run_network) the pre-run; then the
#                                 first run's build() and its subruns (add_to_network, run,
#                                 remove_from_network) are recorded into the program; then every
#                                 run's build() is checked, and the program compiled, once.
#   run_network (every run)       build() acts, its values become the run's run_args, the program
#                                 runs in a results directory of its own (processes side by side),
#                                 then the analysers analyse the recorded subruns in order.
#
# What build() sets on a whole variable with a number or an array (`group.var = value`) becomes a
# run value: it never enters the program, which takes the run's values at one point, just before
# the run's build() (after pre_build and the pre-run); what only the first run's build() set (on
# the objects it made) is given to every run. Everything else is compiled in: objects build() makes
# are the first run's (make them when missing from network_dict, as
# `if 'stimulus' not in network_dict:`); values set by expressions, on part of a variable or on
# synapses, and namespaces must be the same in every run; the subrun steps see the first run's
# parameters. An explored parameter that would change the program is refused, naming it, before
# anything compiles: read by add_to_network or remove_from_network of the first run (also as a
# seed), or read by a build() to make objects (read in the first run's build(), but not by the
# builds that set values).
#
# A run's seed is a run value too. Where the first run's build() called brian2.seed(value), the
# program seeds its generators as Brian2's own seed code does (value + the thread's number, on
# cpp_standalone), but with the value the RUN's build() gave, read from an environment variable of
# the execution (BRIAN2PET_SEED_0, _1, ... one per call; empty for brian2.seed() without a value,
# which seeds from the system's entropy, as Brian2 does). So run k draws what a cpp_standalone
# script that calls seed(s_k) at that point draws. Everything before it is compiled in, the same
# in every run: the main script's seed (or, without one, a number drawn once), pre_build and the
# pre-run. Every run's build() calls seed as often, and at the same point among the steps that are
# compiled, as the first run's; a build() that seeds only while it makes objects (in the first
# run) gives every run the first run's seeds. Refused, naming the part: a seed outside 0..2**32-1
# (numpy's range in runtime mode), and a seed in build() on a device built on cpp_standalone (its
# program may seed otherwise; seed in the main script or pre_build there).
#
# Pickled copies of the manager (SCOOP's workers, pypet's resume; section 7.3) run the program
# that the original compiled, and never compile. A copy redoes pre_build and the pre-run on the
# Python side only, as the original did: it makes the device active and empty, gives it what the
# main script had put into the program before pre_build (its seed, the time step), takes the names
# that objects alive in the original's process had taken (Brian2 numbers default names after
# them), records the program, and lets Brian2 write its sources into a temporary folder, never
# into `directory`, which processes of many hosts share. Those sources must be the ones that the
# original compiled (it lists them, and the binary, in brian2pet_program.md5 after its compile);
# otherwise, or where the program cannot be seen, the copy's runs fail with an error naming the
# folder. So: `directory` must be on a file system that every host sees at the same path (SCOOP
# asks the same of the script); pre_build, Brian2's preferences and defaultclock.dt must be the
# same in every process (set them on import or in pre_build; a pre_build that seeds otherwise in
# another process is refused so); hosts of different CPUs need a program compiled without
# -march=native (prefs.codegen.cpp.extra_compile_args_gcc). After a pre-run a copy executes the
# program once more, with the first run's values (the original's, kept by name), to analyse the
# pre-run as the original did: its analysers may put into network_dict what every run reads. A
# copy writes into `directory` only its runs' results directories (and Brian2 the files of array
# run values, under a lock).
#
# Differences from runtime mode, as the standalone devices allow no other:
#   - The analysers run after the program, subrun by subrun: network.t is the end of the subrun
#     they analyse, but a group's state and a monitor's data are what they hold at the end of the
#     run, and network_dict is as the subruns' steps left it at the end (keep what add_to_network
#     notes per subrun under the subrun's name).
#   - Emptying subrun_list in analyse() leaves the later subruns unanalysed, though they were
#     simulated; adding a subrun there is an error naming the analyser.
#   - Every run starts from the pre-run's state because the program simulates the pre-run anew each
#     time, from the same seed; the pre-run is analysed from the first run's execution. It also
#     makes every object anew, pre-built or not (the example's 7 million synapses: 0.8 s a run),
#     which runtime mode does once: short runs gain less than long ones.
#   - Runs that do not seed themselves draw the same random numbers: every execution starts from
#     the same seed (in runtime mode they start from the same random state).
# ---------------------------------------------------------------------------------------------------


# Imported here rather than at the top: sections 1-5 need none of it.
import hashlib  # noqa: E402
import numbers  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import types  # noqa: E402

from brian2.core.names import Nameable  # noqa: E402
from brian2.core.variables import VariableView  # noqa: E402
from brian2.devices.cpp_standalone.device import CPPStandaloneDevice  # noqa: E402
from brian2.devices.device import all_devices, set_device  # noqa: E402


def _standalone_device():
    """The active Brian2 device, if it is a standalone one that builds when told (else an error)."""
    device = get_device()
    if not isinstance(device, CPPStandaloneDevice) or device.build_on_run:
        raise RuntimeError(
            "StandaloneNetworkManager needs a standalone device that builds when told: call "
            "brian2.set_device('cpp_standalone', build_on_run=False) before making the manager."
        )
    return device


# Where a run seeds, the program runs this instead of the line Brian2 compiles for seed(value)
# (CPPStandaloneDevice.generate_main_source, for main_queue's 'seed' entries: every thread's
# generator, one per thread in brian::_random_generators, seeded with value + thread number;
# without a value, RandomGenerator.seed() from std::random_device). Inserted with
# device.insert_code('main'), which keeps its place among the recorded steps; the value comes from
# the environment because Brian2's command-line run_args set only variables. Tested with Brian2
# 2.9 and 2.11, whose seeding code and templates are the same here.
_SEED_CODE = """\
{{
    const char* _brian2pet_seed = getenv("{variable}");
    for (size_t _i = 0; _i < brian::_random_generators.size(); _i++)
        if (_brian2pet_seed != NULL && _brian2pet_seed[0] != '\\0')
            brian::_random_generators[_i].seed(strtoul(_brian2pet_seed, NULL, 10) + _i);
        else
            brian::_random_generators[_i].seed();
}}"""

_SEED_STEP = ("brian2.seed()", "a run value")  # a seed among the compiled steps of a build()


def _seed_variable(index):
    """The environment variable that carries the value of the program's seed number ``index``."""
    return f"BRIAN2PET_SEED_{index}"


def _checked_seed(part_name, value):
    """``value`` as a seed for the program: None or an int that numpy (runtime mode) would take."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and (
            0 <= int(value) < 2**32):
        return int(value)
    raise ValueError(
        f"{part_name}.build() calls brian2.seed({value!r}): a seed is None or an integer from 0 to "
        f"2**32 - 1 (as in runtime mode, where numpy takes it)."
    )


@contextlib.contextmanager
def _run_values_taken(record_others, existing, steps):
    """Inside, setting a whole fixed-size variable to a number or an array is noted in ``taken``
    (the run values) instead of done. Any other set (an expression, part of a variable, a synaptic
    variable) is recorded into the program if ``record_others``, and noted in ``steps`` if its
    object is in ``existing`` (names; the sets of an object being made are part of making it).
    A value set after an expression or part of the same variable is an error: the program takes
    the run values before everything the build records, so it would come before it, not after.

    Reaches into Brian2 (2.9 and 2.11): every set of a variable, `group.v = ...` and
    `group.v[...] = ...`, goes through VariableView.set_item, replaced for the block.
    """
    taken, compiled = [], set()
    set_item = VariableView.set_item

    def note(view, item, value, level=0, namespace=None):
        variable = view.variable
        name = f"{view.group_name}.{view.name}"
        whole = (isinstance(item, str) and item == "True") or (
            isinstance(item, slice) and item == slice(None))
        if whole and not isinstance(value, str) and not (variable.dynamic or variable.read_only):
            if name in compiled:
                raise RuntimeError(
                    f"{name} is set to a value after an expression or a part of it was set in the "
                    f"same build(): on a standalone device the run's values take effect before "
                    f"the build's other steps. Set the value first, or set it with an expression."
                )
            taken.append((view, value))
            return
        compiled.add(name)
        if view.group_name in existing:
            where = "" if whole else f"[{_fingerprint(item)}]"
            steps.append((f"{name}{where}", _fingerprint(value)))
        if record_others:
            set_item(view, item, value, level=level + 1, namespace=namespace)

    VariableView.set_item = note
    try:
        yield taken
    finally:
        VariableView.set_item = set_item


def _fingerprint(value):
    """Text that tells two set values (or indices) apart; arrays by their bytes, not their repr."""
    if isinstance(value, np.ndarray):
        return f"{value.shape} {value.dtype} {hashlib.md5(np.ascontiguousarray(value)).hexdigest()}"
    return repr(value)


@contextlib.contextmanager
def _explored_reads(traj):
    """Inside, the full names of the explored parameters whose value is read are collected.

    Reaches into pypet (0.6.1 and 0.7.0): parameters give their value through Parameter.f_get
    (also behind natural naming, `traj.R_ee`), replaced for the block.
    """
    explored = set(traj.f_get_explored_parameters(copy=False))
    reads = set()
    f_get = Parameter.f_get

    def noted_f_get(parameter):
        if parameter.v_full_name in explored:
            reads.add(parameter.v_full_name)
        return f_get(parameter)

    Parameter.f_get = noted_f_get
    try:
        yield reads
    finally:
        Parameter.f_get = f_get


class _RunBuild:
    """What the parts' build() did in one run: per part (by class name), the explored parameters it
    read, the run values it set (taken), its seeds, what else it did that a program compiles (other
    sets, seeds where they came, namespaces changed: ``compiled``, as (what, fingerprint) pairs) and
    the objects it made.

    ``first``: the build of the first run, which makes the program (its compiled steps are recorded,
    its seeds become the program's seed points). The other builds only note; ``namespaces`` are the
    program's, which they must leave as they are.
    """

    def __init__(self, manager, traj, brian_list, network_dict, first, namespaces=()):
        self.reads, self.taken, self.compiled, self.seeds, self.made = {}, {}, {}, {}, {}
        device = get_device()
        seed_points = 0
        for part in manager._parts_in_order():
            name = type(part).__name__
            before = _live_brian_objects()
            steps, seeds = [], []

            def seed(value=None, name=name, steps=steps, seeds=seeds):
                nonlocal seed_points
                if type(device) is not CPPStandaloneDevice:
                    raise RuntimeError(
                        f"{name}.build() calls brian2.seed(): on {type(device).__name__} brian2pet "
                        f"cannot make a seed a run value (it does so on cpp_standalone). Seed "
                        f"in the main script or in pre_build instead."
                    )
                seeds.append(_checked_seed(name, value))
                steps.append(_SEED_STEP)
                if first:
                    device.insert_code("main", _SEED_CODE.format(
                        variable=_seed_variable(seed_points)))
                    seed_points += 1

            device.seed = seed
            try:
                existing = {obj.name for obj in before}
                with _explored_reads(traj) as reads, _run_values_taken(first, existing,
                                                                      steps) as taken:
                    part.build(traj, brian_list, network_dict)
                    _check_brian_list(part, "build", brian_list)
            finally:
                del device.seed  # the device's own method again
            for obj, entries in dict(namespaces).items():
                if obj.namespace != entries:
                    steps.append((f"the namespace of {obj.name}", "changed"))
                    obj.namespace.clear()
                    obj.namespace.update(entries)
            self.reads[name], self.taken[name], self.compiled[name] = reads, taken, steps
            self.seeds[name] = seeds
            self.made[name] = _live_brian_objects() - before

    def run_values(self):
        """{(object name, variable name): (variable view, value)}, the last set of each."""
        return {(view.group_name, view.name): (view, value)
                for taken in self.taken.values() for view, value in taken}

    def seed_values(self, first):
        """The run's value for each of the program's seed points, which ``first`` made."""
        return [value for name in first.seeds for value in (self.seeds[name] or first.seeds[name])]


class _AnalysedLater:
    """Stands in for an analyser while the subruns are recorded into a program: its own
    add_to_network and remove_from_network are recorded; analyse notes the subrun and the time it
    ends at, to be analysed once the program ran."""

    def __init__(self, analyser, noted):
        self._analyser, self._noted = analyser, noted

    def __getattr__(self, name):
        return getattr(self._analyser, name)

    def analyse(self, traj, network, current_subrun, subrun_list, network_dict):
        if not self._noted or self._noted[-1][0] is not current_subrun:
            self._noted.append((current_subrun, network.t_))


# Written into the program's folder after a compile: what a pickled copy checks (see above).
_PROGRAM_LISTING = "brian2pet_program.md5"


def _md5_of(path, lines_sorted=False):
    """The md5 of a file's bytes, or of its lines in sorted order."""
    with open(path, "rb") as handle:
        data = handle.read()
    return hashlib.md5(b"\n".join(sorted(data.split(b"\n"))) if lines_sorted else data).hexdigest()


def _program_listing(device, directory):
    """Lines 'md5  name' of the files Brian2 generated for the program it recorded, written into
    ``directory`` by device.build. Reaches into Brian2 (2.9 and 2.11): device.writer lists the
    sources and headers that build() wrote, device.static_arrays the data compiled in.

    A file's md5 is that of its lines in sorted order: Brian2 writes some steps that do not depend
    on each other in an order that differs from process to process (in main.cpp, the times of the
    clocks, which it sets in the order of a set)."""
    names = (device.writer.source_files | device.writer.header_files | {"makefile"}
             | {os.path.join("static_arrays", name) for name in device.static_arrays})
    return [f"# Brian2 {brian2.__version__}"] + [
        f"{_md5_of(os.path.join(directory, name), lines_sorted=True)}  {name}"
        for name in sorted(names) if os.path.isfile(os.path.join(directory, name))]


def _names_taken():
    """The names of Brian2's objects alive in this process (Brian2 2.9 and 2.11 find a free name
    for a new object among those of Nameable.__instances__)."""
    return {obj.name for obj in (ref() for ref in Nameable.__instances__()) if obj is not None}


def _plain(value):
    """Whether ``value`` is made of numbers and text only (a main_queue entry a copy can take)."""
    if isinstance(value, (tuple, list)):
        return all(_plain(item) for item in value)
    return value is None or isinstance(value, (str, numbers.Number))


def _cannot_see(directory, what):
    return RuntimeError(
        f"The host {socket.gethostname()} cannot see the exploration's program in {directory}: "
        f"{what}. A pickled copy of a StandaloneNetworkManager (a SCOOP worker, a resumed "
        f"exploration) runs the program that the main script compiled into that folder; it must be "
        f"on a file system that every host sees at the same path."
    )


class StandaloneNetworkManager(NetworkManager):
    """A NetworkManager for Brian2's standalone devices: compile once, run the binary per run.

    Use it as NetworkManager after ``brian2.set_device('cpp_standalone', build_on_run=False)``;
    call ``pre_build(traj)`` or ``pre_run_network(traj)`` before ``env.run``: they record and
    compile the exploration's program (section 8 above says how, and what differs). ``directory``
    holds the program and, while a run's analysers read them, its results (``results_<run>``).
    A ``brian2.seed(value)`` in a component's build() seeds that run with ``value``.
    """

    def __init__(self, network_runner, component_list, analyser_list=(), network_constructor=None,
                 directory="standalone"):
        super().__init__(network_runner, component_list, analyser_list, network_constructor)
        self.directory = os.path.abspath(directory)  # the same for the copies in other folders
        self._program = None  # once compiled: the network, its dict and noted subruns, per part
        self._compiling_after_pre_run = False
        self._compiled_by_original = False  # True in a pickled copy: it only runs the program
        self._main_script_did = None  # to the device before pre_build (see pre_build)
        self._pre_run_values = None  # the run values and seeds the pre-run is analysed with
        self._names_held = []  # in a copy while it records: names taken in the original's process

    @property
    def compiles(self):
        """True where pre_build compiles the program; False in a pickled copy (a SCOOP worker, a
        resumed exploration), whose pre_build records the program to run the original's."""
        return not self._compiled_by_original

    def pre_build(self, traj):
        """pre_build as in spec 7.3; then, unless pre_run_network goes on to the pre-run, record the
        first run and compile the program (section 8)."""
        device = self._device_of_a_copy() if self._compiled_by_original else _standalone_device()
        # Brian2 numbers the names it makes (of code objects, of objects named by default) after
        # the names of the objects alive in the process, and a copy must record the names that the
        # original did: it takes, while it records, the names that were taken in the original's
        # process (an earlier exploration's objects that pypet or SCOOP still hold, say).
        _made_in_this_process.clear()
        gc.collect()
        if self._compiled_by_original:
            taken = set(self._main_script_did[2]) - _names_taken()
            self._names_held = [Nameable(name) for name in sorted(taken)]
        else:
            if not any(entry[0] == "seed" for entry in device.main_queue):
                # Without a seed the program would seed itself differently at every execution. The
                # number is drawn without moving numpy's generator (Brian2 2.9 and 2.11: main_queue
                # lists what the program will do, in order).
                state = np.random.get_state()
                device.seed(int(np.random.randint(2**31 - 1)))
                np.random.set_state(state)
            # What the main script did to the device, for copies to do alike: its time step, and
            # what it put into the program (the seed, the time step that set_device copied over).
            self._main_script_did = (device.defaultclock.dt, [
                entry for entry in device.main_queue if _plain(entry)], sorted(_names_taken()))
        super().pre_build(traj)
        if not self._compiling_after_pre_run:
            device.apply_run_args()
            self._compile(traj, noted_pre_run=None)

    def pre_run_network(self, traj):
        """pre_build (unless done), then record the pre-run and the first run, compile, and
        analyse the pre-run (section 8)."""
        if self._program is not None:
            raise RuntimeError(
                "pre_build compiled this exploration's program already, without a pre-run: on a "
                "standalone device call pre_run_network instead of pre_build, not after it."
            )
        self._compiling_after_pre_run = True
        if not self._pre_built:
            self.pre_build(traj)
        device = get_device()
        # Brian2 applies run values before the first Network.run unless told it did: they must
        # come after the pre-run, which is the same in every run (Brian2 2.9 and 2.11).
        device.run_args_applied = True
        noted_pre_run = self._record_subruns(traj, self._start.network, self._network_dict,
                                             pre_run=True)
        device.insert_code("main", "set_from_command_line(args);")
        self._pre_run = True
        self._compile(traj, noted_pre_run)

    def _take_start(self, network):
        # Brian2's store and restore are runtime-only: the program simulates the start anew in
        # every execution, from the same seed.
        self._start = types.SimpleNamespace(network=network)

    def _compile(self, traj, noted_pre_run):
        network = self._start.network
        copy = self._compiled_by_original
        # The first run's build() makes the program's objects; its values are taken, not compiled.
        # A copy's trajectory holds the parameters of one run only (pypet's v_full_copy), and is
        # at their defaults here (section 7.3): what the first run compiles cannot depend on
        # explored values (checked below in the original), and the check of the program finds
        # anything that would.
        if not copy:
            traj.v_idx = 0
        brian_list = list(self._brian_list)
        network_dict = {key: _copy_for_one_run(value) for key, value in self._network_dict.items()}
        first = _RunBuild(self, traj, brian_list, network_dict, first=True)
        network.add(*[obj for obj in brian_list if obj not in network.objects])
        with _explored_reads(traj) as reads:
            noted = self._record_subruns(traj, network, network_dict)
        if reads:
            raise _cannot_reach(reads, "is read by a subrun's add_to_network or "
                                       "remove_from_network, which are compiled once")
        namespaces = {obj: dict(obj.namespace) for obj in network
                      if isinstance(getattr(obj, "namespace", None), dict)}
        self._program = dict(network=network, network_dict=network_dict, noted=noted, first=first,
                             brian_list=brian_list, namespaces=namespaces)
        if copy:
            self._names_held = []  # the program is recorded
            self._use_the_compiled_program()
        else:
            # Every run's build() before anything compiles: same objects, same compiled sets.
            for index in range(len(traj)):
                traj.v_idx = index
                self._build_run(traj, check_reads=True)
            traj.f_restore_default()
            self._build_program()
        if noted_pre_run is None:
            return
        # The pre-run is analysed from an execution with the first run's values, whose results
        # stay for that run's analysers in the original. A copy executes with the same values
        # (kept by name, which it gives to its own variables), into results of its own.
        if copy:
            run_values, _, _ = self._build_run(traj)
            values, seeds = self._pre_run_values
            run_values = {view: values.get((view.group_name, view.name), value)
                          for view, value in run_values.items()}
            results = f"results_pre_run_{uuid.uuid4().hex}"
        else:
            traj.v_idx = 0
            run_values, seeds, _ = self._build_run(traj)
            traj.f_restore_default()
            self._pre_run_values = ({(view.group_name, view.name): value
                                     for view, value in run_values.items()}, seeds)
            results = "results_0"
        self._run_program(results, run_values, seeds)
        before = dict(self._network_dict)
        self._analyse(traj, network, self._network_dict, noted_pre_run)
        # What the pre-run's analysers put into network_dict, every run finds there too.
        self._program["network_dict"].update(
            (key, value) for key, value in self._network_dict.items()
            if key not in before or before[key] is not value)
        if copy:
            shutil.rmtree(os.path.join(self.directory, results), ignore_errors=True)
            self._results = None

    def _build_program(self):
        """Compile the recorded program into ``directory``, and list what a copy checks."""
        listing = os.path.join(self.directory, _PROGRAM_LISTING)
        if os.path.exists(listing):
            os.remove(listing)  # while the folder holds no finished program
        device = get_device()
        started = time.time()
        device.build(directory=self.directory, run=False, with_output=False)
        self._logger.info(f"Compiled the exploration's program in {time.time() - started:.1f} s")
        lines = _program_listing(device, self.directory)
        lines.append(f"{_md5_of(os.path.join(self.directory, 'main'))}  main")
        with open(listing + ".part", "w") as handle:
            handle.write("\n".join(lines) + "\n")
        os.replace(listing + ".part", listing)

    def _device_of_a_copy(self):
        """In a pickled copy: the original's device, active and empty, once the program is seen."""
        listing = os.path.join(self.directory, _PROGRAM_LISTING)
        if not os.path.isdir(self.directory):
            raise _cannot_see(self.directory, "the folder does not exist here")
        if not (os.path.isfile(listing) and os.path.isfile(os.path.join(self.directory, "main"))):
            raise _cannot_see(self.directory, f"the folder holds no program compiled by "
                                              f"brian2pet (main and {_PROGRAM_LISTING})")
        if not isinstance(get_device(), CPPStandaloneDevice):  # workers never ran the main script
            set_device(self._device_name, build_on_run=False)
        # Whatever this process recorded before (another exploration, the main script of a
        # resume) goes; then the device is as the main script left it before pre_build.
        device = _standalone_device()
        device.reinit()
        device.activate(build_on_run=False)
        dt, main_queue, _ = self._main_script_did
        device.defaultclock.dt = dt
        device.main_queue[:] = main_queue  # (without the set of dt just queued)
        return device

    def _use_the_compiled_program(self):
        """In a pickled copy: check that the program it recorded is the one in ``directory``
        (sources written by Brian2 into a temporary folder), then run that one."""
        device = get_device()
        with open(os.path.join(self.directory, _PROGRAM_LISTING)) as handle:
            compiled = handle.read().splitlines()
        with tempfile.TemporaryDirectory(prefix="brian2pet_sources_") as sources:
            device.build(directory=sources, compile=False, run=False, with_output=False)
            recorded = _program_listing(device, sources)
        device.project_dir = self.directory  # where Brian2 puts the files of array run values
        binary = [line for line in compiled if line.endswith("  main")]
        compiled = [line for line in compiled if not line.endswith("  main")]
        if recorded != compiled:
            differ = sorted(set(recorded) ^ set(compiled))[0]
            raise RuntimeError(
                f"The program in {self.directory} is not the one this process records "
                f"({differ.split(None, 1)[-1]} differs): the folder holds another exploration's "
                f"program, or pre_build, the pre-run or what the main script did before them "
                f"differs between processes (a seed, Brian2's preferences, defaultclock.dt, "
                f"Brian2's version). Make them the same in every process: set them on import, "
                f"or in pre_build."
            )
        if [f"{_md5_of(os.path.join(self.directory, 'main'))}  main"] != binary:
            raise _cannot_see(self.directory, "its binary `main` is not the one compiled from "
                                              "these sources (compiled again since?)")

    def _record_subruns(self, traj, network, network_dict, pre_run=False):
        """The runner's subruns into the program; returns them noted for analysis after it ran."""
        noted = []
        analysers = [_AnalysedLater(analyser, noted) for analyser in self.analysers]
        execute = (self.network_runner.execute_network_pre_run if pre_run
                   else self.network_runner.execute_network_run)
        execute(traj, network, network_dict, self.components, analysers)
        return noted

    def _build_run(self, traj, check_reads=False):
        """The run's build() on the program's objects: returns its run values, its seeds and its
        network_dict."""
        program = self._program
        brian_list = list(program["brian_list"])
        network_dict = {key: _copy_for_one_run(value)
                        for key, value in program["network_dict"].items()}
        run = _RunBuild(self, traj, brian_list, network_dict, first=False,
                        namespaces=program["namespaces"])
        first = program["first"]
        # Where the user sees it: before anything compiles, pre_build or pre_run_network builds
        # every run once more, the first one too; later, as the run itself.
        step = "pre_run_network" if self._compiling_after_pre_run else "pre_build"
        when = (f"in run {traj.v_idx}" if not check_reads
                else f"when {step} built the first run again" if traj.v_idx == 0
                else f"when {step} built run {traj.v_idx}")
        for name in run.reads:
            if check_reads and first.reads[name] - run.reads[name]:
                raise _cannot_reach(first.reads[name] - run.reads[name],
                                    f"is read by {name}.build() to make objects")
            if run.made[name]:
                made = ", ".join(sorted(obj.name for obj in run.made[name]))
                raise RuntimeError(
                    f"{name}.build() made {made} {when}, though the program already "
                    f"holds the first run's objects. On a standalone device make objects in "
                    f"build() only when they are missing from network_dict, e.g. if 'x' not in "
                    f"network_dict."
                )
            first_steps, run_steps = first.compiled[name], run.compiled[name]
            if first.seeds[name] and not run.seeds[name]:  # seeded as it made the first's objects
                first_steps = [step for step in first_steps if step != _SEED_STEP]
            if run_steps == first_steps:
                continue
            if [s for s in run_steps if s != _SEED_STEP] == [
                    s for s in first_steps if s != _SEED_STEP]:
                times = [{0: "not at all", 1: "once"}.get(len(seeds), f"{len(seeds)} times")
                         for seeds in (run.seeds[name], first.seeds[name])]
                raise RuntimeError(
                    f"{name}.build() calls brian2.seed() {times[0]} {when} and "
                    f"{times[1]} in the first run, or at another point: the program seeds where "
                    f"the first run's build() did. Call it as often, and at the same point, in "
                    f"every run."
                )
            what = sorted(set(run_steps) ^ set(first_steps))[0][0]
            raise RuntimeError(
                f"{name}.build() sets {what} differently {when} than in the first "
                f"run, but the program holds the first run's: only a whole variable set to a "
                f"number or an array becomes a run value. Use a variable "
                f"('x : 1 (shared, constant)') set in build() for what changes from run to run."
            )
        # What only the first run's build() sets (when it made the objects) holds for every run.
        values = {**first.run_values(), **run.run_values()}
        return dict(values.values()), run.seed_values(first), network_dict

    def run_network(self, traj):
        """One run: build() acts, the program runs with the run's values, the analysers analyse."""
        if self._copy_redoes is not None:
            _redo_in_this_process(self, traj)
            if self._program is None:  # it took over the start made in this process, and so
                # the program recorded with it
                made = _made_in_this_process[self._exploration]
                made = made() if isinstance(made, weakref.ref) else made
                self._program, self._results = made._program, made._results
        if self._program is None:
            raise RuntimeError(
                "On a standalone device call pre_build(traj) or pre_run_network(traj) before "
                "env.run: they compile the exploration's program once for all runs."
            )
        run_values, seeds, network_dict = self._build_run(traj)
        results = f"results_{traj.v_idx}"
        if self._results != results:  # else pre_run_network ran this run already
            self._run_program(results, run_values, seeds)
        try:
            self._analyse(traj, self._program["network"], network_dict, self._program["noted"])
        finally:
            shutil.rmtree(os.path.join(self.directory, results), ignore_errors=True)
            self._results = None

    _results = None  # the results directory the device reads now

    def _run_program(self, results, run_values, seeds):
        device = get_device()
        variables = {_seed_variable(index): "" if value is None else str(value)
                     for index, value in enumerate(seeds)}
        # Brian2 sets these in os.environ for the execution and leaves them there.
        device.run_environment_variables.update(variables)
        try:
            device.run(directory=self.directory, results_directory=results,
                       run_args=run_values, with_output=False)
        finally:
            for name in variables:
                device.run_environment_variables.pop(name, None)
                os.environ.pop(name, None)
        self._results = results

    def _analyse(self, traj, network, network_dict, noted):
        """Step 3 of every noted subrun, in order, now that the program ran (section 8)."""
        remaining = [subrun for subrun, _ in noted]
        try:
            for subrun, end in noted:
                if all(subrun is not other for other in remaining):
                    continue  # an analyser took it out of subrun_list
                remaining = [other for other in remaining if other is not subrun]
                network.t_ = end  # Brian2's network time, as it was at the end of this subrun
                for analyser in self.analysers:
                    subrun_list = list(remaining)
                    _call_step(analyser.analyse, (traj, network, subrun, subrun_list, network_dict))
                    added = [s for s in subrun_list if all(s is not r for r in remaining)]
                    if added:
                        raise RuntimeError(
                            f"{type(analyser).__name__}.analyse() added subrun "
                            f"`{added[0].v_name}`: on a standalone device the subruns are compiled "
                            f"before anything is analysed. Add it to the durations group instead."
                        )
                    remaining = subrun_list
        finally:
            network.t_ = self._program["noted"][-1][1]

    def __getstate__(self):
        state = super().__getstate__()
        state.update(_program=None, _results=None, _compiling_after_pre_run=False)
        if self._program is not None:  # a copy runs the program compiled here (section 8)
            device = get_device()
            state.update(_compiled_by_original=True, _device_name=next(
                name for name, known in all_devices.items() if known is device))
        return state


def _cannot_reach(names, how):
    names = ", ".join(f"`{name}`" for name in sorted(names))
    return RuntimeError(
        f"Explored parameter {names} {how}: its value would be compiled into the program. On a "
        f"standalone device an explored value reaches the program only as a value that build() "
        f"sets on a whole variable, e.g. group.x = traj.x with 'x : 1 (shared, constant)', or as "
        f"the seed that build() gives brian2.seed()."
    )
