"""The clustered balanced network of Litwin-Kumar & Doiron (2012), two experiments with brian2pet.

Reproduces the main findings of

    A. Litwin-Kumar and B. Doiron, "Slow dynamics and high variability in balanced cortical
    networks with clustered connections", Nature Neuroscience 15, 1498-1505 (2012):

4000 excitatory (E) and 1000 inhibitory (I) integrate-and-fire neurons, with E neurons grouped into
clusters of 80 that connect R_ee times more densely within than between clusters.

Experiment 1, the sweep over R_ee (trajectory ``clustered_network``). In the uniform network
(R_ee = 1) spike counts are less variable than Poisson: the Fano factor (FF) stays below 1 and falls
with the counting window. With clusters (R_ee around 2.5) clusters switch slowly between high and
low activity, so the FF rises above 1 and grows with the window; spike counts are then strongly
correlated within a cluster but hardly at all on average. Above R_ee of about 3 a few clusters lock
into high activity and the FF collapses again.

Experiment 2, a stimulus to a few clusters (trajectory ``stimulus_response``). One network at
R_ee = 2.5 is built and pre-run once; every run starts from that state, rests, then raises the
input of the E neurons of 5 clusters. The stimulus quenches the variability: the FF drops at
stimulus onset, as Churchland et al. (2010) found across cortex, while the rate rises only a little.

Run ``python clustered_network.py --help`` for the options. By default both experiments run at scale
1.0 on every core, write ``results/clustered_network.hdf5`` and PNG figures beside it, and print a
table per experiment. ``--experiment`` picks one, ``python -m scoop -n N clustered_network.py
--scoop`` runs on several hosts, ``--resume`` continues experiments that were killed, and
``--replot FILE`` redraws the figures from a stored file.

Speed: the objects that run every time step use Brian2's cython target when a C compiler works
(``--target auto``, compiled once into Brian2's cache), numpy otherwise (about three times slower
per run). Code that runs once, such as drawing the synapses, always uses numpy, so the network of a
run is the same for every target. ``--device cpp_standalone`` instead compiles each experiment once
into a C++ program that every run executes with its own R_ee or strength (brian2pet section 8): about
twice as fast per run, with synapses drawn by the program's generator.

The file reads top to bottom as the brian2pet documentation's main script does (spec 7.3):
parameters and model helpers; components (neurons, connections, stimulus); runners; analysers
(activity guard, monitors, Fano factor, correlations, quenching); one main function per experiment;
then reading stored experiments back, tables, figures, and the command line with its output folder,
lock and resume. What any long exploration needs (storage that a kill cannot ruin, clean stops,
forked workers, loading files safely) comes from brian2pet's section 7.
"""

import argparse
import contextlib
import ctypes
import gc
import json
import os
import shlex
import shutil
import socket
import sys
import time

import numpy as np
from brian2 import (
    BrianLogger,
    Clock,
    Hz,
    NeuronGroup,
    PopulationRateMonitor,
    Quantity,
    SpikeMonitor,
    StateMonitor,
    Subgroup,
    Synapses,
    defaultclock,
    get_device,
    ms,
    prefs,
    second,
    set_device,
)
from brian2 import seed as brian2_seed

from brian2pet import (
    Brian2MonitorResult,
    Brian2Parameter,
    Brian2Result,
    CheckpointedHDF5StorageService,
    FileDamaged,
    FileRefused,
    ForkingEnvironment,
    NetworkAnalyser,
    NetworkComponent,
    NetworkManager,
    NetworkRunner,
    StandaloneNetworkManager,
    Terminated,
    check_file,
    finished_runs,
    load_nodes,
    prepare_resume,
    remove_from_file,
    remove_resume_files,
    restore_checkpoint,
    run_command,
    stop_cleanly_on_signals,
)

TRAJECTORY_NAME = "clustered_network"  # experiment 1, the sweep over R_ee
STIMULUS_TRAJECTORY_NAME = "stimulus_response"  # experiment 2, in the same file
HDF5_NAME = "clustered_network.hdf5"
DEFAULT_R_EE = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5)
DEFAULT_STRENGTHS = (0.0, 0.07, 0.15)  # stimulus strengths: rise of mu of the stimulated E neurons
FANO_WINDOWS_MS = (100, 250, 500, 1000)
CLUSTER_SIZE = 80  # E neurons per cluster
P_EE = 0.2  # mean E to E connection probability: K = P_EE * N_e inputs

# Dimensionless membrane potential V: threshold 1, reset 0. Each source type drives a difference of
# two exponentials (rise 1 ms; decay 3 ms for E, 2 ms for I) whose integral equals the weight, so a
# weight is the total jump it gives to V. Inhibitory weights enter with a minus sign (see on_pre).
# mu_stim is the rise of the bias that a stimulus gives (CNStimulus); it is 0 without one.
# Constants are names, filled from `namespace=`, so that one code object serves every parameter value.
# What follows from the explored R_ee (the E to E probabilities p_in, p_out and the weight J_in) is a
# variable of the group instead, set in build(): on a standalone device (--device) a compiled program
# takes a run's values for variables, not for names compiled into it (brian2pet section 8).
NEURON_EQUATIONS = """
dV/dt = (mu + mu_stim - V)/tau + I_syn_e + I_syn_i : 1 (unless refractory)
I_syn_e = (x_e_decay - x_e_rise)/(tau_decay_e - tau_rise) : Hz
I_syn_i = (x_i_decay - x_i_rise)/(tau_decay_i - tau_rise) : Hz
dx_e_rise/dt = -x_e_rise/tau_rise : 1
dx_e_decay/dt = -x_e_decay/tau_decay_e : 1
dx_i_rise/dt = -x_i_rise/tau_rise : 1
dx_i_decay/dt = -x_i_decay/tau_decay_i : 1
mu : 1 (constant)
mu_stim : 1
tau : second (constant)
cluster : integer (constant)
p_in : 1 (shared, constant)
p_out : 1 (shared, constant)
J_in : 1 (shared, constant)
"""

# One Synapses object per source type. Probability and weight depend on the target's type (cluster -1
# marks an I neuron) and, for E to E, on whether both neurons share a cluster.
SAME = "int(cluster_pre == cluster_post)"
TO_I = "int(cluster_post < 0)"
E_SOURCE_P = f"{TO_I}*p_ie + (1 - {TO_I})*({SAME}*p_in_post + (1 - {SAME})*p_out_post)"
E_SOURCE_W = f"{TO_I}*J_ie + (1 - {TO_I})*({SAME}*J_in_post + (1 - {SAME})*J_out)"
I_SOURCE_P = f"{TO_I}*p_ii + (1 - {TO_I})*p_ei"
I_SOURCE_W = f"{TO_I}*J_ii + (1 - {TO_I})*J_ei"


# ---------------------------------------------------------------------------------------------------
# Model helpers: small pure functions, so that tests can check them without simulating
# ---------------------------------------------------------------------------------------------------


def cluster_labels(n_e, cluster_size):
    """Cluster index of each E neuron: clusters are runs of ``cluster_size`` consecutive indices."""
    return np.arange(n_e) // cluster_size


def cluster_probabilities(R_ee, n_e, cluster_size, p_ee):
    """E to E connection probabilities ``(p_in, p_out)`` within and between clusters.

    Chosen so that an E neuron keeps K = p_ee * n_e inputs on average whatever R_ee: p_in = R_ee *
    p_out and cluster_size * p_in + (n_e - cluster_size) * p_out = K.
    """
    p_out = p_ee * n_e / (cluster_size * (R_ee - 1) + n_e)
    return R_ee * p_out, p_out


def synaptic_weights(n_e, p_ee, tau_e, tau_i):
    """Weights J_ee (E to E between clusters), J_ie (E to I), J_ei (I to E), J_ii, as magnitudes.

    Scaled by 1/sqrt(K) (K = p_ee * n_e, the mean E to E in-degree) as in the balanced network, and
    by the target's membrane time constant in ms, as in the paper's methods.
    """
    sqrt_k = np.sqrt(p_ee * n_e)
    tau_e_ms, tau_i_ms = float(tau_e / ms), float(tau_i / ms)
    return {
        "J_ee": 10.0 / (tau_e_ms * sqrt_k),
        "J_ie": 4.0 / (tau_i_ms * sqrt_k),
        "J_ei": 16.0 * 1.2 / (tau_e_ms * sqrt_k),
        "J_ii": 16.0 / (tau_i_ms * sqrt_k),
    }


def stream_seed(seed, *keys):
    """An integer seed for one random stream, e.g. (seed, run index); independent of process count."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


@contextlib.contextmanager
def codegen_target(target):
    """Create Brian2 code objects with ``target`` inside the block.

    Code that runs once (drawing synapses, setting weights) gains nothing from cython but would
    cost seconds of compilation per object; numpy also draws the same synapses for every target.
    The objects that run every time step are made later, at the first run, with the chosen target.
    """
    previous = prefs.codegen.target
    prefs.codegen.target = target
    try:
        yield
    finally:
        prefs.codegen.target = previous


def release_freed_memory():
    """Collect the previous run's objects and hand their freed memory back to the system.

    The spike queues of a run's synapses are thousands of small C++ allocations; freed, glibc keeps
    them in the process, so a second run would raise the peak by about 200 MB at scale 1.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def explored_in(traj, group_name):
    """True if any explored parameter lives in the parameter group ``group_name``."""
    prefix = f"parameters.{group_name}."
    return any(name.startswith(prefix) for name in traj.f_get_explored_parameters())


# ---------------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------------


