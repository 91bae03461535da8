"""Tests of brian2pet.py (and, further down, of the example clustered_network.py).

Real Brian2 networks on the numpy target, real HDF5 files in pytest's temporary folders.
Sections follow the module: units, containers, drop-in names, runner, manager.
"""

import inspect
import logging
import os
import shutil
import signal
import subprocess
import sys

import brian2
import numpy as np
import pytest
import tables
from brian2 import (
    EventMonitor,
    Hz,
    NeuronGroup,
    PoissonGroup,
    PopulationRateMonitor,
    SpikeMonitor,
    StateMonitor,
    Synapses,
    mV,
    ms,
    nS,
    second,
)
import pypet.brian2.parameter as pypet_brian2  # the anchor, for file compatibility
from pypet import Environment, Result, Trajectory, load_trajectory

import brian2pet
import clustered_network as cn
from brian2pet import (
    Brian2MonitorResult,
    Brian2Parameter,
    Brian2Result,
    NetworkAnalyser,
    NetworkComponent,
    NetworkManager,
    NetworkRunner,
    get_unit_fast,
    unit_from_expression,
)

brian2.prefs.codegen.target = "numpy"
logging.getLogger("brian2").setLevel(logging.ERROR)

HERE = os.path.dirname(os.path.abspath(__file__))


def new_trajectory(tmp_path, name="t"):
    return Trajectory(name, filename=str(tmp_path / f"{name}.hdf5"), add_time=False)


def store_and_reload(traj, name="t"):
    """Store ``traj`` and load everything back with brian2pet's classes, from the file."""
    traj.f_store()
    return load_trajectory(
        name=name,
        filename=traj.v_storage_service.filename,
        load_data=2,
        dynamic_imports=[Brian2Parameter, Brian2Result, Brian2MonitorResult],
    )


# -------------------------------------------------------------------------------------------------
# 1. Units as text
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "quantity", [5 * ms, 3 * mV / ms, 2 * Hz, 4 * nS, 1.5 * brian2.amp * second, 7 * mV**2]
)
def test_unit_text_round_trip(quantity):
    text = repr(get_unit_fast(quantity))
    unit = unit_from_expression(text)
    assert brian2.have_same_dimensions(unit, quantity)
    assert float(unit) == 1.0


def test_unit_text_dimensionless_and_names():
    assert repr(get_unit_fast(3.0)) == "1"
    assert not brian2.is_dimensionless(unit_from_expression("1. * second"))
    assert unit_from_expression("1") == 1
    assert unit_from_expression("2 * mV") == 2 * mV  # Brian2's short names are known too
    assert unit_from_expression("-(3 % 2) * ms") == -1 * ms


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('touch pwned')",
        "open('pwned', 'w')",
        "second.__class__",
        "[second]",
        "lambda: 1",
        "second if 1 else volt",
        "'second'",
        "True * second",
        "1j * second",
        "second + volt",
        "9 ** 9 ** 9",
        "second ** second",
        "pwned",
        "(" * 300 + "1" + ")" * 300,
        "1 * " * 400 + "second",
        "second; import os",
    ],
)
def test_hostile_unit_text_is_refused_not_evaluated(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as error:
        unit_from_expression(text)
    assert repr(text[:60])[:-1] in str(error.value)  # the message quotes the text (or its start)
    assert not (tmp_path / "pwned").exists()


def test_hostile_unit_text_in_a_file_is_refused(tmp_path, monkeypatch):
    """A crafted file: a result whose unit text is code. Loading must refuse it, not run it."""
    monkeypatch.chdir(tmp_path)
    text = "__import__('os').system('touch pwned')"
    traj = new_trajectory(tmp_path)
    traj.f_add_result(Result, "evil", **{"x__brn2__value": 1.0, "x__brn2__unit": text})
    traj.f_store()
    with tables.open_file(str(tmp_path / "t.hdf5"), "a") as h5:  # now claim it is Brian2 data
        h5.get_node("/t/results/evil")._v_attrs["SRVC_INIT_CLASS_NAME"] = "Brian2Result"
    with pytest.raises(ValueError, match="__import__"):
        load_trajectory(name="t", filename=str(tmp_path / "t.hdf5"), load_data=2,
                        dynamic_imports=[Brian2Result])
    assert not (tmp_path / "pwned").exists()


# -------------------------------------------------------------------------------------------------
# 2. Containers
# -------------------------------------------------------------------------------------------------


def test_parameter_round_trip_value_unit_and_range(tmp_path):
    traj = new_trajectory(tmp_path)
    traj.f_add_parameter(Brian2Parameter, "tau", 5 * ms)
    traj.f_add_parameter(Brian2Parameter, "g", 0.3 * nS / mV)
    traj.f_add_parameter(Brian2Parameter, "plain", 0.25)
    traj.f_add_parameter(Brian2Parameter, "name", "excitatory")
    explored = [1 * ms, 0.1 * ms, 2.5 * second, 1e-7 * second]
    traj.f_explore({"tau": explored})
    back = store_and_reload(traj)
    tau = back.f_get("parameters.tau")
    assert isinstance(tau, Brian2Parameter)
    assert tau.f_get_default() == 5 * ms
    assert list(tau.f_get_range()) == explored  # exact: SI floats in, the same floats out
    assert back.f_get("parameters.g").f_get() == 0.3 * nS / mV
    assert back.f_get("parameters.plain").f_get() == 0.25
    assert back.f_get("parameters.name").f_get() == "excitatory"


def test_parameter_explore_refuses_mixed_dimensions(tmp_path):
    traj = new_trajectory(tmp_path)
    traj.f_add_parameter(Brian2Parameter, "tau", 5 * ms)
    with pytest.raises(TypeError, match=r"`parameters\.tau` with 5\. \* mvolt.*units of 1\. \* second"):
        traj.f_explore({"tau": [1 * ms, 5 * mV]})
    with pytest.raises(TypeError):
        traj.f_explore({"tau": [1 * ms, 3.0]})


def test_parameter_explore_refuses_text_for_a_quantity(tmp_path):
    traj = new_trajectory(tmp_path)
    traj.f_add_parameter(Brian2Parameter, "tau", 5 * ms)
    with pytest.raises(TypeError, match="tau"):
        traj.f_explore({"tau": [1 * ms, "fast"]})


def test_parameter_refuses_array_quantity(tmp_path):
    traj = new_trajectory(tmp_path)
    with pytest.raises(TypeError, match="Brian2Result"):
        traj.f_add_parameter(Brian2Parameter, "taus", [1, 2] * ms)


def test_result_round_trip_any_shape(tmp_path):
    traj = new_trajectory(tmp_path)
    data = {
        "scalar": 3 * mV,
        "vector": np.linspace(0, 1, 7) * second,
        "matrix": np.arange(12).reshape(3, 4) * nS,
        "cube": np.ones((2, 3, 4)) * Hz,
        "empty": np.array([]) * ms,
        "empty2d": np.zeros((3, 0)) * mV,
        "count": 42,
        "label": "clustered",
        "plain_array": np.arange(5),
    }
    traj.f_add_result(Brian2Result, "r", **data)
    back = store_and_reload(traj).f_get("results.r")
    for name, value in data.items():
        loaded = back.f_get(name)
        if isinstance(value, brian2.Quantity):
            assert isinstance(loaded, brian2.Quantity) and loaded.shape == value.shape
            assert brian2.have_same_dimensions(loaded, value)
            np.testing.assert_array_equal(np.asarray(loaded), np.asarray(value))
        else:
            np.testing.assert_array_equal(loaded, value)


def test_result_refuses_identifier_in_name(tmp_path):
    traj = new_trajectory(tmp_path)
    result = traj.f_add_result(Brian2Result, "r", a=1 * ms)
    with pytest.raises(AttributeError, match="__brn2__"):
        result.f_set(**{"b__brn2__unit": 2 * ms})
    assert result.a == 1 * ms  # nothing already held is lost


def record_all_monitors(run=True):
    """A tiny network with one of each supported monitor (recording variables too)."""
    brian2.seed(3)
    group = NeuronGroup(
        6,
        "dv/dt = (1.2 - v) / (5*ms) : 1",
        threshold="v > 1",
        reset="v = 0",
        events={"half": "v > 0.5"},
        method="exact",
    )
    group.v = "rand()"
    monitors = {
        "spikes": SpikeMonitor(group),
        "spikes_v": SpikeMonitor(group, variables=["v"]),
        "events": EventMonitor(group, "half", variables=["v"]),
        "state": StateMonitor(group, "v", record=[0, 2, 5]),
        "rate": PopulationRateMonitor(group),
    }
    if run:
        brian2.Network(group, *monitors.values()).run(20 * ms)
    return monitors


EXPECTED_NAMES = {
    "spikes": {"t", "i", "num_spikes", "when", "name", "source"},
    "spikes_v": {"t", "i", "num_spikes", "when", "name", "source", "record_variables", "v"},
    "events": {"t", "i", "num_events", "event", "when", "name", "source", "record_variables", "v"},
    "state": {"t", "record", "when", "record_variables", "name", "source", "v"},
    "rate": {"t", "rate", "name", "source"},
}


@pytest.mark.parametrize("run", [True, False], ids=["recorded", "empty"])
def test_monitor_results_round_trip(tmp_path, run):
    monitors = record_all_monitors(run)
    traj = new_trajectory(tmp_path)
    for name, monitor in monitors.items():
        traj.f_add_result(Brian2MonitorResult, f"monitors.{name}", monitor)
    back = store_and_reload(traj)
    for name, monitor in monitors.items():
        result = back.f_get(f"results.monitors.{name}")
        assert result.v_monitor_type == type(monitor).__name__
        assert set(result.f_to_dict()) == EXPECTED_NAMES[name]
        assert result.name == monitor.name and result.source == monitor.source.name
        np.testing.assert_array_equal(result.t, monitor.t[:])
        assert brian2.have_same_dimensions(result.t, second)
    spikes, state = back.results.monitors.spikes, back.results.monitors.state
    assert spikes.num_spikes == monitors["spikes"].num_spikes == len(spikes.t)
    assert (spikes.num_spikes > 0) == run
    np.testing.assert_array_equal(spikes.i, monitors["spikes"].i[:])
    np.testing.assert_array_equal(back.results.monitors.events.v, monitors["events"].v[:])
    assert back.results.monitors.events.event == "half"
    np.testing.assert_array_equal(state.record, [0, 2, 5])
    assert state.v.shape == (3, 200 if run else 0)
    np.testing.assert_array_equal(state.v, monitors["state"].v)
    np.testing.assert_array_equal(back.results.monitors.rate.rate, monitors["rate"].rate[:])
    assert brian2.have_same_dimensions(back.results.monitors.rate.rate, Hz)


def test_monitor_result_takes_one_monitor_only(tmp_path):
    monitors = record_all_monitors()
    traj = new_trajectory(tmp_path)
    result = traj.f_add_result(Brian2MonitorResult, "m", monitors["spikes"])
    with pytest.raises(TypeError, match="one monitor"):
        result.f_set(monitors["rate"])
    assert result.v_monitor_type == "SpikeMonitor"
    assert result.num_spikes == monitors["spikes"].num_spikes


def test_monitor_result_refuses_other_brian_objects(tmp_path):
    traj = new_trajectory(tmp_path)
    group = NeuronGroup(2, "v : 1")
    with pytest.raises(TypeError, match="NeuronGroup"):
        traj.f_add_result(Brian2MonitorResult, "m", group)


def test_monitor_result_keeps_a_copy_while_the_monitor_records_on(tmp_path):
    group = NeuronGroup(5, "dv/dt = (1.2 - v) / (5*ms) : 1", threshold="v > 1", reset="v = 0",
                        method="exact")
    spikes, state = SpikeMonitor(group), StateMonitor(group, "v", record=True)
    network = brian2.Network(group, spikes, state)
    network.run(10 * ms)
    traj = new_trajectory(tmp_path)
    spike_result = traj.f_add_result(Brian2MonitorResult, "spikes", spikes)
    state_result = traj.f_add_result(Brian2MonitorResult, "state", state)
    t_then, steps_then = np.array(spikes.t[:]), len(state.t)
    network.run(200 * ms)  # buffers grow far beyond their first size
    np.testing.assert_array_equal(np.asarray(spike_result.t), t_then)
    assert len(state_result.t) == state_result.v.shape[1] == steps_then


# Files written by either implementation load with the other's classes.
@pytest.mark.parametrize("writer,reader", [(brian2pet, pypet_brian2), (pypet_brian2, brian2pet)])
def test_storage_layout_shared_with_pypet_brian2(tmp_path, writer, reader):
    monitors = record_all_monitors()
    traj = new_trajectory(tmp_path)
    traj.f_add_parameter(writer.Brian2Parameter, "tau", 5 * ms)
    traj.f_explore({"tau": [1 * ms, 2 * ms]})
    traj.f_add_result(writer.Brian2Result, "r", v=[1, 2] * mV, n=3)
    traj.f_add_result(writer.Brian2MonitorResult, "spikes", monitors["spikes"])
    traj.f_add_result(writer.Brian2MonitorResult, "rate", monitors["rate"])
    traj.f_store()
    back = load_trajectory(
        name="t",
        filename=str(tmp_path / "t.hdf5"),
        load_data=2,
        dynamic_imports=[reader.Brian2Parameter, reader.Brian2Result, reader.Brian2MonitorResult],
    )
    assert type(back.f_get("parameters.tau")) is reader.Brian2Parameter
    assert list(back.f_get("parameters.tau").f_get_range()) == [1 * ms, 2 * ms]
    assert type(back.results.spikes) is reader.Brian2MonitorResult
    np.testing.assert_array_equal(back.results.r.v, [1, 2] * mV)
    np.testing.assert_array_equal(back.results.spikes.t, monitors["spikes"].t[:])
    np.testing.assert_array_equal(back.results.rate.rate, monitors["rate"].rate[:])
    assert back.results.spikes.v_monitor_type == "SpikeMonitor"


# -------------------------------------------------------------------------------------------------
# Drop-in for pypet.brian2
# -------------------------------------------------------------------------------------------------

PUBLIC = [
    "Brian2Parameter",
    "Brian2Result",
    "Brian2MonitorResult",
    "get_unit_fast",
    "unit_from_expression",
    "NetworkComponent",
    "NetworkAnalyser",
    "NetworkRunner",
    "NetworkManager",
]


def test_all_lists_exactly_the_public_names():
    assert sorted(brian2pet.__all__) == sorted(PUBLIC)
    public = {
        name
        for name, value in vars(brian2pet).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == "brian2pet"
    }
    assert public == set(PUBLIC)


def test_same_signatures_as_pypet_brian2():
    import pypet.brian2.network as theirs_network
    import pypet.brian2.parameter as theirs_parameter

    for name in PUBLIC:
        theirs = getattr(theirs_parameter, name, None) or getattr(theirs_network, name)
        ours = getattr(brian2pet, name)
        members = [(name, ours, theirs)]
        if inspect.isclass(theirs):
            members += [
                (f"{name}.{attr}", getattr(ours, attr, None), value)
                for attr, value in vars(theirs).items()
                if inspect.isfunction(value) and (not attr.startswith("_") or attr in (
                    "__init__", "_extract_subruns", "_execute_network_run"))
            ]
        for label, mine, other in members:
            assert mine is not None, f"{label} is missing"
            if callable(other):
                assert list(inspect.signature(mine).parameters) == list(
                    inspect.signature(other).parameters
                ), label


def test_module_does_not_import_matplotlib():
    source = open(os.path.join(HERE, "brian2pet.py")).read()
    assert "matplotlib" not in source.split('"""', 2)[2]  # only the docstring may mention it


# -------------------------------------------------------------------------------------------------
# Spies: components that log every call, on a real little network
# -------------------------------------------------------------------------------------------------


class SpyComponent(NetworkComponent):
    """Logs (name, method, subrun) for every call; the first one owns a NeuronGroup."""

    def __init__(self, name, log, makes_group=None):
        self.name, self.log, self.makes_group = name, log, makes_group

    def add_parameters(self, traj):
        self.log.append((self.name, "add_parameters"))

    def pre_build(self, traj, brian_list, network_dict):
        self.log.append((self.name, "pre_build"))
        self._make_group("pre_build", brian_list)

    def build(self, traj, brian_list, network_dict):
        self.log.append((self.name, "build"))
        self._make_group("build", brian_list)

    def _make_group(self, when, brian_list):
        if self.makes_group == when:
            brian_list.append(NeuronGroup(3, "dv/dt = -v / (10*ms) : 1", method="exact"))

    def add_to_network(self, traj, network, current_subrun, subrun_list, network_dict):
        self.log.append((self.name, "add_to_network", current_subrun.v_name))

    def remove_from_network(self, traj, network, current_subrun, subrun_list, network_dict):
        self.log.append((self.name, "remove_from_network", current_subrun.v_name))


class SpyAnalyser(SpyComponent, NetworkAnalyser):
    """Also logs analyse, with the simulated time, so the run is seen to come before it."""

    def __init__(self, name, log, on_analyse=None):
        super().__init__(name, log)
        self.on_analyse = on_analyse

    def analyse(self, traj, network, current_subrun, subrun_list, network_dict):
        self.log.append((self.name, "analyse", current_subrun.v_name, float(network.t / ms)))
        if self.on_analyse:
            self.on_analyse(current_subrun, subrun_list)


class SpyRunner(NetworkRunner):
    def __init__(self, log, durations=(("first", 0, 1 * ms),), **kwargs):
        super().__init__(report=None, **kwargs)
        self.log, self.durations = log, durations

    def add_parameters(self, traj):
        self.log.append(("runner", "add_parameters"))
        for name, order, duration in self.durations:
            parameter = traj.f_add_parameter(Brian2Parameter, f"simulation.durations.{name}", duration)
            if order is not None:
                parameter.v_annotations.order = order

    def pre_build(self, traj, brian_list, network_dict):
        self.log.append(("runner", "pre_build"))

    def build(self, traj, brian_list, network_dict):
        self.log.append(("runner", "build"))

    def add_to_network(self, traj, network, current_subrun, subrun_list, network_dict):
        self.log.append(("runner", "add_to_network", current_subrun.v_name))

    def remove_from_network(self, traj, network, current_subrun, subrun_list, network_dict):
        self.log.append(("runner", "remove_from_network", current_subrun.v_name))


def spy_manager(log, durations=(("first", 0, 1 * ms),), on_analyse=None, group_in="build"):
    components = [SpyComponent("c1", log, makes_group=group_in), SpyComponent("c2", log)]
    analysers = [SpyAnalyser("a1", log, on_analyse), SpyAnalyser("a2", log)]
    return NetworkManager(SpyRunner(log, durations), components, analysers)


def subruns_seen(log):
    return [entry[2] for entry in log if entry[:2] == ("a1", "analyse")]


# -------------------------------------------------------------------------------------------------
# 4. The runner
# -------------------------------------------------------------------------------------------------


def test_manager_steps_call_parts_in_documented_order():
    log = []
    manager = spy_manager(log)
    traj = Trajectory("t", add_time=False)
    manager.add_parameters(traj)
    manager.pre_build(traj)
    parts = ["c1", "c2", "a1", "a2", "runner"]
    assert log == [(p, "add_parameters") for p in parts] + [(p, "pre_build") for p in parts]
    log.clear()
    manager.run_network(traj)
    assert log == (
        [(p, "build") for p in parts]
        + [(p, "add_to_network", "first") for p in parts]
        + [("a1", "analyse", "first", 1.0), ("a2", "analyse", "first", 1.0)]
        + [(p, "remove_from_network", "first") for p in ["runner", "a1", "a2", "c1", "c2"]]
    )


def test_subruns_run_in_ascending_order_with_gaps():
    log = []
    durations = (("third", 42, 3 * ms), ("init", 0, 1 * ms), ("measure", 1, 2 * ms))
    manager = spy_manager(log, durations)
    traj = Trajectory("t", add_time=False)
    manager.add_parameters(traj)
    manager.run_network(traj)
    assert subruns_seen(log) == ["init", "measure", "third"]
    times = [entry[3] for entry in log if entry[:2] == ("a1", "analyse")]
    assert times == pytest.approx([1.0, 3.0, 6.0])  # each subrun ran for its own duration


@pytest.mark.parametrize(
    "durations,message",
    [
        ((("a", 1, 1 * ms), ("b", 1, 2 * ms)), r"`parameters\.simulation\.durations\.a` and "
                                                r"`parameters\.simulation\.durations\.b`.*order 1"),
        ((("a", 0, 1 * ms), ("b", None, 2 * ms)), r"`parameters\.simulation\.durations\.b` has no order"),
        ((), r"No subruns.*`simulation\.durations`"),
    ],
    ids=["equal orders", "no order", "no subruns"],
)
def test_subrun_errors(durations, message):
    manager = spy_manager([], durations)
    traj = Trajectory("t", add_time=False)
    manager.add_parameters(traj)
    with pytest.raises(RuntimeError, match=message):
        manager.run_network(traj)


def test_subrun_that_is_not_a_brian2_parameter_is_refused():
    manager = spy_manager([])
    traj = Trajectory("t", add_time=False)
    manager.add_parameters(traj)
    traj.f_add_parameter("simulation.durations.plain", 0.5).v_annotations.order = 1  # no unit
    with pytest.raises(TypeError, match=r"`parameters\.simulation\.durations\.plain` is a Parameter"):
        manager.run_network(traj)


def test_subrun_group_name_is_configurable():
    log = []
    runner = SpyRunner(log, (("x", 0, 1 * ms),), durations_group_name="phases.main")
    runner.add_parameters = lambda traj: traj.f_add_parameter(
        Brian2Parameter, "phases.main.x", 2 * ms
    ).v_annotations.f_set(order=0)
    manager = NetworkManager(runner, [SpyComponent("c1", log, makes_group="build")], [SpyAnalyser("a1", log)])
    traj = Trajectory("t", add_time=False)
    manager.add_parameters(traj)
    manager.run_network(traj)
    assert subruns_seen(log) == ["x"]


def test_analyser_can_cancel_the_remaining_subruns():
    log = []
    durations = (("init", 0, 1 * ms), ("measure", 1, 2 * ms), ("late", 2, 3 * ms))

    def cancel(current_subrun, subrun_list):
        if current_subrun.v_name == "init":
            subrun_list.clear()  # e.g. pathological activity detected

    manager = spy_manager(log, durations, on_analyse=cancel)
    traj = Trajectory("t", add_time=False)
    manager.add_parameters(traj)
    manager.run_network(traj)
    assert subruns_seen(log) == ["init"]
    assert log[-1] == ("c2", "remove_from_network", "init")  # the cancelled run still cleans up


def test_analyser_can_add_subruns():
    log = []
    extra = Brian2Parameter("simulation.extra", 5 * ms)

    def extend(current_subrun, subrun_list):
        if current_subrun.v_name == "init":
            subrun_list.append(extra)

    manager = spy_manager(log, (("init", 0, 1 * ms), ("measure", 1, 2 * ms)), on_analyse=extend)
    traj = Trajectory("t", add_time=False)
    manager.add_parameters(traj)
    manager.run_network(traj)
    assert subruns_seen(log) == ["init", "measure", "extra"]
    assert [e[3] for e in log if e[:2] == ("a1", "analyse")] == pytest.approx([1.0, 3.0, 8.0])


# -------------------------------------------------------------------------------------------------
# 5. The manager
# -------------------------------------------------------------------------------------------------


class BadComponent(NetworkComponent):
    def build(self, traj, brian_list, network_dict):
        brian_list.append([NeuronGroup(1, "v : 1")])  # nested: not a Brian2 object


def test_brian_list_must_hold_brian_objects():
    log = []
    manager = NetworkManager(SpyRunner(log), [SpyComponent("c1", log, makes_group="build"), BadComponent()])
    traj = Trajectory("t", add_time=False)
    manager.add_parameters(traj)
    with pytest.raises(TypeError, match=r"BadComponent\.build\(\).*list.*network_dict"):
        manager.run_network(traj)


def test_pre_run_calls_pre_build_then_runs_the_pre_durations():
    log = []
    manager = spy_manager(log, group_in="pre_build")
    traj = Trajectory("t", add_time=False)
    manager.add_parameters(traj)
    traj.f_add_parameter(Brian2Parameter, "simulation.pre_durations.warmup", 4 * ms).v_annotations.order = 0
    manager.pre_run_network(traj)
    assert log[5:10] == [(p, "pre_build") for p in ["c1", "c2", "a1", "a2", "runner"]]
    assert subruns_seen(log) == ["warmup"]
    log.clear()
    manager.run_network(traj)
    assert subruns_seen(log) == ["first"]
    assert [e[3] for e in log if e[:2] == ("a1", "analyse")] == [5.0]  # 4 ms pre-run + 1 ms


# A small explored experiment: a driven group, an explored coupling built per run, a spike monitor.
# ``mode`` says what the main script does before running: nothing, pre_build or pre_run_network.


class DrivenGroup(NetworkComponent):
    def add_parameters(self, traj):
        traj.f_add_parameter(Brian2Parameter, "model.tau", 10 * ms)
        traj.f_add_parameter(Brian2Parameter, "model.w", 0.1)

    def _make(self, traj, brian_list, network_dict):
        group = NeuronGroup(
            20,
            "dv/dt = (1.1 - v) / tau : 1",
            threshold="v > 1",
            reset="v = 0",
            refractory=2 * ms,
            method="exact",
            namespace={"tau": traj.tau},
        )
        group.v = "rand()"
        brian_list.append(group)
        network_dict["group"] = group

    def pre_build(self, traj, brian_list, network_dict):
        if traj.mode != "none":
            self._make(traj, brian_list, network_dict)

    def build(self, traj, brian_list, network_dict):
        # Seeded per run, as a one-process run would otherwise continue the last run's random stream.
        brian2.seed(100 + traj.v_idx)
        if traj.mode == "none":
            self._make(traj, brian_list, network_dict)
        # The coupling is explored, so it is built in every run.
        coupling = Synapses(network_dict["group"], network_dict["group"], on_pre="v_post += w",
                            namespace={"w": traj.w})
        coupling.connect(p=0.3)
        brian_list.append(coupling)


class SpikeRecorder(NetworkAnalyser):
    def add_to_network(self, traj, network, current_subrun, subrun_list, network_dict):
        if current_subrun.v_name == "measure":
            self.monitor = SpikeMonitor(network_dict["group"])
            network.add(self.monitor)
            traj.f_add_result("start.t", float(network.t / ms))
            traj.f_add_result("start.v", np.array(network_dict["group"].v[:]))

    def analyse(self, traj, network, current_subrun, subrun_list, network_dict):
        if current_subrun.v_name == "measure":
            traj.f_add_result(Brian2MonitorResult, "spikes", self.monitor)
        elif current_subrun.v_name == "warmup":
            network_dict["v_after_pre_run"] = np.array(network_dict["group"].v[:])

    def remove_from_network(self, traj, network, current_subrun, subrun_list, network_dict):
        if current_subrun.v_name == "measure":
            network.remove(self.monitor)


class TwoPhaseRunner(NetworkRunner):
    def add_parameters(self, traj):
        traj.f_add_parameter(Brian2Parameter, "simulation.durations.measure", 30 * ms).v_annotations.order = 1
        traj.f_add_parameter(Brian2Parameter, "simulation.pre_durations.warmup", 20 * ms).v_annotations.order = 0


W_VALUES = [0.0, 0.05, 0.2]


def run_experiment(tmp_path, mode, multiproc):
    """Run the small exploration and return (trajectory loaded from the file, manager)."""
    filename = str(tmp_path / f"{mode}_{multiproc}.hdf5")
    extra = dict(multiproc=True, ncores=2, use_pool=False, wrap_mode="QUEUE") if multiproc else {}
    env = Environment(trajectory="exp", filename=filename, log_config=None, log_stdout=False,
                      report_progress=False, add_time=False, **extra)
    traj = env.trajectory
    traj.f_add_parameter("mode", mode)
    manager = NetworkManager(TwoPhaseRunner(report=None), [DrivenGroup()], [SpikeRecorder()])
    manager.add_parameters(traj)
    traj.f_explore({"w": W_VALUES})
    brian2.seed(7)
    if mode == "pre_build":
        manager.pre_build(traj)
    elif mode == "pre_run":
        manager.pre_run_network(traj)
    traj.f_store()
    env.run(manager.run_network)
    env.disable_logging()
    back = load_trajectory(name="exp", filename=filename, load_data=2,
                           dynamic_imports=[Brian2Parameter, Brian2MonitorResult])
    return back, manager


def spikes_per_run(traj):
    out = []
    for run_name in traj.f_get_run_names():
        spikes = traj.f_get(f"results.runs.{run_name}.spikes")
        out.append((np.asarray(spikes.t), np.asarray(spikes.i)))
    return out


@pytest.mark.parametrize("mode", ["none", "pre_build", "pre_run"])
def test_one_process_equals_two_processes(tmp_path, mode):
    """pypet.brian2 fails here in one process ('has already been simulated'); brian2pet must not."""
    single, _ = run_experiment(tmp_path, mode, multiproc=False)
    double, _ = run_experiment(tmp_path, mode, multiproc=True)
    one, two = spikes_per_run(single), spikes_per_run(double)
    assert len(one) == len(two) == len(W_VALUES)
    for (t1, i1), (t2, i2) in zip(one, two):
        np.testing.assert_array_equal(t1, t2)
        np.testing.assert_array_equal(i1, i2)
    counts = [len(t) for t, _ in one]
    assert counts[0] < counts[2], counts  # the explored coupling really acts in every run


def plain_brian2_reference(mode):
    """The same experiment written by hand against Brian2: the numbers the framework must give."""
    counts = []
    brian2.seed(7)
    group = NeuronGroup(20, "dv/dt = (1.1 - v) / tau : 1", threshold="v > 1", reset="v = 0",
                        refractory=2 * ms, method="exact", namespace={"tau": 10 * ms})
    group.v = "rand()"
    network = brian2.Network(group)
    if mode == "pre_run":
        network.run(20 * ms)
    network.store()
    for index, w in enumerate(W_VALUES):
        network.restore()
        brian2.seed(100 + index)
        coupling = Synapses(group, group, on_pre="v_post += w", namespace={"w": w})
        coupling.connect(p=0.3)
        monitor = SpikeMonitor(group)
        network.add(coupling, monitor)
        network.run(30 * ms)
        counts.append(int(monitor.num_spikes))
        network.remove(coupling, monitor)
    return counts


@pytest.mark.parametrize("mode", ["pre_build", "pre_run"])
def test_objects_built_per_run_are_simulated_after_pre_build_and_pre_run(tmp_path, mode):
    """pypet.brian2 leaves build()'s objects out of the pre-run network; they must be simulated."""
    traj, _ = run_experiment(tmp_path, mode, multiproc=False)
    counts = [len(t) for t, _ in spikes_per_run(traj)]
    assert counts == plain_brian2_reference(mode)


def test_every_run_starts_from_the_pre_run_state(tmp_path):
    traj, manager = run_experiment(tmp_path, "pre_run", multiproc=False)
    v_after_pre_run = manager._network_dict["v_after_pre_run"]
    for run_name in traj.f_get_run_names():
        start = traj.f_get(f"results.runs.{run_name}.start")
        assert start.t == pytest.approx(20.0)  # the pre-run's 20 ms, not 0 and not a later run's end
        np.testing.assert_array_equal(start.v, v_after_pre_run)


def test_objects_of_one_run_do_not_leak_into_the_next(tmp_path):
    _, manager = run_experiment(tmp_path, "pre_build", multiproc=False)
    # After the exploration the shared network holds exactly the pre-built objects again ...
    assert set(manager._network.objects) == set(manager._brian_list)
    # ... and neither the pre-built list nor dict gained anything from the runs.
    assert len(manager._brian_list) == 1 and set(manager._network_dict) == {"group"}


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    """The README's quick start is code a reader will paste: it must run as printed."""
    readme = open(os.path.join(HERE, "README.md")).read()
    code = readme.split("## Quick start", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "quickstart"}
    exec(compile(code, "README.md quick start", "exec"), namespace)
    namespace["env"].disable_logging()
    back = load_trajectory(filename=str(tmp_path / "results" / "quickstart.hdf5"), index=-1,
                           load_data=2, dynamic_imports=[Brian2Parameter, Brian2MonitorResult])
    counts = [back.f_get(f"results.runs.{run}.spikes").num_spikes for run in back.f_get_run_names()]
    assert len(counts) == 3 and counts[0] > counts[2] > 0  # a faster membrane fires more often




def test_a_pickled_manager_travels_without_brian2_objects():
    """pypet pickles the run function for resumable runs and SCOOP; Brian2 objects cannot go along."""
    import pickle

    log = []
    manager = spy_manager(log, group_in="pre_build")
    traj = Trajectory("t", add_time=False)
    manager.add_parameters(traj)
    manager.pre_build(traj)
    manager.run_network(traj)  # the original now holds a network of its pre-built group
    copy = pickle.loads(pickle.dumps(manager))
    assert copy._brian_list == [] and copy._network is None and manager._network is not None
    copy.components[0].makes_group = "build"  # the copy's components build everything per run
    copy.run_network(traj)
    assert subruns_seen(copy.analysers[0].log) == ["first", "first"]  # its own log, copied
    manager.run_network(traj)  # the original is untouched by the pickling
    assert subruns_seen(log) == ["first", "first"]


# -------------------------------------------------------------------------------------------------
# The example, clustered_network.py, on a tiny network (numpy target, short runs).
# One tiny sweep is simulated once per session (fixture ``reference``); the tests for several
# processes, SCOOP and resume simulate the same sweep their way and must store exactly its numbers.
# -------------------------------------------------------------------------------------------------

# The connectivity test builds objects that it never simulates; Brian2 would warn at exit.
cn.BrianLogger.suppress_name("unused_brian_object")
SCRIPT = os.path.join(HERE, "clustered_network.py")
# 400 E / 100 I neurons (5 clusters), three runs of 0.4 s simulated each.
TINY = ["--scale", "0.1", "--r-ee", "1.0", "2.5", "3.0", "--initial", "0.1", "--measure", "0.3",
        "--seed", "3", "--target", "numpy"]
R_TINY = [1.0, 2.5, 3.0]


def run_script(*args, timeout=300, **kwargs):
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
        cwd=HERE, **kwargs,
    )