class CNNeuronGroup(NetworkComponent):
    """All 5000 neurons in ONE NeuronGroup, E = the first N_e, I = the rest.

    One group instead of two halves the per-step work of state update, threshold and reset, which
    with the numpy target is most of the simulation time. Pre-built when no ``model`` parameter is
    explored. Initial values come from a generator seeded only by ``simulation.seed``, so a network
    built per run (SCOOP, resume) starts exactly like the pre-built one.

    network_dict:
        Adds 'neurons' (the group), 'neurons_e', 'neurons_i' (its subgroups).
    """

    def add_parameters(self, traj):
        scale = traj.simulation.scale
        traj.v_standard_parameter = Brian2Parameter
        traj.f_add_parameter("model.eqs", NEURON_EQUATIONS, comment="Neuron and synapse equations")
        traj.f_add_parameter("model.N_e", int(4000 * scale), comment="Excitatory neurons")
        traj.f_add_parameter("model.N_i", int(1000 * scale), comment="Inhibitory neurons")
        traj.f_add_parameter("model.tau_e", 15 * ms, comment="Membrane time constant, E")
        traj.f_add_parameter("model.tau_i", 10 * ms, comment="Membrane time constant, I")
        traj.f_add_parameter("model.mu_e_min", 1.1, comment="Lower bound of the E bias")
        traj.f_add_parameter("model.mu_e_max", 1.2, comment="Upper bound of the E bias")
        traj.f_add_parameter("model.mu_i_min", 1.0, comment="Lower bound of the I bias")
        traj.f_add_parameter("model.mu_i_max", 1.05, comment="Upper bound of the I bias")
        traj.f_add_parameter("model.V_th", 1.0, comment="Spike when V exceeds this")
        traj.f_add_parameter("model.V_reset", 0.0, comment="V after a spike")
        traj.f_add_parameter("model.refractory", 5 * ms, comment="Absolute refractory period")
        traj.f_add_parameter("model.synaptic.tau_rise", 1 * ms, comment="Synaptic rise, E and I")
        traj.f_add_parameter("model.synaptic.tau_decay_e", 3 * ms, comment="Synaptic decay, E")
        traj.f_add_parameter("model.synaptic.tau_decay_i", 2 * ms, comment="Synaptic decay, I")

    def pre_build(self, traj, brian_list, network_dict):
        if not explored_in(traj, "model"):
            self._build(traj, brian_list, network_dict)

    def build(self, traj, brian_list, network_dict):
        # Asking the dict rather than remembering a flag keeps this right for a manager that was
        # pickled without its pre-built objects (SCOOP, resume).
        if "neurons" not in network_dict:
            self._build(traj, brian_list, network_dict)

    @staticmethod
    def _build(traj, brian_list, network_dict):
        # Set here, not in main(): SCOOP workers and resumed runs never execute main().
        prefs.codegen.target = traj.simulation.codegen_target
        defaultclock.dt = traj.simulation.dt

        model = traj.parameters.model
        n_e, n_i = model.N_e, model.N_i
        namespace = {
            "V_th": model.V_th,
            "V_reset": model.V_reset,
            "t_ref": model.refractory,
            "tau_rise": model.synaptic.tau_rise,
            "tau_decay_e": model.synaptic.tau_decay_e,
            "tau_decay_i": model.synaptic.tau_decay_i,
        }
        neurons = NeuronGroup(
            n_e + n_i,
            model.eqs,
            threshold="V > V_th",
            reset="V = V_reset",
            refractory="t_ref",
            method="euler",
            namespace=namespace,
            name="neurons",
        )
        rng = np.random.default_rng(stream_seed(traj.simulation.seed, 0))
        neurons.tau[:n_e] = model.tau_e
        neurons.tau[n_e:] = model.tau_i
        neurons.mu[:n_e] = rng.uniform(model.mu_e_min, model.mu_e_max, n_e)
        neurons.mu[n_e:] = rng.uniform(model.mu_i_min, model.mu_i_max, n_i)
        neurons.V = rng.uniform(0.0, 1.0, n_e + n_i)
        neurons.cluster[:n_e] = cluster_labels(n_e, traj.parameters.connections.cluster_size)
        neurons.cluster[n_e:] = -1

        brian_list.append(neurons)
        # Named subgroups: Brian2 would number them per process, and the names go into the results.
        network_dict.update(
            neurons=neurons,
            neurons_e=Subgroup(neurons, 0, n_e, name="neurons_e"),
            neurons_i=Subgroup(neurons, n_e, n_e + n_i, name="neurons_i"),
        )


class CNConnections(NetworkComponent):
    """Two Synapses objects, one from all E neurons and one from all I neurons, to every neuron.

    E to E is part of the first: its probability (p_in or p_out) and weight (J_in or J_out) follow
    from the neurons' cluster labels, so clustering costs no extra objects (one object per cluster
    pair would cost minutes of compilation with the cython target). Built per run when a
    ``connections`` parameter such as R_ee is explored, pre-built otherwise. What R_ee sets (p_in,
    p_out, J_in) goes into shared variables of the neurons, which the synapses read as p_in_post and
    so on: in every run, also on a standalone device, whose program draws the synapses once per
    execution with the run's values (there the synapses are made once, for all runs).

    ``fail_run``: for tests only, raise in the run with this index.

    network_dict:
        Expects 'neurons_e', 'neurons_i', 'neurons'. Adds 'connections' (list of both Synapses).
    """

    def __init__(self, fail_run=None):
        self.fail_run = fail_run
        # True once this process has built a run's connections. A forked worker starts with the
        # parent's False: its first run has no earlier network to free, and a collection would
        # only copy the parent's memory pages that it touches.
        self._built_a_run = False

    def add_parameters(self, traj):
        model = traj.parameters.model
        traj.v_standard_parameter = Brian2Parameter
        traj.f_add_parameter("connections.R_ee", 1.0, comment="Clustering ratio p_in / p_out")
        traj.f_add_parameter(
            "connections.cluster_size", CLUSTER_SIZE, comment="E neurons per cluster"
        )
        traj.f_add_parameter("connections.p_ee", P_EE, comment="Mean E to E probability (K/N_e)")
        traj.f_add_parameter("connections.p_ie", 0.5, comment="E to I probability")
        traj.f_add_parameter("connections.p_ei", 0.5, comment="I to E probability")
        traj.f_add_parameter("connections.p_ii", 0.5, comment="I to I probability")
        traj.f_add_parameter(
            "connections.strength_factor", 1.9, comment="J_in / J_out when R_ee > 1"
        )
        p_ee = traj.parameters.connections.p_ee
        weights = synaptic_weights(model.N_e, p_ee, model.tau_e, model.tau_i)
        for name, value in weights.items():
            traj.f_add_parameter(f"connections.{name}", value, comment=f"Weight {name} (magnitude)")

    def pre_build(self, traj, brian_list, network_dict):
        if "neurons" in network_dict and not explored_in(traj, "connections"):
            brian2_seed(stream_seed(traj.simulation.seed, 1))
            self._set_clustering(traj, network_dict["neurons"])
            self._build(traj, brian_list, network_dict)

    def build(self, traj, brian_list, network_dict):
        if self.fail_run is not None and traj.v_idx == self.fail_run:
            raise RuntimeError("deliberate failure (--fail-run)")
        if not explored_in(traj, "connections"):
            return  # pre-built
        # Every run draws its synapses from the same random state (brian2pet section 5), so runs
        # of different R_ee differ in R_ee only, not in their random numbers.
        self._set_clustering(traj, network_dict["neurons"])
        if "connections" not in network_dict:
            if self._built_a_run:
                release_freed_memory()
            self._build(traj, brian_list, network_dict)
            self._built_a_run = True

    @staticmethod
    def _set_clustering(traj, neurons):
        """p_in, p_out and J_in, which R_ee sets, into the neurons' shared variables."""
        conn = traj.parameters.connections
        p_in, p_out = cluster_probabilities(
            conn.R_ee, traj.parameters.model.N_e, conn.cluster_size, conn.p_ee)
        if p_in > 1:
            raise ValueError(
                f"R_ee = {conn.R_ee} gives a within-cluster probability of {p_in:.3f} > 1"
            )
        neurons.p_in, neurons.p_out = p_in, p_out
        neurons.J_in = conn.J_ee * (conn.strength_factor if conn.R_ee > 1 else 1.0)

    @staticmethod
    def _build(traj, brian_list, network_dict):
        conn = traj.parameters.connections
        n_e = traj.parameters.model.N_e
        namespace = dict(
            p_ie=conn.p_ie, p_ei=conn.p_ei, p_ii=conn.p_ii,
            J_out=conn.J_ee, J_ie=conn.J_ie, J_ei=conn.J_ei, J_ii=conn.J_ii, N_e=n_e,
        )
        neurons = network_dict["neurons"]
        with codegen_target("numpy"):
            connections = CNConnections._connect(network_dict, neurons, namespace)
        brian_list.extend(connections)
        network_dict["connections"] = connections

    @staticmethod
    def _connect(network_dict, neurons, namespace):
        from_e = Synapses(
            network_dict["neurons_e"], neurons, "w : 1 (constant)",
            on_pre="x_e_rise_post += w\nx_e_decay_post += w",
            namespace=namespace, name="from_e",
        )
        # E indices start at 0 in both source and target, so i != j excludes exactly the autapses.
        from_e.connect("i != j", p=E_SOURCE_P)
        from_e.w = E_SOURCE_W
        from_i = Synapses(
            network_dict["neurons_i"], neurons, "w : 1 (constant)",
            on_pre="x_i_rise_post -= w\nx_i_decay_post -= w",
            namespace=namespace, name="from_i",
        )
        # Source indices count from the first I neuron, target indices from the first E neuron.
        from_i.connect("j != i + N_e", p=I_SOURCE_P)
        from_i.w = I_SOURCE_W
        return [from_e, from_i]


def stimulated_clusters(n_clusters_total, n_stimulated, seed):
    """Sorted indices of ``n_stimulated`` clusters, drawn at random without repeats by ``seed``."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_clusters_total, size=n_stimulated, replace=False))


class CNStimulus(NetworkComponent):
    """A stimulus: raises mu of the E neurons of a few clusters by ``stimulus.strength``.

    The paper's stimulus experiment: the same network, at rest and then driven, for several
    stimulus strengths (0 is the control). The stimulus is a Synapses object from each stimulated E
    neuron onto itself that sets mu_stim through a summed variable. It is built per run, when
    network_dict lacks it (in every run, and once for all runs on a standalone device), and goes
    into brian_list, so the manager adds it to the network that the pre-run left; pypet.brian2
    would silently leave it out, and no run would see a stimulus. Its strength, the explored
    parameter, is its shared variable, set in every run. It is built switched off; add_to_network
    switches it on for the ``stimulus`` subrun and remove_from_network switches it off again.

    network_dict:
        Expects 'neurons_e'. Adds 'stimulus' (the Synapses) and 'stimulated_clusters' (indices).
    """

    def add_parameters(self, traj):
        traj.v_standard_parameter = Brian2Parameter
        traj.f_add_parameter(
            "stimulus.strength", 0.0, comment="Rise of mu of the stimulated E neurons (0: control)"
        )
        traj.f_add_parameter("stimulus.n_clusters", 5, comment="Number of stimulated clusters")
        traj.f_add_parameter(
            "stimulus.cluster_seed", traj.simulation.seed,
            comment="Seed of the random choice of the stimulated clusters",
        )

    def build(self, traj, brian_list, network_dict):
        n_e = traj.parameters.model.N_e
        size = traj.parameters.connections.cluster_size
        clusters = stimulated_clusters(
            n_e // size, traj.stimulus.n_clusters, stream_seed(traj.stimulus.cluster_seed, 3)
        )
        network_dict["stimulated_clusters"] = clusters
        if "stimulus" not in network_dict:
            targets = np.flatnonzero(np.isin(cluster_labels(n_e, size), clusters))
            neurons_e = network_dict["neurons_e"]
            with codegen_target("numpy"):
                stimulus = Synapses(
                    neurons_e, neurons_e,
                    "strength : 1 (shared, constant)\nmu_stim_post = strength : 1 (summed)",
                    name="stimulus",
                )
                stimulus.connect(i=targets, j=targets)
            stimulus.active = False
            brian_list.append(stimulus)
            network_dict["stimulus"] = stimulus
        network_dict["stimulus"].strength = traj.stimulus.strength

    def add_to_network(self, traj, network, current_subrun, subrun_list, network_dict):
        if current_subrun.v_name == "stimulus":
            # The object is in the network for the whole run (the manager put it there from
            # brian_list); its active flag decides whether it runs, which Brian2 recommends over
            # network.remove and network.add for pausing an object.
            network_dict["stimulus"].active = True

    def remove_from_network(self, traj, network, current_subrun, subrun_list, network_dict):
        if current_subrun.v_name == "stimulus":
            network_dict["stimulus"].active = False
            # An inactive summed variable stops updating its target, which keeps its last value.
            network_dict["neurons_e"].mu_stim = 0


# ---------------------------------------------------------------------------------------------------
# Runners
# ---------------------------------------------------------------------------------------------------


def add_subrun(traj, name, duration, order, comment):
    """A subrun for the runner (spec 7.5): a duration parameter under simulation.durations (or
    .pre_durations, the pre-run's), run in the order of its ``order`` annotation."""
    par = traj.f_add_parameter(Brian2Parameter, name, duration, comment=comment)
    par.v_annotations.order = order


class CNNetworkRunner(NetworkRunner):
    """An initial run that lets the network settle, then the measured run (spec 7.5)."""

    def __init__(self, initial_run=0.5 * second, measurement_run=10 * second):
        # Brian2's text report would interleave between processes; per-run lines are printed instead.
        super().__init__(report=None)
        self.initial_run = initial_run
        self.measurement_run = measurement_run

    def add_parameters(self, traj):
        add_subrun(traj, "simulation.durations.initial_run", self.initial_run, 0,
                   "Settling time, not analysed")
        add_subrun(traj, "simulation.durations.measurement_run", self.measurement_run, 1,
                   "Recorded and analysed")


class CNStimulusRunner(CNNetworkRunner):
    """The stimulus experiment's subruns: a pre-run that lets the network settle (run once, spec
    7.3), then in every run a spontaneous period and a stimulus period of equal length."""

    def __init__(self, settling_run=0.5 * second, period=5 * second):
        super().__init__()
        self.settling_run = settling_run
        self.period = period

    def add_parameters(self, traj):
        add_subrun(traj, "simulation.pre_durations.settling_run", self.settling_run, 0,
                   "Settling time, simulated once before all runs (the pre-run), not analysed")
        add_subrun(traj, "simulation.durations.spontaneous", self.period, 0,
                   "Recorded without stimulus")
        add_subrun(traj, "simulation.durations.stimulus", self.period, 1,
                   "Recorded with the stimulus switched on")


def say(line):
    """Print ``line`` in one write: the lines of workers that print at the same moment stay whole."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def is_pre_run(subrun):
    """True for a subrun of the pre-run (spec 7.5: the runner takes those from pre_durations)."""
    return subrun.v_full_name.startswith("parameters.simulation.pre_durations.")


def explored_text(traj):
    """'R_ee = 2.5' for the current run (every explored parameter, by its short name)."""
    return ", ".join(
        f"{param.v_name} = {param.f_get()}"
        for param in traj.f_get_explored_parameters(copy=False).values()
    )


# ---------------------------------------------------------------------------------------------------
# Analysers
# ---------------------------------------------------------------------------------------------------


def is_measurement(subrun):
    return subrun.v_name == "measurement_run"


class CNActivityGuard(NetworkAnalyser):
    """Cancels the rest of a run whose E neurons fire pathologically fast (spec 7.5's example).

    After every subrun of a run (not of the pre-run) it takes the mean E rate in that subrun from a
    population rate monitor of the E neurons, which records the whole run. Above
    ``analysis.max_rate_e`` it empties ``subrun_list``,
    so the runner simulates nothing more in this run, and stores why. It is listed first among
    the analysers, so that the analysers after it already see the emptied list: a run cancelled
    before its measurement stores no measurement results at all.

    network_dict:
        Expects 'neurons_e'. Adds 'guard' (the monitor, and when each subrun started, by name: on a
        standalone device every analysis comes after the whole run).
    Results: statistics.pathological (Brian2Result: subrun, rate_e, max_rate_e, cancelled, reason),
    only in a run where the rate was exceeded.
    """

    def add_parameters(self, traj):
        traj.f_add_parameter(
            Brian2Parameter, "analysis.max_rate_e", 100 * Hz,
            comment="Mean E rate above which a run is pathological and its later subruns cancelled",
        )

    def add_to_network(self, traj, network, current_subrun, subrun_list, network_dict):
        if is_pre_run(current_subrun):
            return
        if "guard" not in network_dict:  # the run's first subrun
            monitor = PopulationRateMonitor(network_dict["neurons_e"], name="guard_rate_e")
            network.add(monitor)
            network_dict["guard"] = {"monitor": monitor, "starts": {}}
        network_dict["guard"]["starts"][current_subrun.v_name] = network.t

    def analyse(self, traj, network, current_subrun, subrun_list, network_dict):
        if is_pre_run(current_subrun):
            return
        monitor = network_dict["guard"]["monitor"]
        t_start = network_dict["guard"]["starts"][current_subrun.v_name]
        # The subrun's own stretch of the record (which goes on to the run's end when it is read
        # on a standalone device).
        in_subrun = (monitor.t >= t_start - 1e-9 * second) & (monitor.t < network.t - 1e-9 * second)
        rate_e = np.mean(monitor.rate[in_subrun])
        max_rate_e = traj.analysis.max_rate_e
        if rate_e <= max_rate_e:
            return
        cancelled = ", ".join(subrun.v_name for subrun in subrun_list) or "nothing (last subrun)"
        subrun_list.clear()  # the runner stops after this subrun (spec 7.5)
        reason = (
            f"mean E rate {float(rate_e / Hz):.1f} Hz in subrun {current_subrun.v_name} exceeds "
            f"analysis.max_rate_e = {float(max_rate_e / Hz):g} Hz; cancelled: {cancelled}"
        )
        traj.f_add_result(
            Brian2Result, "statistics.pathological", subrun=current_subrun.v_name, rate_e=rate_e,
            max_rate_e=max_rate_e, cancelled=cancelled, reason=reason,
            comment="Why the remaining subruns of this run were cancelled",
        )
        say(f"run {traj.v_idx + 1}/{len(traj)} cancelled: {explored_text(traj)}; {reason}")


class CNMonitorAnalysis(NetworkAnalyser):
    """Records the measured subruns: spikes of all E neurons, V and synaptic currents of a few E
    neurons from two clusters, and the mean rates of E and I.

    ``measured``: names of the recorded subruns, which follow each other (the sweep records its
    measurement_run; the stimulus experiment its spontaneous and stimulus periods). The monitors go
    in before the first and are stored and taken out after the last (or after the last that ran,
    when the guard cancelled the rest).

    network_dict:
        Expects 'neurons_e', 'neurons_i'. Adds 'monitors' (dict name -> monitor), 'rate_i' (a
        population rate monitor of the I neurons), 'measurement' (its start time) and 'periods'
        (recorded subrun name -> [start, end] time).
    Results: monitors.spikes_e, monitors.V, monitors.I_syn_e, monitors.I_syn_i (Brian2MonitorResult),
    statistics.rates (Brian2Result with e and i in Hz, over all recorded subruns).
    """

    def __init__(self, measured=("measurement_run",)):
        self.measured = tuple(measured)

    def add_parameters(self, traj):
        size = traj.parameters.connections.cluster_size
        traj.f_add_parameter(
            "analysis.neuron_records", (0, 1, size, size + 1),
            comment="E neurons whose V and currents are recorded: two in each of two clusters",
        )
        traj.f_add_parameter(
            Brian2Parameter, "analysis.record_dt", 0.5 * ms,
            comment="Sampling step of the recorded traces",
        )

    def _is_last(self, subrun_list):
        """True when no recorded subrun is left to run."""
        return not any(subrun.v_name in self.measured for subrun in subrun_list)

    def add_to_network(self, traj, network, current_subrun, subrun_list, network_dict):
        if current_subrun.v_name not in self.measured:
            return
        network_dict.setdefault("periods", {})[current_subrun.v_name] = [network.t, None]
        if "monitors" in network_dict:
            return  # recording since an earlier subrun
        neurons_e = network_dict["neurons_e"]
        record = list(traj.analysis.neuron_records)
        # Fixed names (Brian2 would number them per process) keep the stored data identical
        # however the runs are spread over processes. The clock needs one too: given dt= alone,
        # each StateMonitor makes a clock named clock_1, clock_2, ..., the name goes into the
        # generated code, and a process that simulates several runs would compile the monitors
        # anew whenever the numbering shifts.
        clock = Clock(dt=traj.analysis.record_dt, name="record_clock")
        monitors = {"spikes_e": SpikeMonitor(neurons_e, record=True, name="spikes_e")}
        for variable in ("V", "I_syn_e", "I_syn_i"):
            monitors[variable] = StateMonitor(
                neurons_e, variable, record=record, clock=clock, name=f"trace_{variable}"
            )
        # The I neurons' rate: one number per time step, cheaper than their spikes.
        rate_i = PopulationRateMonitor(network_dict["neurons_i"], name="rate_i")
        network.add(rate_i, *monitors.values())
        network_dict.update(monitors=monitors, rate_i=rate_i, measurement={"t_start": network.t})

    def analyse(self, traj, network, current_subrun, subrun_list, network_dict):
        if current_subrun.v_name not in self.measured:
            return
        network_dict["periods"][current_subrun.v_name][1] = network.t
        if not self._is_last(subrun_list):
            return
        monitors = network_dict["monitors"]
        comments = {
            "spikes_e": "Spikes of all E neurons during the measurement",
            "V": "Membrane potential of the recorded E neurons",
            "I_syn_e": "Excitatory synaptic input of the recorded E neurons",
            "I_syn_i": "Inhibitory synaptic input of the recorded E neurons",
        }
        for name, monitor in monitors.items():
            traj.f_add_result(Brian2MonitorResult, f"monitors.{name}", monitor, comment=comments[name])

        duration = network.t - network_dict["measurement"]["t_start"]
        traj.f_add_result(
            Brian2Result, "statistics.rates",
            e=len(monitors["spikes_e"].t) / traj.parameters.model.N_e / duration,
            i=np.mean(network_dict["rate_i"].rate),
            comment="Mean firing rates of E and I neurons during the measurement",
        )

    def remove_from_network(self, traj, network, current_subrun, subrun_list, network_dict):
        if current_subrun.v_name in self.measured and self._is_last(subrun_list):
            network.remove(network_dict["rate_i"], *network_dict["monitors"].values())


def spike_counts(spike_t, spike_i, n_neurons, t_start, t_stop, window):
    """Spike counts, shape (n_neurons, windows): [t_start, t_stop) cut into whole windows (a
    remainder is dropped). A spike on a window border (up to rounding) counts for the later one."""
    t = _seconds(spike_t)
    neuron = np.asarray(spike_i, dtype=np.int64)
    t_start, t_stop, window = (float(_seconds(x)) for x in (t_start, t_stop, window))
    n_bins = max(int(np.floor((t_stop - t_start) / window + 1e-9)), 0)
    bins = np.floor((t - t_start) / window + 1e-9).astype(np.int64)
    inside = (bins >= 0) & (bins < n_bins)
    return np.bincount(
        neuron[inside] * n_bins + bins[inside], minlength=n_neurons * n_bins
    ).reshape(n_neurons, n_bins)


def fano_factor(spike_t, spike_i, n_neurons, t_start, t_stop, windows):
    """Mean Fano factor of spike counts for each counting window.

    The interval [t_start, t_stop) is cut into whole windows (see spike_counts). For every neuron
    that fired in it, FF = variance / mean of its counts across windows (sample variance); the
    result is the mean over those neurons, one value per window (NaN if fewer than two windows fit
    or no neuron fired). Times may be Brian2 quantities or plain seconds.
    """
    result = np.full(len(windows), np.nan)
    for k, window in enumerate(np.atleast_1d(_seconds(windows))):
        counts = spike_counts(spike_t, spike_i, n_neurons, t_start, t_stop, window)
        if counts.shape[1] < 2:
            continue
        mean = counts.mean(axis=1)
        fired = mean > 0
        if fired.any():
            variance = counts[fired].var(axis=1, ddof=1)
            result[k] = np.mean(variance / mean[fired])
    return result


def _seconds(value):
    if isinstance(value, Quantity):
        return np.asarray(value / second, dtype=float)
    return np.asarray(value, dtype=float)


class CNFanoFactorComputer(NetworkAnalyser):
    """Fano factor of E spike counts for each counting window after the measurement run.

    network_dict:
        Expects 'monitors' and 'measurement' from CNMonitorAnalysis (so it is listed after it).
    Results: statistics.fano_factor (Brian2Result: window, a Quantity array, and ff, floats) and
    statistics.mean_fano_factor (FF at ``analysis.mean_fano_window``).
    """

    def add_parameters(self, traj):
        traj.f_add_parameter(
            "analysis.fano_windows", tuple(w / 1000.0 for w in FANO_WINDOWS_MS),
            comment="Counting windows for the Fano factor, in seconds",
        )
        traj.f_add_parameter(
            Brian2Parameter, "analysis.mean_fano_window", 100 * ms,
            comment="Window of statistics.mean_fano_factor",
        )

    def analyse(self, traj, network, current_subrun, subrun_list, network_dict):
        if not is_measurement(current_subrun):
            return
        spikes = network_dict["monitors"]["spikes_e"]
        t_start = network_dict["measurement"]["t_start"]
        windows = np.array(traj.analysis.fano_windows) * second
        counting = (spikes.t[:], spikes.i[:], traj.parameters.model.N_e, t_start, network.t)
        ff = fano_factor(*counting, windows)
        mean_ff = float(fano_factor(*counting, [traj.analysis.mean_fano_window])[0])
        traj.f_add_result(
            Brian2Result, "statistics.fano_factor", window=windows, ff=ff,
            comment="Mean Fano factor of E spike counts per counting window",
        )
        traj.f_add_result(
            "statistics.mean_fano_factor", mean_ff,
            comment="Mean Fano factor of E spike counts at analysis.mean_fano_window",
        )
        ff_text = " ".join(f"{w * 1000:g}ms:{f:.2f}" for w, f in zip(traj.analysis.fano_windows, ff))
        print_done(traj, f"FF {ff_text}")


def print_done(traj, text):
    wall = time.time() - run_started.get(traj.v_idx, time.time())
    say(f"run {traj.v_idx + 1}/{len(traj)} done in {wall:.0f} s on {socket.gethostname()}: "
        f"{explored_text(traj)}; {text}")


def count_correlations(spike_t, spike_i, labels, t_start, t_stop, window, n_sample=2000, seed=0):
    """Pearson correlations of spike counts between pairs of neurons, grouped by cluster.

    ``labels`` gives each neuron's cluster (its length is the number of neurons). Counts are taken
    in consecutive windows (see spike_counts); a neuron whose count never changes (a silent one)
    has no correlation and is left out. Returns a dict: same_cluster, other_cluster and all (the
    mean r over ALL such pairs; NaN if there are none), n_neurons (those taking part), and
    sample_same_cluster / sample_other_cluster (r of up to ``n_sample`` random pairs of each kind,
    drawn with ``seed``, for histograms).

    No loop over pairs: with z the counts of each neuron standardised over windows, r of two
    neurons is the mean over windows of z_a * z_b, so the sum of r over all pairs of a set of
    neurons is (|sum of their z|^2 - sum of |z_a|^2) / (2 * windows), and |z_a|^2 = windows.
    """
    labels = np.asarray(labels)
    counts = spike_counts(spike_t, spike_i, len(labels), t_start, t_stop, window).astype(float)
    n_bins = counts.shape[1]
    std = counts.std(axis=1) if n_bins > 1 else np.zeros(len(labels))
    taking_part = std > 0
    z = (counts[taking_part] - counts[taking_part].mean(axis=1, keepdims=True))
    z /= std[taking_part, None]
    labels = labels[taking_part]
    n = len(z)
    _, cluster_of = np.unique(labels, return_inverse=True)
    sizes = np.bincount(cluster_of)
    per_cluster = np.zeros((len(sizes), n_bins))
    np.add.at(per_cluster, cluster_of, z)

    def pair_sum(total):
        return (np.sum(total * total) - n * n_bins) / (2.0 * n_bins) if n else 0.0

    sum_all, pairs_all = pair_sum(z.sum(axis=0)), n * (n - 1) / 2
    sum_same, pairs_same = pair_sum(per_cluster), np.sum(sizes * (sizes - 1) / 2)

    def mean(total, pairs):
        return float(total / pairs) if pairs > 0 else float("nan")

    # Samples for the histograms: every same-cluster r (one small matrix per cluster), of which a
    # random subset is kept; pairs of different clusters drawn at random.
    rng = np.random.default_rng(seed)
    same = [np.zeros(0)]
    for members in (np.flatnonzero(cluster_of == c) for c in range(len(sizes))):
        same.append((z[members] @ z[members].T / n_bins)[np.triu_indices(len(members), 1)])
    same = np.concatenate(same)
    sample_same = rng.choice(same, size=min(n_sample, len(same)), replace=False)
    a, b = rng.integers(0, max(n, 1), size=(2, 4 * n_sample))
    other = np.flatnonzero(labels[a] != labels[b])[:n_sample] if n > 1 else np.zeros(0, int)
    sample_other = np.mean(z[a[other]] * z[b[other]], axis=1)
    return {
        "same_cluster": mean(sum_same, pairs_same),
        "other_cluster": mean(sum_all - sum_same, pairs_all - pairs_same),
        "all": mean(sum_all, pairs_all),
        "n_neurons": n,
        "sample_same_cluster": sample_same,
        "sample_other_cluster": sample_other,
    }


class CNCorrelationComputer(NetworkAnalyser):
    """Spike-count correlations of E neurons after the measurement run: weak on average, strong
    within a cluster when R_ee is large enough for clusters to switch together (the paper's Fig. 4).

    network_dict:
        Expects 'monitors' and 'measurement' from CNMonitorAnalysis (so it is listed after it).
    Results: statistics.correlations (Brian2Result: window, same_cluster, other_cluster, all,
    n_neurons, sample_same_cluster, sample_other_cluster; see count_correlations).
    """

    def add_parameters(self, traj):
        traj.f_add_parameter(
            Brian2Parameter, "analysis.correlation_window", 100 * ms,
            comment="Counting window of the spike-count correlations",
        )
        traj.f_add_parameter(
            "analysis.correlation_sample", 2000,
            comment="Pairs of each kind whose r is kept for the histograms",
        )

    def analyse(self, traj, network, current_subrun, subrun_list, network_dict):
        if not is_measurement(current_subrun):
            return
        spikes = network_dict["monitors"]["spikes_e"]
        n_e = traj.parameters.model.N_e
        window = traj.analysis.correlation_window
        result = count_correlations(
            spikes.t[:], spikes.i[:], cluster_labels(n_e, traj.parameters.connections.cluster_size),
            network_dict["measurement"]["t_start"], network.t, window,
            n_sample=traj.analysis.correlation_sample,
            seed=stream_seed(traj.simulation.seed, 4, traj.v_idx),
        )
        traj.f_add_result(
            Brian2Result, "statistics.correlations", window=window, **result,
            comment="Mean Pearson r of E spike counts over pairs: same cluster, other, all",
        )


class CNQuenchingAnalyser(CNFanoFactorComputer):
    """Fano factor and rate of E neurons before and during the stimulus (the paper's Fig. 6):
    the Fano factor computer's windows, applied to each recorded period.

    network_dict:
        Expects 'monitors' and 'periods' from CNMonitorAnalysis, 'stimulated_clusters' from
        CNStimulus.
    Results: statistics.quenching (Brian2Result: window; ff_spontaneous, ff_stimulus, FF over all
    E neurons per window; rate_spontaneous, rate_stimulus, mean E rate; clusters, the stimulated).
    """

    def analyse(self, traj, network, current_subrun, subrun_list, network_dict):
        if current_subrun.v_name != "stimulus":
            return
        spikes = network_dict["monitors"]["spikes_e"]
        t, i = spikes.t[:], spikes.i[:]
        n_e = traj.parameters.model.N_e
        windows = np.array(traj.analysis.fano_windows) * second
        stats = {}
        for period in ("spontaneous", "stimulus"):
            start, end = network_dict["periods"][period]
            stats[f"ff_{period}"] = fano_factor(t, i, n_e, start, end, windows)
            in_period = (t >= start) & (t < end)
            stats[f"rate_{period}"] = np.count_nonzero(in_period) / n_e / (end - start)
        traj.f_add_result(
            Brian2Result, "statistics.quenching", window=windows,
            clusters=np.asarray(network_dict["stimulated_clusters"]), **stats,
            comment="FF and mean rate of E neurons without and with the stimulus",
        )
        print_done(
            traj,
            f"FF {float(windows[-1] / ms):g}ms {stats['ff_spontaneous'][-1]:.2f} -> "
            f"{stats['ff_stimulus'][-1]:.2f}, E rate {float(stats['rate_spontaneous'] / Hz):.2f} "
            f"-> {float(stats['rate_stimulus'] / Hz):.2f} Hz",
        )


# ---------------------------------------------------------------------------------------------------
# The experiments: one main function each, following the spec's main script (7.3) step by step. Both
# store their trajectory in the same HDF5 file, through brian2pet's storage that a kill at any moment
# cannot ruin; with several cores each run is a forked worker (brian2pet.ForkingEnvironment).
# ---------------------------------------------------------------------------------------------------


run_started = {}  # run index: when this process started it (for the "done in" lines)


class RunsSaid:
    """For a brian2pet manager: each run says when it starts, and a failing run raises an error
    naming the run and its explored values."""

    def run_network(self, traj):
        run_started[traj.v_idx] = time.time()
        say(f"run {traj.v_idx + 1}/{len(traj)} started: {explored_text(traj)}")
        try:
            super().run_network(traj)
        except Exception as error:
            raise RunFailed(
                f"run {traj.v_idx} ({explored_text(traj)}) failed: "
                f"{type(error).__name__}: {error}"
            ) from error


class CNNetworkManager(RunsSaid, NetworkManager):
    """brian2pet's manager (--device runtime, the default)."""


class CNStandaloneNetworkManager(RunsSaid, StandaloneNetworkManager):
    """brian2pet's manager for a standalone device (--device cpp_standalone): pre_build or
    pre_run_network compile the experiment once, and each run executes that program."""

    def pre_build(self, traj):
        started = time.time()
        super().pre_build(traj)
        if not self._compiling_after_pre_run:  # else pre_run_network compiles, and says so
            say(f"compiled '{traj.v_name}' in {time.time() - started:.0f} s into {self.directory}")

    def pre_run_network(self, traj):
        started = time.time()
        super().pre_run_network(traj)
        say(f"compiled '{traj.v_name}' and analysed its pre-run in {time.time() - started:.0f} s "
            f"into {self.directory}")


def network_manager(args, name, **parts):
    """The experiment's manager for --device, given the runner, components and analysers."""
    if args.device == "runtime":
        return CNNetworkManager(**parts)
    return CNStandaloneNetworkManager(directory=program_folder(args.out, name), **parts)


def use_device(device):
    """Make Brian2 simulate on ``device`` from here on: 'runtime', or a standalone device, which
    builds a program of its own for every experiment (brian2pet section 8)."""
    if device == "runtime":
        return
    set_device(device, build_on_run=False)
    get_device().reinit()  # forget an earlier experiment's program
    get_device().activate(build_on_run=False)


def program_folder(out, name):
    return os.path.join(out, "standalone", name)


class RunFailed(RuntimeError):
    """One run of an experiment raised; the message names the run and its explored values."""


def add_simulation_parameters(traj, args):
    """The parameters every component reads: size, seed, code generation target, time step."""
    traj.f_add_parameter(
        "simulation.scale", args.scale,
        comment="Scales the numbers of neurons (and so K and the weights), not the cluster size",
    )
    traj.f_add_parameter("simulation.seed", args.seed, comment="Seed of every random stream")
    traj.f_add_parameter(
        "simulation.codegen_target", resolve_target(args.target),
        comment="Brian2 codegen target of the objects that run every time step",
    )
    traj.f_add_parameter(Brian2Parameter, "simulation.dt", 0.1 * ms, comment="Euler time step")


def resolve_target(target):
    """'auto' becomes cython if Brian2 can compile (a one-off test, cached), numpy otherwise."""
    if target != "auto":
        return target
    from brian2.codegen.runtime.cython_rt import CythonCodeObject

    if CythonCodeObject.is_available():
        return "cython"
    print("cython is not usable here (no C compiler?): simulating with numpy", flush=True)
    return "numpy"


def _have_dill():
    try:
        import dill  # noqa: F401
    except ImportError:
        return False
    return True


def environment_options(args, filename, resume_folder):
    """pypet's Environment settings that both experiments share (and a resumed one takes again)."""
    if args.scoop:
        # Workers on other hosts get the run function pickled; each sends its results back (LOCAL).
        processes = dict(multiproc=True, use_scoop=True, wrap_mode="LOCAL")
    elif args.ncores > 1:
        # Fork a worker per run (no pool), so the pre-built network needs no pickling. The workers
        # send their results to this process, the one writer of the file: LOCAL rather than QUEUE,
        # because pypet resumes only LOCK, NETLOCK and LOCAL explorations.
        processes = dict(multiproc=True, ncores=args.ncores, use_pool=False, wrap_mode="LOCAL")
    else:
        processes = {}
    return dict(
        filename=filename,
        storage_service=CheckpointedHDF5StorageService,  # a kill at any moment loses nothing
        dynamic_imports=[Brian2Parameter, Brian2Result, Brian2MonitorResult],
        log_config=None,
        complevel=1,  # pypet's default, zlib at level 9, costs a second per sweep for 2 % less file
        report_progress=False,
        resumable=_have_dill(),  # pypet writes its resume files with dill
        resume_folder=resume_folder,
        # pypet would delete its resume files before its final stores, so that a kill in those would
        # leave nothing to resume; experiment_done deletes them after the last store.
        delete_resume=False,
        **processes,
    )


def run_sweep(args, filename, resume_folder):
    """Experiment 1, the R_ee sweep. Each R_ee needs its own connections, so only the neurons are
    pre-built. Returns the trajectory once every run ended."""
    env = ForkingEnvironment(
        trajectory=TRAJECTORY_NAME,
        comment="Litwin-Kumar & Doiron (2012) clustered network explored over R_ee",
        **environment_options(args, filename, resume_folder),
    )
    traj = env.trajectory
    add_simulation_parameters(traj, args)

    # The runner, the components and the analysers, in build order, handed to the manager.
    use_device(args.device)
    manager = network_manager(
        args, TRAJECTORY_NAME,
        network_runner=CNNetworkRunner(args.initial * second, args.measure * second),
        component_list=[CNNeuronGroup(), CNConnections(fail_run=args.fail_run)],
        analyser_list=[
            CNActivityGuard(), CNMonitorAnalysis(), CNFanoFactorComputer(), CNCorrelationComputer(),
        ],
    )
    manager.add_parameters(traj)
    traj.f_get("analysis.max_rate_e").f_set(args.max_rate * Hz)
    traj.f_explore({"R_ee": [float(r) for r in args.r_ee]})

    brian2_seed(args.seed)
    np.random.seed(args.seed)
    if not args.scoop:
        # Under SCOOP the run function travels to other hosts, and pre-built objects cannot.
        manager.pre_build(traj)  # on a standalone device: and compile the experiment

    traj.f_store()
    env.run(manager.run_network)
    env.disable_logging()
    return traj


def run_stimulus_experiment(args, filename, resume_folder):
    """Experiment 2, stimulus-induced quenching of variability: ONE clustered network, built and
    pre-run once (spec 7.3, pre_run_network); every run starts from the state after that pre-run
    and explores the stimulus strength (0 is the control). Returns the trajectory."""
    env = ForkingEnvironment(
        trajectory=STIMULUS_TRAJECTORY_NAME,
        comment="Litwin-Kumar & Doiron (2012): a stimulus to a few clusters",
        **environment_options(args, filename, resume_folder),
    )
    traj = env.trajectory
    add_simulation_parameters(traj, args)

    use_device(args.device)
    manager = network_manager(
        args, STIMULUS_TRAJECTORY_NAME,
        network_runner=CNStimulusRunner(args.initial * second, args.period * second),
        component_list=[CNNeuronGroup(), CNConnections(), CNStimulus()],
        analyser_list=[
            CNActivityGuard(),
            CNMonitorAnalysis(measured=("spontaneous", "stimulus")),
            CNQuenchingAnalyser(),
        ],
    )
    manager.add_parameters(traj)
    traj.f_get("connections.R_ee").f_set(args.stimulus_r_ee)
    traj.f_get("stimulus.n_clusters").f_set(args.stimulus_clusters)
    traj.f_get("analysis.max_rate_e").f_set(args.max_rate * Hz)
    traj.f_explore({"strength": [float(s) for s in args.strengths]})

    # Neurons and connections are not explored, so they are pre-built; the pre-run lets them settle.
    # (Under SCOOP each worker's copy of the manager does this again, the same way: brian2pet.)
    brian2_seed(args.seed)
    np.random.seed(args.seed)
    manager.pre_run_network(traj)  # on a standalone device: and compile the experiment

    traj.f_store()
    env.run(manager.run_network)
    env.disable_logging()
    return traj


def resume_experiment(args, filename, resume_folder, name):
    """Continue the experiment ``name`` after a stop or a kill at any moment: brian2pet puts the
    file and pypet's resume files back in step, then pypet runs the runs left. Returns the
    trajectory, or None when there was nothing to resume (the caller starts the experiment afresh)."""
    runs_left = prepare_resume(filename, resume_folder, name)
    if runs_left is None:
        return None
    if runs_left == 0:
        # Stopped in the final stores. pypet's resume with several processes fails when no run
        # is left; in one process it just does the final stores.
        args = argparse.Namespace(**{**vars(args), "ncores": 1, "scoop": False})
    # pypet's resume reads the trajectory from its resume files (this script's own) and the file:
    # refuse a file with content that would run code.
    check_file(filename, name, ALL_NODES)
    use_device(args.device)  # the device it was started with (run_experiments): pypet's copy of the
    # manager builds its objects there (and on a standalone device compiles them again)
    env = ForkingEnvironment(trajectory=name, **environment_options(args, filename, resume_folder))
    env.resume(trajectory_name=name, resume_folder=resume_folder)
    env.disable_logging()
    return env.trajectory


EXPERIMENTS = {  # --experiment name: (trajectory name, main function, explored parameter)
    "sweep": (TRAJECTORY_NAME, run_sweep, "connections.R_ee"),
    "stimulus": (STIMULUS_TRAJECTORY_NAME, run_stimulus_experiment, "stimulus.strength"),
}


# ---------------------------------------------------------------------------------------------------
# Reading stored experiments back
#
# A results file may come from anyone, so it is read with brian2pet.load_nodes, which runs nothing
# from it: only the nodes the tables and figures need, with brian2pet's and pypet's containers of
# numbers and text; anything pickled is refused in one line naming the node.
# ---------------------------------------------------------------------------------------------------

EXPERIMENT_NAMES = (TRAJECTORY_NAME, STIMULUS_TRAJECTORY_NAME)
# What the tables and the figures read: every parameter, and the results of each run.
SWEEP_NODES = ("parameters", "results.runs")
# Every branch of a trajectory that holds containers; pypet's resume reads them all.
ALL_NODES = ("config", "parameters", "derived_parameters", "results")


def check_sweep_file(filename, nodes=SWEEP_NODES):
    """{experiment: the ``nodes`` it holds} for each of this script's experiments in ``filename``.
    Raises FileRefused (one line) for a file that holds none, or anything that could run code."""
    return check_file(filename, EXPERIMENT_NAMES, nodes)


def stored_experiments(filename):
    """The names of this script's experiments that ``filename`` holds (none for a foreign file)."""
    try:
        return list(check_sweep_file(filename))
    except FileRefused:
        return []


def load_sweep(filename, name=TRAJECTORY_NAME):
    """A stored experiment with its parameters and per-run results (SWEEP_NODES), loaded safely."""
    return load_nodes(filename, name, SWEEP_NODES)


def explored_values(traj, name):
    """The value of parameter ``name`` in every run (its range, or its one value)."""
    param = traj.f_get(name)
    values = param.f_get_range() if param.f_has_range() else [param.f_get()]
    return [values[idx] if len(values) > 1 else values[0] for idx in range(len(traj))]


def runs_with(traj, result_name):
    """(index, run group) of every run that stored ``result_name`` (e.g. 'statistics.quenching');
    a run that failed, was cancelled before it or never ran has none."""
    for idx, run_name in enumerate(traj.f_get_run_names()):
        path = f"results.runs.{run_name}"
        if traj.f_contains(f"{path}.{result_name}", shortcuts=False):
            yield idx, traj.f_get(path, shortcuts=False)


def pathological_runs(traj, explored_name):
    """(index, value of ``explored_name``, reason) of every run the activity guard flagged."""
    values = explored_values(traj, explored_name)
    return [(idx, float(values[idx]), run.f_get("statistics.pathological").reason)
            for idx, run in runs_with(traj, "statistics.pathological")]


def sweep_rows(traj):
    """One dict per finished run: index, R_ee, rates (Hz), windows (s), ff, mean_ff, the mean
    correlations (r_same, r_other, r_all) and the run group. Failed, cancelled and unfinished runs
    have no row (pathological_runs lists those the guard cancelled)."""
    values = explored_values(traj, "connections.R_ee")
    rows = []
    for idx, run in runs_with(traj, "statistics.fano_factor"):
        rates = run.f_get("statistics.rates")
        fano = run.f_get("statistics.fano_factor")
        correlations = run.f_get("statistics.correlations")
        rows.append({
            "idx": idx,
            "R_ee": float(values[idx]),
            "rate_e": float(rates.e / (1 / second)),
            "rate_i": float(rates.i / (1 / second)),
            "windows": np.asarray(fano.window / second),
            "ff": np.asarray(fano.ff, dtype=float),
            "mean_ff": float(run.f_get("statistics.mean_fano_factor").f_get()),
            "r_same": float(correlations.same_cluster),
            "r_other": float(correlations.other_cluster),
            "r_all": float(correlations.all),
            "run": run,
        })
    return rows


def format_table(rows, pathological=()):
    """The sweep's table: R_ee, rates, FF per window and mean correlations, one line per run."""
    lines = []
    if rows:
        windows = rows[0]["windows"]
        head = f"{'run':>4} {'R_ee':>5} {'rate E':>7} {'rate I':>7} " + " ".join(
            f"{'FF ' + format(w * 1000, 'g') + 'ms':>10}" for w in windows
        ) + f" {'r same':>7} {'r other':>7} {'r all':>7}"
        lines += [head, "-" * len(head)]
        for row in rows:
            lines.append(
                f"{row['idx']:>4} {row['R_ee']:>5.2f} {row['rate_e']:>5.2f}Hz {row['rate_i']:>5.2f}Hz "
                + " ".join(f"{f:>10.2f}" for f in row["ff"])
                + f" {row['r_same']:>7.3f} {row['r_other']:>7.3f} {row['r_all']:>7.3f}"
            )
    else:
        lines.append("no finished runs")
    lines += [f"{idx:>4} {r_ee:>5.2f} pathological: {reason}" for idx, r_ee, reason in pathological]
    return "\n".join(lines)


def stimulus_rows(traj):
    """One dict per finished run of the stimulus experiment: index, strength, windows (s),
    ff_spontaneous, ff_stimulus, rate_spontaneous, rate_stimulus (Hz), clusters, run group."""
    values = explored_values(traj, "stimulus.strength")
    rows = []
    for idx, run in runs_with(traj, "statistics.quenching"):
        quenching = run.f_get("statistics.quenching")
        rows.append({
            "idx": idx,
            "strength": float(values[idx]),
            "windows": np.asarray(quenching.window / second),
            "ff_spontaneous": np.asarray(quenching.ff_spontaneous, dtype=float),
            "ff_stimulus": np.asarray(quenching.ff_stimulus, dtype=float),
            "rate_spontaneous": float(quenching.rate_spontaneous / (1 / second)),
            "rate_stimulus": float(quenching.rate_stimulus / (1 / second)),
            "clusters": np.asarray(quenching.clusters),
            "run": run,
        })
    return rows


def format_stimulus_table(rows, pathological=()):
    """The stimulus experiment's table: FF and E rate without -> with the stimulus, per strength."""
    lines = []
    if rows:
        windows = rows[0]["windows"]
        head = f"{'run':>4} {'strength':>8} {'E rate (Hz)':>13} " + " ".join(
            f"{'FF ' + format(w * 1000, 'g') + 'ms':>13}" for w in windows
        )
        lines += [head, "-" * len(head)]
        for row in rows:
            pairs = zip(row["ff_spontaneous"], row["ff_stimulus"])
            lines.append(
                f"{row['idx']:>4} {row['strength']:>8.3f} "
                f"{row['rate_spontaneous']:>5.2f} -> {row['rate_stimulus']:>4.2f} "
                + " ".join(f"{a:>5.2f} -> {b:>4.2f}" for a, b in pairs)
            )
        lines.append(f"(spontaneous -> stimulus; stimulated clusters {list(rows[0]['clusters'])})")
    else:
        lines.append("no finished runs")
    lines += [f"{idx:>4} {s:>8.3f} pathological: {reason}" for idx, s, reason in pathological]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Figures (matplotlib only here, imported when a figure is drawn; Agg needs no display)
# ---------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _shown_rows(rows):
    """The runs to show rasters and traces for: R_ee = 1.0 and 2.5, else the first and last run."""
    picked = [row for row in rows if any(np.isclose(row["R_ee"], r) for r in (1.0, 2.5))]
    if not picked:
        picked = [rows[0], rows[-1]] if len(rows) > 1 else rows[:1]
    return picked


def plot_raster(row, t_start, cluster_size, filename, seconds=3.0):
    """Spikes of all E neurons for a few seconds of the measurement; neuron index follows cluster."""
    plt = _pyplot()
    spikes = row["run"].f_get("monitors.spikes_e")
    t = np.asarray(spikes.t / second) - t_start
    shown = t < seconds
    fig, ax = plt.subplots(figsize=(10, 6))
    ax.plot(t[shown], np.asarray(spikes.i)[shown], ",k", rasterized=True)
    ax.set_xlabel("time in measurement (s)")
    ax.set_ylabel(f"E neuron (clusters of {cluster_size} in order)")
    ax.set_title(f"E spikes, R_ee = {row['R_ee']:g}")
    ax.set_xlim(0, seconds)
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


def plot_traces(row, t_start, cluster_size, filename, seconds=1.0):
    """V, I_syn_e and I_syn_i of the recorded neurons; colour tells the cluster."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True)
    labels = {"V": "V", "I_syn_e": "I_syn_e (1/s)", "I_syn_i": "I_syn_i (1/s)"}
    for ax, variable in zip(axes, ("V", "I_syn_e", "I_syn_i")):
        monitor = row["run"].f_get(f"monitors.{variable}")
        t = np.asarray(monitor.t / second) - t_start
        shown = t < seconds
        values = np.asarray(getattr(monitor, variable))
        for k, neuron in enumerate(np.asarray(monitor.record)):
            cluster = int(neuron) // cluster_size
            ax.plot(t[shown], values[k, shown], lw=0.7, color=f"C{cluster % 10}",
                    ls=("-", "--", ":", "-.")[k % 4], label=f"neuron {neuron} (cluster {cluster})")
        ax.set_ylabel(labels[variable])
    axes[0].legend(loc="upper right", fontsize=7, ncol=2)
    axes[0].set_title(f"Recorded E neurons, R_ee = {row['R_ee']:g}")
    axes[-1].set_xlabel("time in measurement (s)")
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


def plot_fano_vs_window(rows, filename):
    """FF against counting window, one line per R_ee (the paper's signature of slow dynamics)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        ax.plot(row["windows"] * 1000, row["ff"], "o-", label=f"R_ee = {row['R_ee']:.2f}")
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_yscale("log")  # keeps the sub-Poisson lines apart from each other
    from matplotlib.ticker import FormatStrFormatter

    for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_format(FormatStrFormatter("%g"))
    ax.set_xlabel("counting window (ms)")
    ax.set_ylabel("Fano factor (mean over E neurons)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


def plot_fano_and_rates_vs_r_ee(rows, filename):
    """FF per window and the mean rates of E and I against R_ee."""
    plt = _pyplot()
    r_ee = [row["R_ee"] for row in rows]
    fig, (ax_ff, ax_rate) = plt.subplots(1, 2, figsize=(10, 4))
    for k, window in enumerate(rows[0]["windows"]):
        ax_ff.plot(r_ee, [row["ff"][k] for row in rows], "o-", label=f"{window * 1000:g} ms")
    ax_ff.axhline(1.0, color="grey", ls=":", lw=1)
    ax_ff.set_xlabel("R_ee")
    ax_ff.set_ylabel("Fano factor")
    ax_ff.legend(title="window", fontsize=8)
    ax_rate.plot(r_ee, [row["rate_e"] for row in rows], "o-", label="E")
    ax_rate.plot(r_ee, [row["rate_i"] for row in rows], "s-", label="I")
    ax_rate.set_xlabel("R_ee")
    ax_rate.set_ylabel("mean rate (Hz)")
    ax_rate.legend()
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


def plot_correlations(rows, filename):
    """Histograms of the spike-count correlation r of same-cluster and other pairs of E neurons,
    one panel per shown R_ee (a sample of pairs; the legend gives the means over all pairs)."""
    plt = _pyplot()
    shown = _shown_rows(rows)
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4), squeeze=False)
    for ax, row in zip(axes[0], shown):
        correlations = row["run"].f_get("statistics.correlations")
        bins = np.linspace(-0.3, 1.0, 53)
        for kind, mean, colour in (("other_cluster", row["r_other"], "grey"),
                                   ("same_cluster", row["r_same"], "C3")):
            sample = np.clip(np.asarray(getattr(correlations, f"sample_{kind}")), -0.3, 1.0)
            ax.hist(sample, bins=bins, density=True, histtype="stepfilled", alpha=0.5,
                    color=colour, label=f"{kind.replace('_', ' ')} pairs: mean r = {mean:.3f}")
        ax.set_title(f"R_ee = {row['R_ee']:g}")
        ax.set_xlabel(f"r of spike counts in {float(correlations.window / ms):g} ms windows")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("density")
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


def plot_quenching(rows, filename):
    """FF (longest and shortest window) and the mean E rate, spontaneous vs stimulus, against the
    stimulus strength."""
    plt = _pyplot()
    strength = [row["strength"] for row in rows]
    windows = rows[0]["windows"]
    fig, (ax_ff, ax_rate) = plt.subplots(1, 2, figsize=(10, 4))
    for k, style in ((len(windows) - 1, "-"), (0, ":")):
        label = f"{windows[k] * 1000:g} ms"
        ax_ff.plot(strength, [row["ff_spontaneous"][k] for row in rows], "o" + style, color="C0",
                   label=f"spontaneous, {label}")
        ax_ff.plot(strength, [row["ff_stimulus"][k] for row in rows], "s" + style, color="C3",
                   label=f"stimulus, {label}")
    ax_ff.axhline(1.0, color="grey", ls=":", lw=1)
    ax_ff.set_xlabel("stimulus strength (rise of mu)")
    ax_ff.set_ylabel("Fano factor (mean over E neurons)")
    ax_ff.legend(fontsize=8)
    ax_rate.plot(strength, [row["rate_spontaneous"] for row in rows], "o-", color="C0",
                 label="spontaneous")
    ax_rate.plot(strength, [row["rate_stimulus"] for row in rows], "s-", color="C3",
                 label="stimulus")
    ax_rate.set_xlabel("stimulus strength (rise of mu)")
    ax_rate.set_ylabel("mean E rate (Hz)")
    ax_rate.set_ylim(bottom=0)
    ax_rate.legend()
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


def plot_stimulus_raster(row, t_onset, cluster_size, filename, seconds=2.0):
    """E spikes from ``seconds`` before to ``seconds`` after the stimulus onset, neurons in cluster
    order, the stimulated clusters shaded."""
    plt = _pyplot()
    spikes = row["run"].f_get("monitors.spikes_e")
    t = np.asarray(spikes.t / second) - t_onset
    shown = np.abs(t) < seconds
    fig, ax = plt.subplots(figsize=(10, 6))
    for cluster in row["clusters"]:
        ax.axhspan(cluster * cluster_size, (cluster + 1) * cluster_size, color="C3", alpha=0.25,
                   lw=0)
    ax.plot(t[shown], np.asarray(spikes.i)[shown], ",k", rasterized=True)
    ax.axvline(0.0, color="C3", lw=0.8)
    ax.set_xlim(-seconds, seconds)
    ax.set_xlabel("time from stimulus onset (s)")
    ax.set_ylabel(f"E neuron (clusters of {cluster_size} in order; stimulated shaded)")
    ax.set_title(f"E spikes, stimulus strength {row['strength']:g}")
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)


def plot_all(traj, rows, folder):
    """Every figure of the sweep, as PNG in ``folder``; returns their paths."""
    if not rows:
        return []
    t_start = float(traj.f_get("simulation.durations.initial_run").f_get() / second)
    cluster_size = traj.f_get("connections.cluster_size").f_get()
    paths = []
    for row in _shown_rows(rows):
        for kind, plot in (("raster", plot_raster), ("traces", plot_traces)):
            path = os.path.join(folder, f"{kind}_R_ee_{row['R_ee']:.2f}.png")
            plot(row, t_start, cluster_size, path)
            paths.append(path)
    for name, plot in (("fano_vs_window.png", plot_fano_vs_window),
                       ("fano_and_rates_vs_R_ee.png", plot_fano_and_rates_vs_r_ee),
                       ("correlations.png", plot_correlations)):
        paths.append(os.path.join(folder, name))
        plot(rows, paths[-1])
    return paths


def plot_all_stimulus(traj, rows, folder):
    """Every figure of the stimulus experiment, as PNG in ``folder``; returns their paths."""
    if not rows:
        return []
    durations = ("simulation.pre_durations.settling_run", "simulation.durations.spontaneous")
    t_onset = sum(float(traj.f_get(name).f_get() / second) for name in durations)
    cluster_size = traj.f_get("connections.cluster_size").f_get()
    paths = [os.path.join(folder, "quenching_vs_strength.png")]
    plot_quenching(rows, paths[0])
    for row in rows:
        if row["strength"] > 0:
            paths.append(os.path.join(folder, f"stimulus_raster_{row['strength']:g}.png"))
            plot_stimulus_raster(row, t_onset, cluster_size, paths[-1])
    return paths



# ---------------------------------------------------------------------------------------------------
# Command line, output folder, lock, resume and main()
#
# Stopping and resuming: Ctrl-C or SIGTERM ends the experiments with exit status 130 / 143 and says
# which runs finished and how to continue; a run they interrupt is never stored as finished, nor is a
# write cut short (brian2pet 7.1). SIGKILL may come anywhere, also inside a write: --resume puts the
# file and pypet's resume files back in step and runs what is left (brian2pet.prepare_resume). Each
# experiment saves its settings at its start and removes them at its end, so --resume also finishes
# an experiment that was killed before its first run finished, or never started, with the settings
# of the original command.
# ---------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, so that a mistyped option is easy to spot in a batch log.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(kind):
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return convert


def parse_args(argv=None):
    parser = _Parser(
        prog="clustered_network.py",
        description="Clustered E/I network (Litwin-Kumar & Doiron 2012): a sweep over R_ee and a "
                    "stimulus experiment on one pre-run network.",
    )
    parser.add_argument("--experiment", choices=("sweep", "stimulus", "both"), default="both",
                        help="which experiment to run (default both)")
    parser.add_argument("--scale", type=_positive(float), default=1.0,
                        help="network size factor: N_e = 4000*scale, N_i = 1000*scale (default 1)")
    parser.add_argument("--r-ee", type=_positive(float), nargs="*", default=list(DEFAULT_R_EE),
                        metavar="R", help="clustering ratios to explore (default 1.0 ... 3.5)")
    parser.add_argument("--measure", type=_positive(float), default=10.0,
                        help="seconds of the measured run (default 10)")
    parser.add_argument("--initial", type=_positive(float), default=0.5,
                        help="seconds of the initial, unmeasured run; in the stimulus experiment the "
                             "pre-run (default 0.5)")
    parser.add_argument("--stimulus-r-ee", type=_positive(float), default=2.5, metavar="R",
                        help="R_ee of the stimulus experiment's network (default 2.5)")
    parser.add_argument("--strengths", type=float, nargs="*", default=list(DEFAULT_STRENGTHS),
                        metavar="S", help="stimulus strengths to explore, the rise of mu of the "
                                          "stimulated E neurons (default 0 0.07 0.15; 0 is the control)")
    parser.add_argument("--stimulus-clusters", type=_positive(int), default=5, metavar="N",
                        help="number of stimulated clusters, drawn at random by --seed (default 5)")
    parser.add_argument("--period", type=_positive(float), default=5.0,
                        help="seconds of the spontaneous and of the stimulus period (default 5)")
    parser.add_argument("--max-rate", type=_positive(float), default=100.0, metavar="HZ",
                        help="mean E rate (Hz) above which a run is pathological: the activity "
                             "guard cancels its remaining subruns (default 100)")
    parser.add_argument("--ncores", type=_positive(int), default=None,
                        help=f"processes for the runs (default: every core, here {os.cpu_count()})")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--target", choices=("auto", "cython", "numpy"), default="auto",
                        help="Brian2 code generation target; auto (default) takes cython when a "
                             "C compiler works, else numpy (about 3 times slower per run)")
    parser.add_argument("--device", choices=("runtime", "cpp_standalone"), default="runtime",
                        help="runtime (default): Python steps the network (--target); "
                             "cpp_standalone: each experiment is compiled once with g++ into one "
                             "program, which every run executes with its own values")
    parser.add_argument("--out", default="results",
                        help="folder for the HDF5 file and figures (default results/)")
    parser.add_argument("--no-plots", action="store_true", help="draw no figures")
    parser.add_argument("--replot", metavar="FILE",
                        help="redraw the figures and tables from a stored HDF5 file, no simulation")
    parser.add_argument("--scoop", action="store_true",
                        help="run under SCOOP: python -m scoop -n N clustered_network.py --scoop")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted experiments stored in --out")
    parser.add_argument("--fail-run", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if not args.r_ee:
        parser.error("--r-ee needs at least one value")
    if args.seed < 0:
        parser.error(f"--seed must be 0 or more, got {args.seed}")
    n_e = int(4000 * args.scale)
    if n_e < 2 * CLUSTER_SIZE or int(1000 * args.scale) < 2:
        parser.error(
            f"--scale {args.scale} is too small: need two clusters of {CLUSTER_SIZE} E neurons"
        )
    for flag, values in (("--r-ee", args.r_ee), ("--stimulus-r-ee", [args.stimulus_r_ee])):
        for r in values:
            if cluster_probabilities(r, n_e, CLUSTER_SIZE, P_EE)[0] > 1:
                parser.error(f"{flag} {r} gives a within-cluster probability above 1 at this scale")
    if not args.strengths:
        parser.error("--strengths needs at least one value")
    if args.stimulus_clusters > n_e // CLUSTER_SIZE:
        parser.error(f"--stimulus-clusters {args.stimulus_clusters} is more than the "
                     f"{n_e // CLUSTER_SIZE} clusters at this scale")
    if args.replot:
        try:
            check_sweep_file(args.replot)
        except ValueError as error:
            parser.error(f"--replot: {error}")
    if args.scoop and args.device != "runtime":
        parser.error("--device cpp_standalone runs one compiled program on this host's cores: use "
                     "--ncores, not --scoop")
    if args.scoop and args.ncores is not None:
        parser.error("--ncores does not apply with --scoop; SCOOP's -n sets the workers")
    if args.ncores is None:
        args.ncores = 1 if args.scoop else os.cpu_count() or 1
    return args


def hold_sweep_lock(folder):
    """Take the folder's lock or exit, so that no two processes write one folder's experiments.

    An flock on a file that forked workers inherit: held while ANY process of the experiments lives
    (brian2pet's workers die with the main process, so it goes with it). Where there are no file
    locks (fcntl is POSIX), the experiments run without one and say so.
    """
    try:
        import fcntl
    except ImportError:
        print(f"clustered_network.py: no file locks here (fcntl): run one command at a time in "
              f"{folder}", flush=True)
        return None
    path = os.path.join(folder, "sweep.lock")
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        sys.exit(
            f"clustered_network.py: error: a sweep in {folder} is still running ({owner}); wait "
            f"for it, or stop it (kill PID; its workers stop with it) and then --resume"
        )
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, process group {os.getpgrp()}\n")
    handle.flush()
    return handle  # the lock lives as long as this handle stays open


def settings_file(resume_folder, trajectory_name):
    return os.path.join(resume_folder, f"{trajectory_name}.settings.json")


# What defines an experiment's runs; --ncores and --out may differ when it is resumed.
EXPERIMENT_SETTINGS = (
    "scale", "r_ee", "measure", "initial", "seed", "target", "device",
    "stimulus_r_ee", "strengths", "stimulus_clusters", "period", "max_rate",
)


def save_settings(args, resume_folder, trajectory_name):
    """Keep an experiment's settings (plain JSON) until it finishes, to start afresh if need be."""
    os.makedirs(resume_folder, exist_ok=True)
    path = settings_file(resume_folder, trajectory_name)
    with open(path + ".partial", "w") as handle:
        json.dump({key: getattr(args, key) for key in EXPERIMENT_SETTINGS}, handle)
    os.replace(path + ".partial", path)


def saved_settings(resume_folder, trajectory_name):
    """The saved settings as a dict, or None if there are none (or they cannot be read)."""
    try:
        with open(settings_file(resume_folder, trajectory_name)) as handle:
            settings = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(settings, dict) or set(settings) != set(EXPERIMENT_SETTINGS):
        return None
    return settings


def unfinished(resume_folder, name):
    """True from the start of the experiment ``name`` until experiment_done: its saved settings or
    pypet's resume folder are there."""
    return (os.path.isfile(settings_file(resume_folder, name))
            or os.path.isdir(os.path.join(resume_folder, name)))


def start_afresh(filename, resume_folder, name, resuming=False):
    """Remove what an earlier attempt of the experiment ``name`` left: its trajectory in the file
    (the other experiment's stays) and pypet's resume files; ``resuming``: what it stored before it
    was stopped, ahead of a run that finished."""
    shutil.rmtree(os.path.join(resume_folder, name), ignore_errors=True)
    restore_checkpoint(filename)  # a write was cut short: the checkpoint is the good file
    if remove_from_file(filename, [f"/{name}"]):
        print(f"removed what '{name}' stored in {filename} before it was stopped" if resuming
              else f"replaced the earlier '{name}' in {filename} (continue one with --resume)",
              flush=True)


def experiment_done(traj, resume_folder, name):
    """End the experiment ``name`` after pypet's last store: a run that did not complete fails it
    (and stays to --resume); otherwise nothing is left to resume. The settings go first: without
    them, pypet's resume files alone still resume."""
    raise_for_incomplete_runs(traj)
    with contextlib.suppress(FileNotFoundError):
        os.remove(settings_file(resume_folder, name))
    remove_resume_files(resume_folder, name)


def raise_for_incomplete_runs(traj):
    """With several processes pypet logs a failed run and goes on; end the sweep with an error."""
    failed = []
    for idx, name in enumerate(traj.f_get_run_names()):
        if not traj.f_get_run_information(name)["completed"]:
            traj.v_idx = idx
            failed.append(f"run {idx} ({explored_text(traj)})")
    traj.f_restore_default()
    if failed:
        raise RunFailed(
            f"{', '.join(failed)} did not complete (its error is printed above, unless its "
            f"process was killed)"
        )


def run_experiments(args, filename, resume_folder):
    """Run the chosen experiments in turn. With --resume: continue those that were stopped (or
    never got to start) with the settings they were started with, keep those that finished."""
    chosen = ["sweep", "stimulus"] if args.experiment == "both" else [args.experiment]
    if args.resume:
        if not _have_dill():
            sys.exit("clustered_network.py: error: --resume needs the package dill (pip install dill)")
        if not any(unfinished(resume_folder, EXPERIMENTS[e][0]) for e in chosen):
            sys.exit(
                f"clustered_network.py: error: nothing to resume in {resume_folder} (the "
                f"experiments finished, or never started with this --out)"
            )
    else:
        if args.experiment == "both" and os.path.exists(filename):
            # Both start afresh: a new file, rather than the old one with their space freed inside.
            print(f"replacing the earlier experiments in {filename} (continue them with --resume)")
            for leftover in (filename, filename + ".checkpoint", filename + ".writing"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(leftover)
        # Saved before anything runs, so that --resume after a stop at any moment finishes every
        # chosen experiment with these settings, also one that never got to start.
        for experiment in chosen:
            save_settings(args, resume_folder, EXPERIMENTS[experiment][0])
    for experiment in chosen:
        name, run, _ = EXPERIMENTS[experiment]
        release_freed_memory()  # the previous experiment's network, before this one builds its own
        traj = None
        if args.resume and unfinished(resume_folder, name):
            print(f"resuming '{name}'", flush=True)
            settings = saved_settings(resume_folder, name)
            # On the device it was started on (without saved settings only its final stores are
            # left, which simulate nothing).
            device = (settings or vars(args))["device"]
            traj = resume_experiment(argparse.Namespace(**{**vars(args), "device": device}),
                                     filename, resume_folder, name)
            if traj is None:
                if settings is None:
                    sys.exit(f"clustered_network.py: error: nothing to resume in {resume_folder} "
                             f"for '{name}' (it finished, or never started with this --out)")
                print(f"'{name}' stopped before its first run was stored: starting it afresh",
                      flush=True)
                args_then = argparse.Namespace(**{**vars(args), **settings})
        elif args.resume and name in stored_experiments(filename):
            print(f"'{name}' finished before; kept as it is", flush=True)
            continue
        else:
            if args.resume:  # chosen now, never started before: with the flags given now
                save_settings(args, resume_folder, name)
            print(f"experiment '{name}'", flush=True)
            args_then = args
        if traj is None:
            start_afresh(filename, resume_folder, name, resuming=args.resume)
            traj = run(args_then, filename, resume_folder)
        experiment_done(traj, resume_folder, name)


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def report(filename, plots, require_runs=False):
    """Print each stored experiment's table, and draw and list the figures. ``require_runs``: a
    file in which no experiment has a run (finished or flagged) is an error."""
    folder = os.path.dirname(os.path.abspath(filename))
    held = check_sweep_file(filename)
    reports = []
    for name, rows_of, format_rows, plot in (
        (TRAJECTORY_NAME, sweep_rows, format_table, plot_all),
        (STIMULUS_TRAJECTORY_NAME, stimulus_rows, format_stimulus_table, plot_all_stimulus),
    ):
        if name not in held:
            continue
        traj = load_sweep(filename, name)
        explored = {trajectory: parameter for trajectory, _, parameter in EXPERIMENTS.values()}
        try:
            rows = rows_of(traj)
            pathological = pathological_runs(traj, explored[name])
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as error:
            # HDF5 has no checksums here: a damaged file can load with items missing or garbled.
            raise FileRefused(
                f"{filename}: damaged, its '{name}' results are not what this script stores: "
                f"{_first_line(error)}"
            ) from error
        reports.append((name, traj, rows, format_rows(rows, pathological), plot))
        held[name] = bool(rows or pathological)
    if require_runs and not any(held.values()):
        raise FileRefused(f"{filename}: holds no run of either experiment ({', '.join(held)} "
                          f"without results)")
    for name, traj, rows, table, plot in reports:
        paths = plot(traj, rows, folder) if plots else []
        print(f"\n{name}:")
        print(table)
        for path in paths:
            print(f"figure: {os.path.abspath(path)}")
    print(f"HDF5 file: {os.path.abspath(filename)}")


def finished_text(args, resume_folder):
    """'0 (R_ee = 1.0), 2 (R_ee = 3.0)': the runs of the unfinished experiments that pypet counts as
    finished (those a resume keeps), or 'none'."""
    done = []
    for experiment, key in (("sweep", "r_ee"), ("stimulus", "strengths")):
        name, _, parameter = EXPERIMENTS[experiment]
        values = (saved_settings(resume_folder, name) or vars(args))[key]  # as it was started
        for idx in finished_runs(resume_folder, name):
            done.append(f"{idx} ({parameter.split('.')[-1]} = {values[idx]})")
    return ", ".join(done) or "none"


def resume_command(args):
    command = ["python", sys.argv[0], "--resume", "--out", args.out]
    if args.experiment != "both":
        command += ["--experiment", args.experiment]
    if args.ncores > 1:
        command += ["--ncores", str(args.ncores)]
    if args.no_plots:
        command.append("--no-plots")
    return shlex.join(command)


EXIT_STATUS = {KeyboardInterrupt: ("SIGINT", 130), Terminated: ("SIGTERM", 143)}  # 128 + signal


def main(argv=None):
    args = parse_args(argv)
    # With several processes the parent's pre-built neurons are never simulated (forked workers
    # simulate their copies), which Brian2 would warn about at exit.
    BrianLogger.suppress_name("unused_brian_object")
    if args.replot:
        try:
            report(args.replot, plots=True, require_runs=True)
        except FileRefused as error:  # passed the first check, but is no readable experiment
            print(f"clustered_network.py: error: --replot: {error}", file=sys.stderr)
            return 1
        return 0

    os.makedirs(args.out, exist_ok=True)
    filename = os.path.join(args.out, HDF5_NAME)
    resume_folder = os.path.join(args.out, "resume")
    lock = hold_sweep_lock(args.out) if not args.scoop else None
    started = time.time()
    try:
        with stop_cleanly_on_signals():
            run_experiments(args, filename, resume_folder)
    except RunFailed as error:
        print(f"clustered_network.py: error: {error}", file=sys.stderr)
        print(f"finished runs are kept in {os.path.abspath(filename)}; to run the others again: "
              f"{resume_command(args)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as stop:
        signal_name, status = EXIT_STATUS[type(stop)]
        print(f"clustered_network.py: stopped by {signal_name}; runs finished and kept in "
              f"{os.path.abspath(filename)}: {finished_text(args, resume_folder)}", file=sys.stderr)
        print(f"continue with: {resume_command(args)}", file=sys.stderr)
        return status
    except (FileDamaged, FileRefused) as error:
        print(f"clustered_network.py: error: {error}", file=sys.stderr)
        return 1
    print(f"finished in {time.time() - started:.0f} s", flush=True)
    report(filename, plots=not args.no_plots)
    if lock is not None:
        lock.close()
    return 0


if __name__ == "__main__":
    run_command(main)  # sys.exit(main()), also under SCOOP (which drops the status otherwise)