def stored_numbers(filename):
    """Every result item of every run, by full name: what must not change between ways of running."""
    traj = cn.load_sweep(filename)
    numbers = {}
    for result in traj.f_iter_leaves():
        if not result.v_full_name.startswith("results."):
            continue
        for key, value in result.f_to_dict().items():
            numbers[f"{result.v_full_name}.{key}"] = value
    return numbers


def assert_same_numbers(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        other = actual[name]
        if isinstance(value, (str, bytes, list, tuple)) or value is None:
            assert other == value, name
        else:
            assert type(other) is type(value), name
            np.testing.assert_array_equal(np.asarray(other), np.asarray(value), err_msg=name)
            if hasattr(value, "dim"):
                assert other.dim == value.dim, name


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The tiny sweep in one process, with figures: (folder, completed process)."""
    folder = tmp_path_factory.mktemp("reference")
    done = run_script(*TINY, "--out", str(folder))
    assert done.returncode == 0, done.stderr
    return folder, done


@pytest.fixture(scope="session")
def reference_numbers(reference):
    return stored_numbers(str(reference[0] / cn.HDF5_NAME))


# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------


def test_fano_factor_against_hand_counts():
    # Three neurons over [0, 0.4) s. Counts in 100 ms windows:
    #   neuron 0: [1, 2, 0, 1] -> mean 1, sample variance 2/3 -> FF 2/3
    #   neuron 1: silent -> left out
    #   neuron 2: [1, 1, 1, 1] -> FF 0
    # In 200 ms windows: neuron 0 [3, 1] -> mean 2, variance 2 -> FF 1; neuron 2 [2, 2] -> 0.
    # The spike at 0.4 s is outside; the one at 0.2 s lies on a border and counts for the later
    # window. 400 ms: a single window, no variance -> NaN.
    spike_t = np.array([0.05, 0.15, 0.16, 0.35, 0.4, 0.01, 0.11, 0.2, 0.39])
    spike_i = np.array([0, 0, 0, 0, 0, 2, 2, 2, 2])
    ff = cn.fano_factor(spike_t, spike_i, 3, 0.0, 0.4, [0.1, 0.2, 0.4])
    np.testing.assert_allclose(ff[:2], [(2 / 3 + 0) / 2, (1 + 0) / 2])
    assert np.isnan(ff[2])


def test_fano_factor_takes_quantities_and_an_offset():
    from brian2 import ms, second

    spike_t = (np.array([0.05, 0.15, 0.16, 0.35]) + 1.0) * second
    ff = cn.fano_factor(spike_t, np.zeros(4, int), 1, 1 * second, 1.4 * second, [100 * ms])
    np.testing.assert_allclose(ff, [2 / 3])


def test_cluster_labels_and_probabilities():
    np.testing.assert_array_equal(cn.cluster_labels(200, 80), [0] * 80 + [1] * 80 + [2] * 40)
    p_in, p_out = cn.cluster_probabilities(2.5, 4000, 80, 0.2)
    assert p_in == pytest.approx(2.5 * p_out)
    # The mean in-degree stays K = 0.2 * N_e whatever R_ee.
    assert 80 * p_in + (4000 - 80) * p_out == pytest.approx(800)
    assert cn.cluster_probabilities(1.0, 4000, 80, 0.2) == pytest.approx((0.2, 0.2))


def test_weights_are_the_papers():
    from brian2 import ms

    weights = cn.synaptic_weights(4000, 0.2, 15 * ms, 10 * ms)
    sqrt_k = np.sqrt(800)
    assert weights["J_ee"] == pytest.approx(10 / (15 * sqrt_k))
    assert weights["J_ie"] == pytest.approx(4 / (10 * sqrt_k))
    assert weights["J_ei"] == pytest.approx(16 * 1.2 / (15 * sqrt_k))
    assert weights["J_ii"] == pytest.approx(16 / (10 * sqrt_k))


def example_trajectory(name, scale, seed):
    """A trajectory with the example's simulation.* parameters, as run_sweep adds them (numpy)."""
    traj = Trajectory(name, add_time=False)
    traj.f_add_parameter("simulation.scale", scale)
    traj.f_add_parameter("simulation.seed", seed)
    traj.f_add_parameter("simulation.codegen_target", "numpy")
    traj.f_add_parameter(cn.Brian2Parameter, "simulation.dt", 0.1 * ms)
    return traj


def test_connectivity_statistics_at_small_scale():
    scale, r_ee = 0.2, 2.5
    traj = example_trajectory("connectivity", scale, seed=5)
    neurons, connections = cn.CNNeuronGroup(), cn.CNConnections()
    neurons.add_parameters(traj)
    connections.add_parameters(traj)
    traj.f_explore({"R_ee": [r_ee]})
    traj.v_idx = 0
    brian_list, network_dict = [], {}
    neurons.build(traj, brian_list, network_dict)
    connections.build(traj, brian_list, network_dict)

    n_e, n_i, size = 800, 200, 80
    from_e, from_i = network_dict["connections"]
    pre, post = np.asarray(from_e.i[:]), np.asarray(from_e.j[:])
    weight = np.asarray(from_e.w[:])
    to_e = post < n_e
    same = to_e & (pre // size == post // size)
    between = to_e & ~same
    p_in, p_out = cn.cluster_probabilities(r_ee, n_e, size, 0.2)
    pairs_in = (n_e // size) * size * (size - 1)  # no autapses
    pairs_between = n_e * n_e - (n_e // size) * size * size

    def assert_binomial(count, pairs, p):
        assert abs(count - pairs * p) < 5 * np.sqrt(pairs * p * (1 - p)), (count, pairs * p)

    assert_binomial(same.sum(), pairs_in, p_in)
    assert_binomial(between.sum(), pairs_between, p_out)
    assert_binomial((~to_e).sum(), n_e * n_i, 0.5)
    assert not np.any(to_e & (pre == post))
    # Mean E to E in-degree K = 0.2 * N_e.
    assert to_e.sum() / n_e == pytest.approx(0.2 * n_e, rel=0.02)

    j = traj.parameters.connections
    np.testing.assert_allclose(weight[same], 1.9 * j.J_ee)
    np.testing.assert_allclose(weight[between], j.J_ee)
    np.testing.assert_allclose(weight[~to_e], j.J_ie)

    pre_i, post_i = np.asarray(from_i.i[:]), np.asarray(from_i.j[:])
    i_to_e = post_i < n_e
    assert_binomial(i_to_e.sum(), n_i * n_e, 0.5)
    assert_binomial((~i_to_e).sum(), n_i * (n_i - 1), 0.5)
    assert not np.any(post_i == pre_i + n_e)
    np.testing.assert_allclose(np.asarray(from_i.w[:])[i_to_e], j.J_ei)
    np.testing.assert_allclose(np.asarray(from_i.w[:])[~i_to_e], j.J_ii)


def test_trace_monitors_generate_the_same_code_in_every_run():
    # Same code means one cython compilation per machine, not one per run in a long-lived process.
    from brian2 import Network, StateMonitor

    traj = example_trajectory("traces", 0.05, seed=1)
    neurons, analyser = cn.CNNeuronGroup(), cn.CNMonitorAnalysis()
    for part in (neurons, cn.CNConnections(), analyser, cn.CNNetworkRunner()):
        part.add_parameters(traj)
    measurement = traj.f_get("measurement_run")
    codes, kept_alive = [], []
    for _ in range(2):
        brian_list, network_dict = [], {}
        neurons.build(traj, brian_list, network_dict)
        network = Network(*brian_list)
        analyser.add_to_network(traj, network, measurement, [], network_dict)
        network.run(1 * ms)
        traces = [m for m in network_dict["monitors"].values() if isinstance(m, StateMonitor)]
        codes.append([str(m.codeobj.code) for m in traces])
        # The first run's monitors stay alive, as they do in a sweep until collected.
        kept_alive.append(network)
    assert len(codes[0]) == 3
    assert codes[0] == codes[1]


# --------------------------------------------------------------------------------------------------
# The example end to end
# --------------------------------------------------------------------------------------------------


def test_example_end_to_end(reference):
    folder, done = reference
    filename = folder / cn.HDF5_NAME
    assert f"HDF5 file: {filename}" in done.stdout
    figures = [line.split("figure: ", 1)[1] for line in done.stdout.splitlines()
               if line.startswith("figure: ")]
    assert sorted(os.path.basename(f) for f in figures) == sorted([
        "raster_R_ee_1.00.png", "traces_R_ee_1.00.png", "raster_R_ee_2.50.png",
        "traces_R_ee_2.50.png", "fano_vs_window.png", "fano_and_rates_vs_R_ee.png",
    ])
    for figure in figures:
        assert os.path.dirname(figure) == str(folder)
        with open(figure, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    for r in R_TINY:
        assert f"R_ee = {r}" in done.stdout

    traj = cn.load_sweep(str(filename))
    rows = cn.sweep_rows(traj)
    assert [row["R_ee"] for row in rows] == R_TINY
    for row in rows:
        run = row["run"]
        assert isinstance(run.f_get("monitors.spikes_e"), cn.Brian2MonitorResult)
        spikes = run.f_get("monitors.spikes_e")
        assert len(spikes.t) == len(spikes.i) > 0
        assert np.all(np.asarray(spikes.i) < 400)
        for variable in ("V", "I_syn_e", "I_syn_i"):
            trace = run.f_get(f"monitors.{variable}")
            assert isinstance(trace, cn.Brian2MonitorResult)
            assert getattr(trace, variable).shape[0] == 4
        rates = run.f_get("statistics.rates")
        assert isinstance(rates, cn.Brian2Result)
        assert float(rates.e / cn.second ** -1) > 0 and float(rates.i / cn.second ** -1) > 0
        fano = run.f_get("statistics.fano_factor")
        assert isinstance(fano, cn.Brian2Result)
        np.testing.assert_allclose(np.asarray(fano.window / cn.second), [0.1, 0.25, 0.5, 1.0])
        assert fano.ff.dtype == float and fano.ff.shape == (4,)
        # 0.3 s measured: three 100 ms windows, too few for longer ones.
        assert np.isfinite(fano.ff[0]) and np.all(np.isnan(fano.ff[1:]))
        assert run.f_get("statistics.mean_fano_factor").f_get() == pytest.approx(fano.ff[0])
        assert row["rate_e"] > 0


def test_replot_redraws_every_figure_without_simulating(reference, tmp_path):
    folder, _ = reference
    copy = tmp_path / "copy.hdf5"
    copy.write_bytes((folder / cn.HDF5_NAME).read_bytes())
    done = run_script("--replot", str(copy))
    assert done.returncode == 0, done.stderr
    assert "started" not in done.stdout  # nothing simulated
    pictures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pictures == sorted(p.name for p in folder.glob("*.png"))
    assert "R_ee" in done.stdout and "FF 100ms" in done.stdout


# --------------------------------------------------------------------------------------------------
# Bad input, failing runs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--no-such-flag"], "unrecognized arguments"),
    (["--scale", "-1"], "must be positive"),
    (["--r-ee"], "at least one value"),
    (["--replot", "/nonexistent/file.hdf5"], "no such file"),
])
def test_bad_input_exits_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        cn.parse_args(argv)
    assert stop.value.code != 0
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_replot_of_a_foreign_file(tmp_path, capsys):
    import tables

    text = tmp_path / "notes.hdf5"
    text.write_text("not HDF5")
    other = tmp_path / "other.hdf5"
    with tables.open_file(str(other), "w") as h5:
        h5.create_array("/", "numbers", np.arange(3))
    for path, message in ((text, "not an HDF5 file"), (other, "holds no")):
        with pytest.raises(SystemExit) as stop:
            cn.parse_args(["--replot", str(path)])
        assert stop.value.code != 0
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_bad_flag_from_the_command_line_simulates_nothing(tmp_path):
    done = run_script("--scale", "0", "--out", str(tmp_path / "out"))
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "must be positive" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ncores", ["1", "2"])
def test_failing_run_names_index_and_values_and_keeps_finished_runs(tmp_path, ncores):
    out = tmp_path / "out"
    done = run_script("--scale", "0.1", "--r-ee", "1.0", "2.5", "--initial", "0.05", "--measure",
                      "0.1", "--target", "numpy", "--no-plots", "--fail-run", "1", "--ncores",
                      ncores, "--out", str(out))
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-2]
    assert last.startswith("clustered_network.py: error: run 1 (R_ee = 2.5)")
    rows = cn.sweep_rows(cn.load_sweep(str(out / cn.HDF5_NAME)))
    assert [row["idx"] for row in rows] == [0]


# --------------------------------------------------------------------------------------------------
# Several processes, SCOOP, resume: the same numbers as one process
# --------------------------------------------------------------------------------------------------


def test_two_cores_store_the_same_numbers_as_one(reference_numbers, tmp_path):
    done = run_script(*TINY, "--ncores", "2", "--no-plots", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert_same_numbers(stored_numbers(str(tmp_path / cn.HDF5_NAME)), reference_numbers)


def test_scoop_stores_the_same_numbers_as_one_process(reference_numbers, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "scoop", "-n", "2", SCRIPT, *TINY, "--scoop", "--no-plots",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=HERE,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_numbers(stored_numbers(str(tmp_path / cn.HDF5_NAME)), reference_numbers)


def test_resume_after_sigkill_completes_every_run_once(reference_numbers, tmp_path):
    # The reference's sweep, killed (whole process group) once its first run is stored: in one
    # process pypet stores a run (and its resume counter) before the next run starts and says so.
    process = subprocess.Popen(
        [sys.executable, SCRIPT, *TINY, "--no-plots", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=HERE,
        start_new_session=True,
    )
    for line in process.stdout:  # blocks until the script prints; ends if the script exits
        if line.startswith(f"run 2/{len(R_TINY)} started"):
            break
    assert process.poll() is None, "the sweep ended before it could be killed"
    resume_files = tmp_path / "resume" / cn.TRAJECTORY_NAME
    assert list(resume_files.glob("*.rcnt")), "no run was stored before the second started"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    done = run_script("--resume", "--no-plots", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    numbers = stored_numbers(str(tmp_path / cn.HDF5_NAME))
    assert_same_numbers(numbers, reference_numbers)
    traj = cn.load_sweep(str(tmp_path / cn.HDF5_NAME))
    assert [row["idx"] for row in cn.sweep_rows(traj)] == [0, 1, 2]
    assert all(traj.f_get_run_information(name)["completed"] for name in traj.f_get_run_names())


def test_resume_refuses_while_the_sweep_is_alive(tmp_path):
    import fcntl

    # A live sweep holds the lock (as its forked workers would after the parent was killed).
    tmp_path.joinpath("sweep.lock").write_text("")
    with open(tmp_path / "sweep.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        done = run_script("--resume", "--out", str(tmp_path))
    assert done.returncode != 0
    assert "still running" in done.stderr


# --------------------------------------------------------------------------------------------------
# Ctrl-C, SIGTERM, SIGKILL (issue 9): a stopped subrun is never stored as finished; the example
# stops cleanly on Ctrl-C and SIGTERM, and resumes after SIGKILL anywhere, also inside HDF5 writes.
# --------------------------------------------------------------------------------------------------


class StopAt(NetworkComponent):
    """A network_operation that, at simulated time ``at``, sends this process a real SIGINT or
    calls Brian2's stop(); ``what`` says which."""

    def __init__(self, what, at=5 * ms):
        self.what, self.at = what, at

    def build(self, traj, brian_list, network_dict):
        def act(t):
            if abs(t - self.at) < 0.05 * ms:
                if self.what == "sigint":
                    os.kill(os.getpid(), signal.SIGINT)
                else:
                    brian2.stop()

        brian_list.append(brian2.NetworkOperation(act, dt=0.1 * ms))


@pytest.mark.parametrize("what", ["sigint", "stop"])
def test_ctrl_c_during_a_subrun_raises_and_stop_is_analysed(what):
    log = []
    durations = (("first", 0, 20 * ms), ("second", 1, 10 * ms))
    components = [SpyComponent("c1", log, makes_group="build"), StopAt(what)]
    manager = NetworkManager(SpyRunner(log, durations), components, [SpyAnalyser("a1", log)])
    traj = Trajectory("t", add_time=False)
    manager.add_parameters(traj)
    assert signal.getsignal(signal.SIGINT) is brian2._int_handler  # Brian2's Ctrl-C handling is on
    if what == "sigint":
        with pytest.raises(KeyboardInterrupt, match=r"subrun `first` at t = 5\.\d* ms"):
            manager.run_network(traj)
        assert subruns_seen(log) == []  # the truncated subrun reached no analyser
    else:
        manager.run_network(traj)
        # stop() is the model's choice: the first subrun is analysed where it stopped, the next runs
        times = [e[3] for e in log if e[:2] == ("a1", "analyse")]
        assert subruns_seen(log) == ["first", "second"]
        assert times[0] == pytest.approx(5.0, abs=0.2) and times[1] == pytest.approx(times[0] + 10)
    assert signal.getsignal(signal.SIGINT) is brian2._int_handler  # the wrapper is gone again


def start_script(*args, **kwargs):
    """The example in a new session (its own process group), stdout and stderr piped."""
    return subprocess.Popen(
        [sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=HERE, start_new_session=True, **kwargs,
    )


def wait_for_line(process, prefix):
    """Read stdout until a line starts with prefix (blocks until the script prints it)."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return seen
    raise AssertionError(f"the script ended before printing {prefix!r}: {''.join(seen)}")


def assert_group_ends(pgid, within=10.0):
    """Every process of the group is gone within a few seconds (a bounded wait, not a sleep)."""
    import time

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    left = subprocess.run(["ps", "-o", "pid,ppid,args", "-g", str(pgid)], capture_output=True,
                          text=True).stdout
    os.killpg(pgid, signal.SIGKILL)
    raise AssertionError(f"processes outlived the sweep by {within} s:\n{left}")


def assert_resumes_to_reference(out, ncores, reference_numbers, finished_before=()):
    """--resume completes the sweep: the reference's numbers, every run once, none that had
    finished before simulated again. Returns the resume's stdout."""
    done = run_script("--resume", "--no-plots", "--ncores", ncores, "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert_same_numbers(stored_numbers(str(out / cn.HDF5_NAME)), reference_numbers)
    traj = cn.load_sweep(str(out / cn.HDF5_NAME))
    assert [row["idx"] for row in cn.sweep_rows(traj)] == [0, 1, 2]
    assert all(traj.f_get_run_information(name)["completed"] for name in traj.f_get_run_names())
    simulated_again = {int(line.split()[1].split("/")[0]) - 1
                       for line in done.stdout.splitlines() if line.startswith("run ")}
    assert not simulated_again & set(finished_before), done.stdout
    assert not (out / (cn.HDF5_NAME + ".before-write")).exists()
    return done.stdout


@pytest.mark.parametrize("ncores", ["1", "2"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_stop_every_process_and_resume(reference_numbers, tmp_path, signum,
                                                          ncores):
    # Ctrl-C as a terminal sends it (to the whole process group); SIGTERM to the main process only.
    process = start_script(*TINY, "--no-plots", "--ncores", ncores, "--out", str(tmp_path))
    wait_for_line(process, f"run 2/{len(R_TINY)} started")
    (os.killpg if signum == signal.SIGINT else os.kill)(process.pid, signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum], stderr
    assert_group_ends(process.pid)
    assert "Traceback" not in stderr
    name = signal.Signals(signum).name
    stopped = [line for line in stderr.splitlines()
               if line.startswith(f"clustered_network.py: stopped by {name}")]
    assert len(stopped) == 1, stderr
    assert f"continue with: python {SCRIPT} --resume --out {tmp_path}" in stderr
    # The runs it names as finished are in the file; the interrupted one is not stored as finished
    # (else --resume would keep it and the numbers below would differ from the reference).
    finished_text = stopped[0].split(": ")[-1]
    named = [] if finished_text == "none" else [
        int(run.split()[0]) for run in finished_text.split("), ")
    ]
    stored = [row["idx"] for row in cn.sweep_rows(cn.load_sweep(str(tmp_path / cn.HDF5_NAME)))]
    assert set(named) <= set(stored)
    assert_resumes_to_reference(tmp_path, ncores, reference_numbers, finished_before=named)


STRACE = shutil.which("strace")
needs_strace = pytest.mark.skipif(STRACE is None,
                                  reason="strace is not installed (apt-get install strace)")


def under_strace(out, ncores, inject=None, trace_file=os.devnull):
    """The tiny sweep under strace, following every process; ``inject`` e.g. 'signal=KILL:when=7'
    sends that signal to the process making the 7th pwrite64 call (HDF5 writes use pwrite64)."""
    command = [STRACE, "-f", "-qq", "-o", trace_file, "-e", "trace=pwrite64"]
    if inject:
        command += ["-e", f"inject=pwrite64:{inject}"]
    command += [sys.executable, SCRIPT, *TINY, "--no-plots", "--ncores", ncores, "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=HERE, start_new_session=True)
    stdout, stderr = process.communicate(timeout=300)
    assert_group_ends(process.pid)  # strace leads the session: nothing of the sweep outlives it
    return process.returncode, stdout, stderr


def kill_trial(tmp_path, reference_numbers, ncores, signal_name, when, final=False):
    """One trial: the sweep gets a signal at its `when`-th write, then --resume must complete it."""
    out = tmp_path / f"{signal_name}_{ncores}_{when}"
    status, stdout, stderr = under_strace(out, ncores, f"signal={signal_name}:when={when}")
    if signal_name == "KILL":
        assert status in (137, -9), f"not killed at write {when}: {status}\n{stderr[-2000:]}"
    else:
        assert status == 143 and "stopped by SIGTERM" in stderr, f"write {when}: {stderr[-2000:]}"
    resume_path = out / "resume" / cn.TRAJECTORY_NAME
    started = cn._runs_in_resume_snapshot(str(resume_path)) is not None
    finished = cn._finished_run_indices(str(resume_path)) if started else set()
    if final:  # the last kill point must hit the final stores, after every run was counted
        assert finished == {0, 1, 2}, f"write {when} came before the final stores"
    try:
        resumed = assert_resumes_to_reference(out, ncores, reference_numbers, finished)
    except AssertionError as error:
        raise AssertionError(f"{signal_name} at write {when}, {ncores} core(s): {error}") from None
    assert started or "starting it afresh" in resumed
    shutil.rmtree(out)


@needs_strace
@pytest.mark.parametrize("ncores,kills,terms", [("1", 6, 2), ("2", 4, 0)],
                         ids=["1-core", "2-cores"])
def test_a_signal_at_any_write_then_resume_gives_the_reference(reference_numbers, tmp_path, ncores,
                                                               kills, terms):
    # Count the sweep's writes (its numbers must be the reference's too), then spread SIGKILL (and
    # SIGTERM, which must wait for the write) over them, from the first write of the parameters
    # to the final stores. The count varies by a few writes from sweep to sweep; 20 before the end
    # is in the final stores.
    trace = tmp_path / "trace"
    status, _, stderr = under_strace(tmp_path / "counted", ncores, trace_file=str(trace))
    assert status == 0, stderr
    assert_same_numbers(stored_numbers(str(tmp_path / "counted" / cn.HDF5_NAME)), reference_numbers)
    writes = sum("pwrite64(" in line for line in trace.read_text().splitlines())
    assert writes > 100
    trials = []
    for signal_name, count in (("KILL", kills), ("TERM", terms)):
        points = sorted({int(round(x)) for x in np.linspace(1, writes - 20, count)})
        trials += [(signal_name, n, n == points[-1]) for n in points]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # two trials at a time: one per core
        for future in [pool.submit(kill_trial, tmp_path, reference_numbers, ncores, name, n,
                                   final=last) for name, n, last in trials]:
            future.result()


def test_resume_of_a_file_damaged_beyond_repair_says_so_in_one_line(tmp_path):
    process = start_script(*TINY, "--no-plots", "--out", str(tmp_path))
    wait_for_line(process, f"run 2/{len(R_TINY)} started")
    os.kill(process.pid, signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 143
    # Damaged by something other than the sweep (the disk, another program): no copy to go back to.
    (tmp_path / cn.HDF5_NAME).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 4096)
    done = run_script("--resume", "--no-plots", "--out", str(tmp_path))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "damaged beyond repair" in lines[0] and "1 finished run(s) are lost" in lines[0]
    assert "without --resume" in lines[0]


def test_a_killed_worker_fails_its_run_the_others_go_on_and_resume_completes(reference_numbers,
                                                                              tmp_path):
    process = start_script(*TINY, "--no-plots", "--ncores", "2", "--out", str(tmp_path))
    wait_for_line(process, f"run 2/{len(R_TINY)} started")
    with open(f"/proc/{process.pid}/task/{process.pid}/children") as children:
        workers = [int(pid) for pid in children.read().split()]
    assert workers
    os.kill(max(workers), signal.SIGKILL)  # the worker forked last: run 2's (the OOM killer's way)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "clustered_network.py: error: run 1 (R_ee = 2.5) did not complete" in stderr
    assert f"run 3/{len(R_TINY)} started" in stdout  # the sweep went on after the dead worker
    assert_group_ends(process.pid)
    stored = [row["idx"] for row in cn.sweep_rows(cn.load_sweep(str(tmp_path / cn.HDF5_NAME)))]
    assert stored == [0, 2]
    assert_resumes_to_reference(tmp_path, "2", reference_numbers, finished_before=stored)
