"""The clustered balanced network of Litwin-Kumar and Doiron (2012), explored with brian2pet.

    A. Litwin-Kumar and B. Doiron, "Slow dynamics and high variability in balanced cortical
    networks with clustered connections", Nature Neuroscience 15, 1498-1505 (2012),
    doi:10.1038/nn.3220

N_E = 4000 excitatory (E) and N_I = 1000 inhibitory (I) leaky integrate-and-fire neurons, connected
at random with strong weights that excitation and inhibition balance. The E neurons form 50 clusters
of 80: two E neurons of one cluster connect R_EE times more often than two of different clusters
(and more strongly), while every E neuron keeps the same mean number of E inputs. The script
reproduces three findings of the paper:

  1. Clusters make spike counts slow and variable. In the uniform network (R_EE = 1) a neuron's
     spike count varies less than a Poisson process's: its Fano factor (FF, variance / mean of the
     count) stays below 1 and falls with the counting window. With clusters (R_EE about 2.5)
     clusters switch slowly between high and low activity, and the FF rises above 1 and grows with
     the window. Above R_EE of about 3 a few clusters lock into high activity and it falls again.
  2. Spike counts are strongly correlated within a cluster, but hardly at all on average.
  3. A stimulus quenches the variability: driving a few clusters makes the FF drop at stimulus
     onset, while the mean rate rises only modestly, as Churchland et al. found across cortex:

         M. M. Churchland et al., "Stimulus onset quenches neural variability: a widespread
         cortical phenomenon", Nature Neuroscience 13, 369-378 (2010), doi:10.1038/nn.2501

     Measured two ways: in one run, the FF across the counting windows of its spontaneous period
     and of its stimulus period; and as Churchland et al. did, the FF of each neuron's count across
     trials, in a window sliding over the stimulus onset.

Experiment 1 (trajectory ``clustered_network``, findings 1 and 2) explores R_EE: every run builds
its own connections, settles for 0.5 s, then is measured for 10 s. Experiment 2
(``stimulus_response``, finding 3) builds ONE network at R_EE = 2.5 and pre-runs it once (spec
7.3); every run starts from the pre-run's state, rests for a spontaneous period, then the input of
the E neurons of 5 clusters rises by the explored strength (0 is the control) for a stimulus period
as long. Its runs explore strength x trial; the trials of one strength differ only in their seed,
which jitters every neuron's V a little at the run's start: the network itself has no noise, and
its chaotic dynamics make trials that start a hair apart diverge.

``python clustered_network.py`` runs both at full scale on every core, writes
``results/clustered_network.hdf5`` with PNG figures beside it, and prints a table per experiment;
``--help`` lists the options (fewer neurons, other values, several hosts with SCOOP, Brian2's C++
standalone device, resuming, redrawing the figures of a stored file).

The file reads top to bottom as the brian2pet documentation's main script does (spec 7.3): the
paper's parameters and equations; pure functions of the model and of the analysis; components,
runners, analysers; one main function per experiment; tables and figures. Last, and not about this
network, the operations that any long exploration run from a command line needs: progress lines,
the command line, the output folder and its lock, resuming. What makes the explorations safe to run
for hours (storage that a kill cannot ruin, clean stops, forked workers, safe loading, runs read as
one table) is brian2pet's section 7; compiling once on a standalone device, its section 8.
"""

import argparse
import contextlib
import ctypes
import gc
import importlib.util
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
from pypet import cartesian_product

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
    runs_table,
    stop_cleanly_on_signals,
)

# --------------------------------------------------------------------------------------------------
# The paper's network (its Methods)
# --------------------------------------------------------------------------------------------------

# Its parameters at full scale, by the paper's names, which the components give them in the
# trajectory too. Synapses are named target first, as in the paper: p_IE and J_IE are E to I.
PAPER = dict(
    N_E=4000, N_I=1000,  # excitatory and inhibitory neurons (times simulation.scale)
    cluster_size=80,  # E neurons per cluster: 50 clusters (not scaled)
    p_EE=0.2, p_IE=0.5, p_EI=0.5, p_II=0.5,  # connection probabilities (p_EE: mean over E pairs)
    J_EE_in_factor=1.9,  # weight of E to E synapses within a cluster over between (if R_EE > 1)
    tau_E=15 * ms, tau_I=10 * ms,  # membrane time constants
    mu_E_min=1.1, mu_E_max=1.2, mu_I_min=1.0, mu_I_max=1.05,  # each neuron's bias mu: uniform
    V_th=1.0, V_reset=0.0, tau_ref=5 * ms,  # threshold, reset, absolute refractory period
    tau_1=1 * ms, tau_2_E=3 * ms, tau_2_I=2 * ms,  # synaptic rise; decay of E and of I synapses
)

# Weights scale as 1/sqrt(K), K = p_EE * N_E the mean number of E inputs of an E neuron, as in a
# balanced network, and with the target's membrane time constant: J = j / (tau_target[ms] sqrt(K)).
# At full scale (K = 800) the numbers j below give the paper's J values, to its two digits:
WEIGHT_NUMERATORS = {
    "J_EE": 10.0,  # / (15 sqrt(800)) = 0.0236, the paper's J_EE = 0.024 (E to E)
    "J_IE": 4.0,  # / (10 sqrt(800)) = 0.0141, the paper's J_IE = 0.014 (E to I)
    "J_EI": 16.0 * 1.2,  # / (15 sqrt(800)) = 0.0453, the paper's J_EI = 0.045 (I to E)
    "J_II": 16.0,  # / (10 sqrt(800)) = 0.0566, the paper's J_II = 0.057 (I to I)
}

# Dimensionless membrane potential V (threshold 1, reset 0). Each source type drives a difference of
# two exponentials (rise tau_1, decay tau_2_E or tau_2_I) whose integral equals the weight, so a
# weight is the total jump it gives to V; inhibitory weights enter with a minus sign (on_pre below).
# mu_stim is the rise of the bias that a stimulus gives (CNStimulus), 0 without one. Constants are
# names filled from namespace=, so that one code object serves every value. What follows from the
# explored R_EE (the E to E probabilities p_in, p_out and the weight J_in) is a variable of the
# group instead, set in build(): a compiled program (--device cpp_standalone) takes a run's values
# for variables, not for names compiled into it (brian2pet section 8).
NEURON_EQUATIONS = """
dV/dt = (mu + mu_stim - V)/tau + I_syn_e + I_syn_i : 1 (unless refractory)
I_syn_e = (x_e_decay - x_e_rise)/(tau_2_E - tau_1) : Hz
I_syn_i = (x_i_decay - x_i_rise)/(tau_2_I - tau_1) : Hz
dx_e_rise/dt = -x_e_rise/tau_1 : 1
dx_e_decay/dt = -x_e_decay/tau_2_E : 1
dx_i_rise/dt = -x_i_rise/tau_1 : 1
dx_i_decay/dt = -x_i_decay/tau_2_I : 1
mu : 1 (constant)
mu_stim : 1
tau : second (constant)
cluster : integer (constant)
p_in : 1 (shared, constant)
p_out : 1 (shared, constant)
J_in : 1 (shared, constant)
"""

# One Synapses object per source type. Probability and weight depend on the target's type (cluster
# -1 marks an I neuron) and, for E to E, on whether both neurons share a cluster.
SAME = "int(cluster_pre == cluster_post)"
TO_I = "int(cluster_post < 0)"
E_SOURCE_P = f"{TO_I}*p_IE + (1 - {TO_I})*({SAME}*p_in_post + (1 - {SAME})*p_out_post)"
E_SOURCE_W = f"{TO_I}*J_IE + (1 - {TO_I})*({SAME}*J_in_post + (1 - {SAME})*J_out)"
I_SOURCE_P = f"{TO_I}*p_II + (1 - {TO_I})*p_EI"
I_SOURCE_W = f"{TO_I}*J_II + (1 - {TO_I})*J_EI"

# Random streams. Each draws from a seed of its own, stream_seed(simulation.seed, STREAM, ...), so
# that one seed gives the same network however the runs are spread over processes, and a draw added
# to one stream moves no other's numbers. (Stream 2 is no longer used; the others kept their keys,
# and so their numbers.)
NEURON_STREAM = 0  # each neuron's mu and initial V
SYNAPSE_STREAM = 1  # Brian2's seed when pre-built synapses are drawn
STIMULATED_CLUSTER_STREAM = 3  # which clusters the stimulus drives (with stimulus.cluster_seed)
CORRELATION_PAIR_STREAM = 4  # the pairs kept for the correlation histograms (and the run index)
TRIAL_STREAM = 5  # Brian2's seed of a trial (and the trial's index)

FANO_WINDOWS_MS = (100, 250, 500, 1000)  # counting windows of the FF within one run
# The FF across trials (Churchland et al.): a window of TRIAL_FANO_WINDOW s, sliding in steps of
# TRIAL_FANO_STEP s; the table gives its mean over the TRIAL_FANO_SPAN s before and after onset.
TRIAL_FANO_WINDOW, TRIAL_FANO_STEP, TRIAL_FANO_SPAN = 0.1, 0.05, 1.0


# --------------------------------------------------------------------------------------------------
# Pure functions of the model and of the analysis, which tests check without simulating
# --------------------------------------------------------------------------------------------------


def cluster_labels(n_e, cluster_size):
    """Cluster index of each E neuron: clusters are runs of ``cluster_size`` consecutive indices."""
    return np.arange(n_e) // cluster_size


def cluster_probabilities(R_EE, n_e, cluster_size, p_ee):
    """E to E connection probabilities ``(p_in, p_out)`` within and between clusters.

    Chosen so that an E neuron keeps K = p_ee * n_e inputs on average whatever R_EE: p_in = R_EE *
    p_out and cluster_size * p_in + (n_e - cluster_size) * p_out = K.
    """
    p_out = p_ee * n_e / (cluster_size * (R_EE - 1) + n_e)
    return R_EE * p_out, p_out


def synaptic_weights(n_e, p_ee, tau_e, tau_i):
    """The weights J_EE (E to E between clusters), J_IE, J_EI, J_II, as magnitudes: the numbers of
    WEIGHT_NUMERATORS over the target's membrane time constant in ms and sqrt(K), K = p_ee * n_e."""
    sqrt_k = np.sqrt(p_ee * n_e)
    tau_ms = {"E": float(tau_e / ms), "I": float(tau_i / ms)}
    return {name: j / (tau_ms[name[2]] * sqrt_k) for name, j in WEIGHT_NUMERATORS.items()}


def stream_seed(seed, *keys):
    """An integer seed for one random stream, e.g. (seed, TRIAL_STREAM, trial)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def stimulated_clusters(n_clusters_total, n_stimulated, seed):
    """Sorted indices of ``n_stimulated`` clusters, drawn at random without repeats by ``seed``."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_clusters_total, size=n_stimulated, replace=False))


def _seconds(value):
    if isinstance(value, Quantity):
        return np.asarray(value / second, dtype=float)
    return np.asarray(value, dtype=float)


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
    """Mean Fano factor of spike counts across the windows of one run, for each counting window.

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


def fano_factor_across_trials(trains, n_neurons, t_start, t_stop, window, step):
    """Mean Fano factor of each neuron's spike count ACROSS TRIALS, in a window sliding over
    [t_start, t_stop), as Churchland et al. (2010) measured it: ``(starts, ff)``.

    ``trains`` holds one (spike times, neuron indices) per trial, on a clock that is the same in
    every trial (here the run's: every trial starts at the pre-run's end). The window [s, s +
    window) starts at t_start, t_start + step, ... while it ends by t_stop (a spike on its end
    counts for the next window, up to rounding). In each window, for every neuron that fired in at
    least one trial, FF = sample variance / mean of its counts over the trials; ``ff`` holds the
    mean over those neurons, per window (NaN with fewer than two trials or where none fired). Not
    mean-matched: every neuron that fired counts, whatever its rate.
    """
    t_start, t_stop, window, step = (float(_seconds(x)) for x in (t_start, t_stop, window, step))
    n_windows = max(int(np.floor((t_stop - t_start - window) / step + 1e-9)) + 1, 0)
    starts = t_start + step * np.arange(n_windows)
    counts = np.zeros((len(trains), n_neurons, n_windows))
    for trial, (spike_t, spike_i) in enumerate(trains):
        t, neuron = _seconds(spike_t), np.asarray(spike_i, dtype=np.int64)
        for k, start in enumerate(starts):
            inside = (t >= start - 1e-9) & (t < start + window - 1e-9)
            counts[trial, :, k] = np.bincount(neuron[inside], minlength=n_neurons)
    ff = np.full(n_windows, np.nan)
    if len(trains) > 1:
        mean, variance = counts.mean(axis=0), counts.var(axis=0, ddof=1)
        for k in range(n_windows):
            fired = mean[:, k] > 0
            if fired.any():
                ff[k] = np.mean(variance[fired, k] / mean[fired, k])
    return starts, ff


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


def explored_in(traj, group_name):
    """True if any explored parameter lives in the parameter group ``group_name``."""
    prefix = f"parameters.{group_name}."
    return any(name.startswith(prefix) for name in traj.f_get_explored_parameters())


# --------------------------------------------------------------------------------------------------
# Components (spec 7.4)
# --------------------------------------------------------------------------------------------------


def add_simulation_parameters(traj, scale, seed, target):
    """The parameters every component reads: size, seed, code generation target (``target``:
    'auto' takes cython where Brian2 can compile, numpy otherwise), time step."""
    if target == "auto":
        from brian2.codegen.runtime.cython_rt import CythonCodeObject

        target = "cython" if CythonCodeObject.is_available() else "numpy"  # tested once, cached
    traj.f_add_parameter(
        "simulation.scale", scale,
        comment="Scales the numbers of neurons (and so K and the weights), not the cluster size",
    )
    traj.f_add_parameter("simulation.seed", seed, comment="Seed of every random stream")
    traj.f_add_parameter(
        "simulation.codegen_target", target,
        comment="Brian2 codegen target of the objects that run every time step",
    )
    traj.f_add_parameter(Brian2Parameter, "simulation.dt", 0.1 * ms, comment="Euler time step")


class CNNeuronGroup(NetworkComponent):
    """All neurons in ONE NeuronGroup, E = the first N_E, I = the rest.

    One group instead of two halves the per-step work of state update, threshold and reset.
    Pre-built when no ``model`` parameter is explored. Initial values come from a generator seeded
    only by ``simulation.seed``, so a network built per run (SCOOP, resume) starts like the
    pre-built one.

    network_dict:
        Adds 'neurons' (the group), 'neurons_e', 'neurons_i' (its subgroups).
    """

    def add_parameters(self, traj):
        scale = traj.simulation.scale
        traj.v_standard_parameter = Brian2Parameter
        traj.f_add_parameter("model.eqs", NEURON_EQUATIONS, comment="Neuron and synapse equations")
        add = traj.f_add_parameter
        add("model.N_E", int(PAPER["N_E"] * scale), comment="Excitatory neurons")
        add("model.N_I", int(PAPER["N_I"] * scale), comment="Inhibitory neurons")
        add("model.tau_E", PAPER["tau_E"], comment="Membrane time constant, E")
        add("model.tau_I", PAPER["tau_I"], comment="Membrane time constant, I")
        add("model.mu_E_min", PAPER["mu_E_min"], comment="Lowest bias mu of E")
        add("model.mu_E_max", PAPER["mu_E_max"], comment="Highest bias mu of E")
        add("model.mu_I_min", PAPER["mu_I_min"], comment="Lowest bias mu of I")
        add("model.mu_I_max", PAPER["mu_I_max"], comment="Highest bias mu of I")
        add("model.V_th", PAPER["V_th"], comment="Spike when V exceeds this")
        add("model.V_reset", PAPER["V_reset"], comment="V after a spike")
        add("model.tau_ref", PAPER["tau_ref"], comment="Absolute refractory period")
        add("model.synaptic.tau_1", PAPER["tau_1"], comment="Synaptic rise, E and I")
        add("model.synaptic.tau_2_E", PAPER["tau_2_E"], comment="Synaptic decay, E")
        add("model.synaptic.tau_2_I", PAPER["tau_2_I"], comment="Synaptic decay, I")

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
        # Set here, not in a main function: SCOOP workers and resumed runs never execute those.
        prefs.codegen.target = traj.simulation.codegen_target
        defaultclock.dt = traj.simulation.dt

        model = traj.parameters.model
        n_e, n_i = model.N_E, model.N_I
        synaptic = model.synaptic
        namespace = {"V_th": model.V_th, "V_reset": model.V_reset, "tau_ref": model.tau_ref,
                     "tau_1": synaptic.tau_1, "tau_2_E": synaptic.tau_2_E,
                     "tau_2_I": synaptic.tau_2_I}
        neurons = NeuronGroup(
            n_e + n_i, model.eqs, threshold="V > V_th", reset="V = V_reset",
            refractory="tau_ref", method="euler", namespace=namespace, name="neurons",
        )
        rng = np.random.default_rng(stream_seed(traj.simulation.seed, NEURON_STREAM))
        neurons.tau[:n_e] = model.tau_E
        neurons.tau[n_e:] = model.tau_I
        neurons.mu[:n_e] = rng.uniform(model.mu_E_min, model.mu_E_max, n_e)
        neurons.mu[n_e:] = rng.uniform(model.mu_I_min, model.mu_I_max, n_i)
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
    ``connections`` parameter such as R_EE is explored, pre-built otherwise. What R_EE sets (p_in,
    p_out, J_in) goes into shared variables of the neurons, which the synapses read as p_in_post and
    so on: in every run, also on a standalone device, whose program draws the synapses once per
    execution with the run's values (there the synapses are made once, for all runs).

    network_dict:
        Expects 'neurons_e', 'neurons_i', 'neurons'. Adds 'connections' (list of both Synapses).
    """

    def add_parameters(self, traj):
        model = traj.parameters.model
        traj.v_standard_parameter = Brian2Parameter
        add = traj.f_add_parameter
        add("connections.R_EE", 1.0, comment="Clustering ratio p_in / p_out (explored)")
        add("connections.cluster_size", PAPER["cluster_size"], comment="E neurons per cluster")
        add("connections.p_EE", PAPER["p_EE"], comment="Mean E to E probability (K / N_E)")
        add("connections.p_IE", PAPER["p_IE"], comment="E to I probability")
        add("connections.p_EI", PAPER["p_EI"], comment="I to E probability")
        add("connections.p_II", PAPER["p_II"], comment="I to I probability")
        add("connections.J_EE_in_factor", PAPER["J_EE_in_factor"],
            comment="J_in / J_EE, within a cluster, when R_EE > 1")
        weights = synaptic_weights(model.N_E, traj.parameters.connections.p_EE, model.tau_E,
                                   model.tau_I)
        for name, value in weights.items():
            add(f"connections.{name}", value,
                comment=f"Weight {name}, a magnitude: the paper's at full scale, as 1/sqrt(K)")

    def pre_build(self, traj, brian_list, network_dict):
        if "neurons" in network_dict and not explored_in(traj, "connections"):
            brian2_seed(stream_seed(traj.simulation.seed, SYNAPSE_STREAM))
            self._set_clustering(traj, network_dict["neurons"])
            self._build(traj, brian_list, network_dict)

    def build(self, traj, brian_list, network_dict):
        if not explored_in(traj, "connections"):
            return  # pre-built
        # Every run draws its synapses from the same random state (brian2pet section 5), so runs
        # of different R_EE differ in R_EE only, not in their random numbers.
        self._set_clustering(traj, network_dict["neurons"])
        if "connections" not in network_dict:
            self._build(traj, brian_list, network_dict)

    @staticmethod
    def _set_clustering(traj, neurons):
        """p_in, p_out and J_in, which R_EE sets, into the neurons' shared variables."""
        conn = traj.parameters.connections
        p_in, p_out = cluster_probabilities(
            conn.R_EE, traj.parameters.model.N_E, conn.cluster_size, conn.p_EE)
        if p_in > 1:
            raise ValueError(
                f"R_EE = {conn.R_EE} gives a within-cluster probability of {p_in:.3f} > 1"
            )
        neurons.p_in, neurons.p_out = p_in, p_out
        neurons.J_in = conn.J_EE * (conn.J_EE_in_factor if conn.R_EE > 1 else 1.0)

    @staticmethod
    def _build(traj, brian_list, network_dict):
        conn = traj.parameters.connections
        namespace = dict(p_IE=conn.p_IE, p_EI=conn.p_EI, p_II=conn.p_II, J_out=conn.J_EE,
                         J_IE=conn.J_IE, J_EI=conn.J_EI, J_II=conn.J_II,
                         N_E=traj.parameters.model.N_E)
        with codegen_target("numpy"):
            from_e = Synapses(
                network_dict["neurons_e"], network_dict["neurons"], "w : 1 (constant)",
                on_pre="x_e_rise_post += w\nx_e_decay_post += w",
                namespace=namespace, name="from_e",
            )
            # E indices start at 0 in source and target, so i != j excludes exactly the autapses.
            from_e.connect("i != j", p=E_SOURCE_P)
            from_e.w = E_SOURCE_W
            from_i = Synapses(
                network_dict["neurons_i"], network_dict["neurons"], "w : 1 (constant)",
                on_pre="x_i_rise_post -= w\nx_i_decay_post -= w",
                namespace=namespace, name="from_i",
            )
            # Source indices count from the first I neuron, target indices from the first E neuron.
            from_i.connect("j != i + N_E", p=I_SOURCE_P)
            from_i.w = I_SOURCE_W
        brian_list.extend([from_e, from_i])
        network_dict["connections"] = [from_e, from_i]


class CNStimulus(NetworkComponent):
    """A stimulus: raises mu of the E neurons of a few clusters by ``stimulus.strength``.

    The stimulus is a Synapses object from each stimulated E neuron onto itself that sets mu_stim
    through a summed variable. It is built per run, when network_dict lacks it (in every run, and
    once for all runs on a standalone device), and goes into brian_list, so the manager adds it to
    the network that the pre-run left (pypet.brian2 would silently leave it out). Its strength, the
    explored parameter, is its shared variable, set in every run. It is built switched off;
    add_to_network switches it on for the ``stimulus`` subrun, remove_from_network off again.

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
        n_e = traj.parameters.model.N_E
        size = traj.parameters.connections.cluster_size
        clusters = stimulated_clusters(
            n_e // size, traj.stimulus.n_clusters,
            stream_seed(traj.stimulus.cluster_seed, STIMULATED_CLUSTER_STREAM),
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


class CNTrial(NetworkComponent):
    """Trials that differ only in their seed: in every run, Brian2 is seeded with the trial's own
    stream, and every neuron's V moves by a random amount, uniform in +-trials.V_jitter.

    The network has no noise of its own, so without the jitter every trial would repeat the first;
    a jitter far below the threshold leaves the state the pre-run reached as it was, and the
    chaotic dynamics of the balanced network make trials that start a hair apart diverge. The seed
    comes first in build(), before anything draws, and in every run (on a standalone device
    brian2pet makes it the run's own value; the jitter is compiled once and draws from it there).
    The pre-run keeps the main script's seed, so every trial starts from the same pre-run state.

    network_dict:
        Expects 'neurons'.
    """

    def add_parameters(self, traj):
        traj.f_add_parameter("trials.trial", 0, comment="Trial index: seeds the trial's stream")
        traj.f_add_parameter("trials.V_jitter", 0.01,
                             comment="Each trial moves every V by up to this, at random")

    def build(self, traj, brian_list, network_dict):
        brian2_seed(stream_seed(traj.simulation.seed, TRIAL_STREAM, traj.trials.trial))
        with codegen_target("numpy"):  # runs once per run: not worth compiling
            network_dict["neurons"].V = f"V + {traj.trials.V_jitter!r} * (2 * rand() - 1)"


# --------------------------------------------------------------------------------------------------
# Runners (spec 7.4.2, 7.5)
# --------------------------------------------------------------------------------------------------


def add_subrun(traj, name, duration, order, comment):
    """A subrun for the runner (spec 7.5): a duration parameter under simulation.durations (or
    .pre_durations, the pre-run's), run in the order of its ``order`` annotation."""
    par = traj.f_add_parameter(Brian2Parameter, name, duration, comment=comment)
    par.v_annotations.order = order


class CNNetworkRunner(NetworkRunner):
    """An initial run that lets the network settle, then the measured run."""

    def __init__(self, initial_run=0.5 * second, measurement_run=10 * second):
        super().__init__(report=None)  # Brian2's text report would interleave between processes
        self.initial_run = initial_run
        self.measurement_run = measurement_run

    def add_parameters(self, traj):
        add_subrun(traj, "simulation.durations.initial_run", self.initial_run, 0,
                   "Settling time, not analysed")
        add_subrun(traj, "simulation.durations.measurement_run", self.measurement_run, 1,
                   "Recorded and analysed")


class CNStimulusRunner(NetworkRunner):
    """The stimulus experiment's subruns: a pre-run that lets the network settle (simulated once,
    spec 7.3), then in every run a spontaneous period and a stimulus period of equal length."""

    def __init__(self, settling_run=0.5 * second, period=2 * second):
        super().__init__(report=None)
        self.settling_run = settling_run
        self.period = period

    def add_parameters(self, traj):
        add_subrun(traj, "simulation.pre_durations.settling_run", self.settling_run, 0,
                   "Settling time, simulated once before all runs (the pre-run), not analysed")
        add_subrun(traj, "simulation.durations.spontaneous", self.period, 0,
                   "Recorded without stimulus")
        add_subrun(traj, "simulation.durations.stimulus", self.period, 1,
                   "Recorded with the stimulus switched on")


# --------------------------------------------------------------------------------------------------
# Analysers (spec 7.4.1)
# --------------------------------------------------------------------------------------------------


def is_pre_run(subrun):
    """True for a subrun of the pre-run (spec 7.5: the runner takes those from pre_durations)."""
    return subrun.v_full_name.startswith("parameters.simulation.pre_durations.")


class CNActivityGuard(NetworkAnalyser):
    """Cancels the rest of a run whose E neurons fire pathologically fast (spec 7.5's example).

    After every subrun of a run (not of the pre-run) it takes the mean E rate in that subrun from a
    population rate monitor of the E neurons, which records the whole run. Above
    ``analysis.max_rate_E`` it empties ``subrun_list``, so the runner simulates nothing more in
    this run, and stores why. It is listed first among the analysers, so that those after it
    already see the emptied list: a run cancelled before its measurement stores no measurement.

    network_dict:
        Expects 'neurons_e'. Adds 'guard' (the monitor, and when each subrun started, by name: on a
        standalone device every analysis comes after the whole run).
    Results: statistics.pathological (Brian2Result: subrun, rate_E, max_rate_E, cancelled, reason),
    only in a run where the rate was exceeded.
    """

    def add_parameters(self, traj):
        traj.f_add_parameter(
            Brian2Parameter, "analysis.max_rate_E", 100 * Hz,
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
        max_rate_e = traj.analysis.max_rate_E
        if rate_e <= max_rate_e:
            return
        cancelled = ", ".join(subrun.v_name for subrun in subrun_list) or "nothing (last subrun)"
        subrun_list.clear()  # the runner stops after this subrun (spec 7.5)
        reason = (
            f"mean E rate {float(rate_e / Hz):.1f} Hz in subrun {current_subrun.v_name} exceeds "
            f"analysis.max_rate_E = {float(max_rate_e / Hz):g} Hz; cancelled: {cancelled}"
        )
        traj.f_add_result(
            Brian2Result, "statistics.pathological", subrun=current_subrun.v_name, rate_E=rate_e,
            max_rate_E=max_rate_e, cancelled=cancelled, reason=reason,
            comment="Why the remaining subruns of this run were cancelled",
        )


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
    Results: monitors.spikes_e, monitors.V, monitors.I_syn_e, monitors.I_syn_i
    (Brian2MonitorResult), statistics.rates (Brian2Result with e and i in Hz, over all recorded
    subruns).
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
            traj.f_add_result(Brian2MonitorResult, f"monitors.{name}", monitor,
                              comment=comments[name])
        duration = network.t - network_dict["measurement"]["t_start"]
        traj.f_add_result(
            Brian2Result, "statistics.rates",
            e=len(monitors["spikes_e"].t) / traj.parameters.model.N_E / duration,
            i=np.mean(network_dict["rate_i"].rate),
            comment="Mean firing rates of E and I neurons during the measurement",
        )

    def remove_from_network(self, traj, network, current_subrun, subrun_list, network_dict):
        if current_subrun.v_name in self.measured and self._is_last(subrun_list):
            network.remove(network_dict["rate_i"], *network_dict["monitors"].values())


class CNFanoFactorComputer(NetworkAnalyser):
    """Fano factor of E spike counts across the windows of the measurement run, per window length.

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
        if current_subrun.v_name != "measurement_run":
            return
        spikes = network_dict["monitors"]["spikes_e"]
        t_start = network_dict["measurement"]["t_start"]
        windows = np.array(traj.analysis.fano_windows) * second
        counting = (spikes.t[:], spikes.i[:], traj.parameters.model.N_E, t_start, network.t)
        traj.f_add_result(
            Brian2Result, "statistics.fano_factor", window=windows,
            ff=fano_factor(*counting, windows),
            comment="Mean Fano factor of E spike counts per counting window",
        )
        traj.f_add_result(
            "statistics.mean_fano_factor",
            float(fano_factor(*counting, [traj.analysis.mean_fano_window])[0]),
            comment="Mean Fano factor of E spike counts at analysis.mean_fano_window",
        )


class CNCorrelationComputer(NetworkAnalyser):
    """Spike-count correlations of E neurons after the measurement run: weak on average, strong
    within a cluster when R_EE is large enough for clusters to switch together (finding 2).

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
        if current_subrun.v_name != "measurement_run":
            return
        spikes = network_dict["monitors"]["spikes_e"]
        n_e = traj.parameters.model.N_E
        window = traj.analysis.correlation_window
        result = count_correlations(
            spikes.t[:], spikes.i[:], cluster_labels(n_e, traj.parameters.connections.cluster_size),
            network_dict["measurement"]["t_start"], network.t, window,
            n_sample=traj.analysis.correlation_sample,
            seed=stream_seed(traj.simulation.seed, CORRELATION_PAIR_STREAM, traj.v_idx),
        )
        traj.f_add_result(
            Brian2Result, "statistics.correlations", window=window, **result,
            comment="Mean Pearson r of E spike counts over pairs: same cluster, other, all",
        )


class CNQuenchingAnalyser(CNFanoFactorComputer):
    """Fano factor and rate of E neurons before and during the stimulus, within one run (finding 3):
    the Fano factor computer's windows, applied to each recorded period. (Across trials it is
    computed from the stored spikes after the runs: trial_fano_factors.)

    network_dict:
        Expects 'monitors' and 'periods' from CNMonitorAnalysis, 'stimulated_clusters' from
        CNStimulus.
    Results: statistics.quenching (Brian2Result: window; ff_spontaneous, ff_stimulus, FF over all
    E neurons per window; rate_spontaneous, rate_stimulus, mean E rate; start, onset, end: when the
    recording began, the stimulus came on, the run ended; clusters, the stimulated).
    """

    def analyse(self, traj, network, current_subrun, subrun_list, network_dict):
        if current_subrun.v_name != "stimulus":
            return
        spikes = network_dict["monitors"]["spikes_e"]
        t, i = spikes.t[:], spikes.i[:]
        n_e = traj.parameters.model.N_E
        windows = np.array(traj.analysis.fano_windows) * second
        stats = {}
        for period in ("spontaneous", "stimulus"):
            start, end = network_dict["periods"][period]
            stats[f"ff_{period}"] = fano_factor(t, i, n_e, start, end, windows)
            in_period = (t >= start) & (t < end)
            stats[f"rate_{period}"] = np.count_nonzero(in_period) / n_e / (end - start)
        periods = network_dict["periods"]
        traj.f_add_result(
            Brian2Result, "statistics.quenching", window=windows,
            start=periods["spontaneous"][0], onset=periods["stimulus"][0],
            end=periods["stimulus"][1],
            clusters=np.asarray(network_dict["stimulated_clusters"]), **stats,
            comment="FF and mean rate of E neurons without and with the stimulus",
        )


# --------------------------------------------------------------------------------------------------
# The experiments: one main function each, the spec's main script (7.3) step by step. Both store
# their trajectory in the same HDF5 file through brian2pet's storage, which a kill at any moment
# cannot ruin; with several cores each run is a forked worker (brian2pet.ForkingEnvironment).
# pypet's settings (environment_options) and the manager for --device (network_manager) come from
# the operations part at the end.
# --------------------------------------------------------------------------------------------------

SWEEP, STIMULUS = "clustered_network", "stimulus_response"  # the trajectories
HDF5_NAME = "clustered_network.hdf5"


def run_sweep(args, filename, resume_folder):
    """Experiment 1, findings 1 and 2: the network explored over R_EE. Each R_EE needs connections
    of its own, so only the neurons are pre-built. Returns the trajectory once every run ended."""
    env = ForkingEnvironment(
        trajectory=SWEEP, comment="Litwin-Kumar & Doiron (2012) clustered network over R_EE",
        **environment_options(args, filename, resume_folder),
    )
    traj = env.trajectory
    add_simulation_parameters(traj, args.scale, args.seed, args.target)
    manager = network_manager(
        args, SWEEP,
        network_runner=CNNetworkRunner(args.initial * second, args.measure * second),
        component_list=[CNNeuronGroup(), CNConnections()],
        analyser_list=[CNActivityGuard(), CNMonitorAnalysis(), CNFanoFactorComputer(),
                       CNCorrelationComputer()],
    )
    manager.add_parameters(traj)
    traj.f_get("analysis.max_rate_E").f_set(args.max_rate * Hz)
    traj.f_explore({"R_EE": [float(r) for r in args.r_ee]})

    brian2_seed(args.seed)  # the random state every run starts from (brian2pet section 5)
    np.random.seed(args.seed)
    manager.pre_build(traj)  # the neurons; on a standalone device it compiles the program too
    traj.f_store()
    env.run(manager.run_network)
    env.disable_logging()
    return traj


def run_stimulus_experiment(args, filename, resume_folder):
    """Experiment 2, finding 3: ONE clustered network, built and pre-run once (spec 7.3,
    pre_run_network); every run starts from the state after that pre-run and explores stimulus
    strength (0 is the control) x trial. Returns the trajectory once every run ended."""
    env = ForkingEnvironment(
        trajectory=STIMULUS, comment="Litwin-Kumar & Doiron (2012): a stimulus to a few clusters",
        **environment_options(args, filename, resume_folder),
    )
    traj = env.trajectory
    add_simulation_parameters(traj, args.scale, args.seed, args.target)
    manager = network_manager(
        args, STIMULUS,
        network_runner=CNStimulusRunner(args.initial * second, args.period * second),
        component_list=[CNNeuronGroup(), CNConnections(), CNTrial(), CNStimulus()],
        analyser_list=[CNActivityGuard(), CNMonitorAnalysis(measured=("spontaneous", "stimulus")),
                       CNQuenchingAnalyser()],
    )
    manager.add_parameters(traj)
    traj.f_get("connections.R_EE").f_set(args.stimulus_r_ee)
    traj.f_get("stimulus.n_clusters").f_set(args.stimulus_clusters)
    traj.f_get("analysis.max_rate_E").f_set(args.max_rate * Hz)
    traj.f_explore(cartesian_product({  # the trials of one strength follow each other
        "stimulus.strength": [float(s) for s in args.strengths],
        "trials.trial": list(range(args.trials)),
    }))

    brian2_seed(args.seed)  # the pre-run's seed; each trial seeds its runs itself (CNTrial)
    np.random.seed(args.seed)
    manager.pre_run_network(traj)  # neurons and connections, settled; on a standalone device
    traj.f_store()                 # it compiles the program too
    env.run(manager.run_network)
    env.disable_logging()
    return traj


EXPERIMENTS = {"sweep": (SWEEP, run_sweep), "stimulus": (STIMULUS, run_stimulus_experiment)}


# --------------------------------------------------------------------------------------------------
# Tables and figures, made from brian2pet.runs_table: a pandas DataFrame per experiment, one row per
# run, read from the HDF5 file without running or unpickling anything in it (a file may come from
# anyone). Column labels: explored parameters by name ('connections.R_EE'), result items as
# 'NAME.ITEM (unit)' ('statistics.rates.e (Hz)'), and 'stored'.
# --------------------------------------------------------------------------------------------------

SWEEP_RESULTS = ("statistics.rates", "statistics.fano_factor", "statistics.correlations",
                 "statistics.pathological")
STIMULUS_RESULTS = ("statistics.quenching", "statistics.pathological")
MONITORS = ("monitors.spikes_e", "monitors.V", "monitors.I_syn_e", "monitors.I_syn_i")


def runs_with(table, label):
    """The rows of ``table`` (a runs_table) whose cell ``label`` holds something: the runs that
    stored that result item (none when no run did, and the table has no such column)."""
    return table[table[label].notna()] if label in table else table.iloc[:0]


def cancelled_runs(table, explored):
    """(run index, value of the explored parameter, reason) of the runs the guard cancelled."""
    label = "statistics.pathological.reason"
    return [(idx, row[explored], row[label]) for idx, row in runs_with(table, label).iterrows()]


def format_sweep_table(table):
    """The sweep: R_EE, rates, FF per window, mean correlations; a line per run, and a line per
    run the guard cancelled. Runs that failed or never ran have none."""
    runs = runs_with(table, "statistics.fano_factor.ff")
    lines = []
    for idx, run in runs.iterrows():
        if not lines:
            windows = run["statistics.fano_factor.window (s)"]
            head = f"{'run':>4} {'R_EE':>5} {'rate E':>7} {'rate I':>7} " + " ".join(
                f"{'FF ' + format(w * 1000, 'g') + 'ms':>10}" for w in windows
            ) + f" {'r same':>7} {'r other':>7} {'r all':>7}"
            lines += [head, "-" * len(head)]
        lines.append(
            f"{idx:>4} {run['connections.R_EE']:>5.2f} {run['statistics.rates.e (Hz)']:>5.2f}Hz "
            f"{run['statistics.rates.i (Hz)']:>5.2f}Hz "
            + " ".join(f"{ff:>10.2f}" for ff in run["statistics.fano_factor.ff"])
            + f" {run['statistics.correlations.same_cluster']:>7.3f}"
            f" {run['statistics.correlations.other_cluster']:>7.3f}"
            f" {run['statistics.correlations.all']:>7.3f}"
        )
    lines = lines or ["no finished runs"]
    return "\n".join(lines + [f"{idx:>4} {r_ee:>5.2f} pathological: {reason}"
                              for idx, r_ee, reason in cancelled_runs(table, "connections.R_EE")])


def trial_fano_factors(table, n_e, window=TRIAL_FANO_WINDOW, step=TRIAL_FANO_STEP):
    """{strength: (times, ff)}: the FF across the trials of each strength (Churchland et al.), in a
    window sliding over the whole recording, from the runs that stored statistics.quenching (and
    their spikes); ``times`` are the windows' centres, in s from stimulus onset."""
    result = {}
    for strength, trials in runs_with(table, "statistics.quenching.onset (s)").groupby(
            "stimulus.strength"):
        first = trials.iloc[0]  # the periods are the same in every run
        onset = first["statistics.quenching.onset (s)"]
        trains = list(zip(trials["monitors.spikes_e.t (s)"], trials["monitors.spikes_e.i"]))
        starts, ff = fano_factor_across_trials(
            trains, n_e, first["statistics.quenching.start (s)"],
            first["statistics.quenching.end (s)"], window, step)
        result[strength] = (starts + window / 2 - onset, ff)
    return result


def around_onset(times, ff, span=TRIAL_FANO_SPAN):
    """The mean of ``ff`` over the windows wholly within ``span`` s before the onset, and within
    ``span`` s after it (``times``: the windows' centres from onset, as trial_fano_factors)."""
    half = TRIAL_FANO_WINDOW / 2
    before = (times <= -half + 1e-9) & (times >= -span + half - 1e-9)
    after = (times >= half - 1e-9) & (times <= span - half + 1e-9)
    return (np.nanmean(ff[before]) if before.any() else np.nan,
            np.nanmean(ff[after]) if after.any() else np.nan)


def stimulus_rows(table, trial_ff):
    """One dict per strength, over its trials that stored statistics.quenching: strength, trials,
    the means over trials of the E rates (Hz) and of the FF per window within one run, spontaneous
    and with the stimulus; ff_trials_before / _after: the FF across trials around the onset."""
    rows = []
    for strength, trials in runs_with(table, "statistics.quenching.onset (s)").groupby(
            "stimulus.strength"):
        row = {"strength": strength, "trials": len(trials),
               "windows": trials.iloc[0]["statistics.quenching.window (s)"],
               "clusters": list(trials.iloc[0]["statistics.quenching.clusters"])}
        for period in ("spontaneous", "stimulus"):
            row[f"rate_{period}"] = trials[f"statistics.quenching.rate_{period} (Hz)"].mean()
            row[f"ff_{period}"] = np.mean(np.stack(trials[f"statistics.quenching.ff_{period}"]),
                                          axis=0)
        row["ff_trials_before"], row["ff_trials_after"] = around_onset(*trial_ff[strength])
        rows.append(row)
    return rows


def format_stimulus_table(table, rows):
    """The stimulus experiment: E rate and FF without -> with the stimulus, a line per strength
    (means over its trials), and a line per run the guard cancelled."""
    lines = []
    for row in rows:
        if not lines:
            head = f"{'strength':>8} {'trials':>6} {'E rate (Hz)':>13} " + " ".join(
                f"{'FF ' + format(w * 1000, 'g') + 'ms':>13}" for w in row["windows"]
            ) + f" {'FF across trials':>17}"
            lines += [head, "-" * len(head)]
        pairs = zip(row["ff_spontaneous"], row["ff_stimulus"])
        lines.append(
            f"{row['strength']:>8.3f} {row['trials']:>6} "
            f"{row['rate_spontaneous']:>5.2f} -> {row['rate_stimulus']:>4.2f} "
            + " ".join(f"{a:>5.2f} -> {b:>4.2f}" for a, b in pairs)
            + f" {row['ff_trials_before']:>8.2f} -> {row['ff_trials_after']:>4.2f}"
        )
    if rows:
        lines += [
            "(spontaneous -> stimulus, means over trials. FF per window: across the windows of "
            "one run; across trials:",
            f"the FF of each neuron's count across trials, {TRIAL_FANO_WINDOW * 1000:g} ms "
            f"windows, mean over those in the {TRIAL_FANO_SPAN:g} s before and after onset.",
            f"Stimulated clusters: {rows[0]['clusters']})"]
    lines = lines or ["no finished runs"]
    return "\n".join(lines + [f"run {idx}: strength {s:g} pathological: {reason}"
                              for idx, s, reason in cancelled_runs(table, "stimulus.strength")])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _saved(plt, fig, filename):
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)
    return filename


def plot_raster(spike_t, spike_i, t_zero, cluster_size, title, filename, span=(0.0, 3.0),
                shaded=()):
    """E spikes from ``span[0]`` to ``span[1]`` s after ``t_zero``, neurons in cluster order;
    clusters in ``shaded`` shaded, and a line at t_zero when the span starts before it."""
    plt = _pyplot()
    t = np.asarray(spike_t) - t_zero
    shown = (t >= span[0]) & (t < span[1])
    fig, ax = plt.subplots(figsize=(10, 6))
    for cluster in shaded:
        ax.axhspan(cluster * cluster_size, (cluster + 1) * cluster_size, color="C3", alpha=0.25,
                   lw=0)
    ax.plot(t[shown], np.asarray(spike_i)[shown], ",k", rasterized=True)
    if span[0] < 0:
        ax.axvline(0.0, color="C3", lw=0.8)
    ax.set_xlim(*span)
    ax.set_xlabel("time from stimulus onset (s)" if span[0] < 0 else "time in measurement (s)")
    ax.set_ylabel(f"E neuron (clusters of {cluster_size} in order"
                  + ("; stimulated shaded)" if len(shaded) else ")"))
    ax.set_title(title)
    return _saved(plt, fig, filename)


def plot_traces(run, t_zero, cluster_size, filename, seconds=1.0):
    """V, I_syn_e and I_syn_i of the recorded neurons (``run``: a row with the monitors); colour
    tells the cluster."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True)
    for ax, (variable, label) in zip(axes, (("V", "monitors.V"),
                                            ("I_syn_e", "monitors.I_syn_e (Hz)"),
                                            ("I_syn_i", "monitors.I_syn_i (Hz)"))):
        t = run[f"monitors.{variable}.t"] - t_zero  # a StateMonitor's t: plain seconds
        shown = t < seconds
        for k, neuron in enumerate(np.asarray(run[f"monitors.{variable}.record"])):
            cluster = int(neuron) // cluster_size
            ax.plot(t[shown], np.asarray(run[label])[k, shown], lw=0.7, color=f"C{cluster % 10}",
                    ls=("-", "--", ":", "-.")[k % 4], label=f"neuron {neuron} (cluster {cluster})")
        ax.set_ylabel(label.replace("monitors.", "").replace("(Hz)", "(1/s)"))
    axes[0].legend(loc="upper right", fontsize=7, ncol=2)
    axes[0].set_title(f"Recorded E neurons, R_EE = {run['connections.R_EE']:g}")
    axes[-1].set_xlabel("time in measurement (s)")
    return _saved(plt, fig, filename)


def plot_fano_vs_window(runs, filename):
    """FF against counting window, one line per R_EE (the paper's signature of slow dynamics)."""
    from matplotlib.ticker import FormatStrFormatter

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for _, run in runs.iterrows():
        ax.plot(np.asarray(run["statistics.fano_factor.window (s)"]) * 1000,
                run["statistics.fano_factor.ff"], "o-",
                label=f"R_EE = {run['connections.R_EE']:.2f}")
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_yscale("log")  # keeps the sub-Poisson lines apart from each other
    for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_format(FormatStrFormatter("%g"))
    ax.set_xlabel("counting window (ms)")
    ax.set_ylabel("Fano factor (mean over E neurons)")
    ax.legend(fontsize=8)
    return _saved(plt, fig, filename)


def plot_fano_and_rates_vs_r_ee(runs, filename):
    """FF per window and the mean rates of E and I against R_EE."""
    plt = _pyplot()
    r_ee = runs["connections.R_EE"]
    ff = np.stack(runs["statistics.fano_factor.ff"])
    fig, (ax_ff, ax_rate) = plt.subplots(1, 2, figsize=(10, 4))
    for k, window in enumerate(runs["statistics.fano_factor.window (s)"].iloc[0]):
        ax_ff.plot(r_ee, ff[:, k], "o-", label=f"{window * 1000:g} ms")
    ax_ff.axhline(1.0, color="grey", ls=":", lw=1)
    ax_ff.set_xlabel("R_EE")
    ax_ff.set_ylabel("Fano factor")
    ax_ff.legend(title="window", fontsize=8)
    ax_rate.plot(r_ee, runs["statistics.rates.e (Hz)"], "o-", label="E")
    ax_rate.plot(r_ee, runs["statistics.rates.i (Hz)"], "s-", label="I")
    ax_rate.set_xlabel("R_EE")
    ax_rate.set_ylabel("mean rate (Hz)")
    ax_rate.legend()
    return _saved(plt, fig, filename)


def plot_correlations(runs, filename):
    """Histograms of the spike-count correlation r of same-cluster and other pairs of E neurons,
    one panel per run (a sample of pairs; the legend gives the means over all pairs)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    bins = np.linspace(-0.3, 1.0, 53)
    for ax, (_, run) in zip(axes[0], runs.iterrows()):
        for kind, colour in (("other_cluster", "grey"), ("same_cluster", "C3")):
            sample = np.clip(np.asarray(run[f"statistics.correlations.sample_{kind}"]), -0.3, 1.0)
            mean = run[f"statistics.correlations.{kind}"]
            ax.hist(sample, bins=bins, density=True, histtype="stepfilled", alpha=0.5,
                    color=colour, label=f"{kind.replace('_', ' ')} pairs: mean r = {mean:.3f}")
        ax.set_title(f"R_EE = {run['connections.R_EE']:g}")
        window = run["statistics.correlations.window (s)"] * 1000
        ax.set_xlabel(f"r of spike counts in {window:g} ms windows")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("density")
    return _saved(plt, fig, filename)


def plot_quenching(rows, filename):
    """The FF within one run (longest and shortest window) and the mean E rate, spontaneous vs
    stimulus, against the stimulus strength (means over trials)."""
    plt = _pyplot()
    strength = [row["strength"] for row in rows]
    windows = rows[0]["windows"]
    fig, (ax_ff, ax_rate) = plt.subplots(1, 2, figsize=(10, 4))
    for k, style in ((len(windows) - 1, "-"), (0, ":")):
        for period, marker, colour in (("spontaneous", "o", "C0"), ("stimulus", "s", "C3")):
            ax_ff.plot(strength, [row[f"ff_{period}"][k] for row in rows], marker + style,
                       color=colour, label=f"{period}, {windows[k] * 1000:g} ms")
    ax_ff.axhline(1.0, color="grey", ls=":", lw=1)
    ax_ff.set_xlabel("stimulus strength (rise of mu)")
    ax_ff.set_ylabel("Fano factor within a run (mean over E)")
    ax_ff.legend(fontsize=8)
    for period, marker, colour in (("spontaneous", "o", "C0"), ("stimulus", "s", "C3")):
        ax_rate.plot(strength, [row[f"rate_{period}"] for row in rows], marker + "-",
                     color=colour, label=period)
    ax_rate.set_xlabel("stimulus strength (rise of mu)")
    ax_rate.set_ylabel("mean E rate (Hz)")
    ax_rate.set_ylim(bottom=0)
    ax_rate.legend()
    return _saved(plt, fig, filename)


def plot_trial_fano(trial_ff, trials, filename):
    """The FF across trials (Churchland et al. 2010) against time from stimulus onset, one line per
    strength."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (strength, (times, ff)) in enumerate(sorted(trial_ff.items())):
        ax.plot(times, ff, "-", color=f"C{k}",
                label="control" if strength == 0 else f"strength {strength:g}")
    ax.axvline(0.0, color="C3", lw=0.8)
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_xlabel(f"time from stimulus onset (s), centre of the "
                  f"{TRIAL_FANO_WINDOW * 1000:g} ms window")
    ax.set_ylabel(f"Fano factor across {trials} trials (mean over E)")
    ax.legend(fontsize=8)
    return _saved(plt, fig, filename)


def sweep_figures(table, parameters, folder):
    """Every figure of the sweep, as PNG in ``folder``; returns their paths. ``table`` holds the
    monitors too."""
    runs = runs_with(table, "statistics.fano_factor.ff")
    if runs.empty:
        return []
    t_zero = float(parameters.f_get("simulation.durations.initial_run").f_get() / second)
    cluster_size = parameters.f_get("connections.cluster_size").f_get()
    # Rasters, traces and correlations of R_EE = 1.0 and 2.5, else of the first and the last run.
    shown = runs[runs["connections.R_EE"].isin([1.0, 2.5])]
    shown = shown if len(shown) else runs.iloc[sorted({0, len(runs) - 1})]
    paths = []
    for _, run in shown.iterrows():
        r_ee = run["connections.R_EE"]
        paths.append(plot_raster(
            run["monitors.spikes_e.t (s)"], run["monitors.spikes_e.i"], t_zero, cluster_size,
            f"E spikes, R_EE = {r_ee:g}", os.path.join(folder, f"raster_R_EE_{r_ee:.2f}.png")))
        paths.append(plot_traces(run, t_zero, cluster_size,
                                 os.path.join(folder, f"traces_R_EE_{r_ee:.2f}.png")))
    return paths + [
        plot_fano_vs_window(runs, os.path.join(folder, "fano_vs_window.png")),
        plot_fano_and_rates_vs_r_ee(runs, os.path.join(folder, "fano_and_rates_vs_R_EE.png")),
        plot_correlations(shown, os.path.join(folder, "correlations.png")),
    ]


def stimulus_figures(table, rows, trial_ff, parameters, folder):
    """Every figure of the stimulus experiment, as PNG in ``folder``; returns their paths."""
    if not rows:
        return []
    cluster_size = parameters.f_get("connections.cluster_size").f_get()
    paths = [plot_quenching(rows, os.path.join(folder, "quenching_vs_strength.png")),
             plot_trial_fano(trial_ff, max(row["trials"] for row in rows),
                             os.path.join(folder, "fano_across_trials.png"))]
    runs = runs_with(table, "statistics.quenching.onset (s)")
    for strength, trials in runs.groupby("stimulus.strength"):
        if strength > 0:  # the first trial's spikes
            run = trials.iloc[0]
            paths.append(plot_raster(
                run["monitors.spikes_e.t (s)"], run["monitors.spikes_e.i"],
                run["statistics.quenching.onset (s)"], cluster_size,
                f"E spikes, stimulus strength {strength:g}, trial {run['trials.trial']}",
                os.path.join(folder, f"stimulus_raster_{strength:g}.png"), span=(-2.0, 2.0),
                shaded=run["statistics.quenching.clusters"]))
    return paths


def report(filename, plots, require_runs=False):
    """Print the table of each experiment that ``filename`` holds and, with ``plots``, draw its
    figures beside the file and list them. ``require_runs``: a file in which no experiment stored
    a run (finished or cancelled) is refused (FileRefused). Reads nothing but numbers and text."""
    folder = os.path.dirname(os.path.abspath(filename))
    reports = []
    for name in check_experiments_file(filename):
        parameters = load_nodes(filename, name, ("parameters",)).parameters
        try:
            if name == SWEEP:
                table = runs_table(filename, name, SWEEP_RESULTS + (MONITORS if plots else ()))
                text, figures = format_sweep_table(table), (sweep_figures, table)
            else:
                table = runs_table(filename, name, STIMULUS_RESULTS + ("monitors.spikes_e",))
                trial_ff = trial_fano_factors(table, parameters.f_get("model.N_E").f_get())
                rows = stimulus_rows(table, trial_ff)
                text = format_stimulus_table(table, rows)
                figures = (stimulus_figures, table, rows, trial_ff)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
            # HDF5 has no checksums here: a damaged file can hold items missing or garbled.
            raise FileRefused(f"{filename}: damaged, its '{name}' results are not what this "
                              f"script stores: {type(error).__name__}: {error}") from error
        reports.append((name, text, figures, parameters, table["stored"].any()))
    if require_runs and not any(stored for *_, stored in reports):
        raise FileRefused(f"{filename}: holds no run of either experiment "
                          f"({', '.join(name for name, *_ in reports)} without results)")
    for name, text, (draw, *data), parameters, _ in reports:
        print(f"\n{name}:\n{text}")
        for path in draw(*data, parameters, folder) if plots else []:
            print(f"figure: {os.path.abspath(path)}")
    print(f"HDF5 file: {os.path.abspath(filename)}")


def check_experiments_file(filename):
    """{experiment: its nodes} for each of this script's experiments in ``filename``; FileRefused
    (one line) for a file that holds none, or anything that could run code."""
    return check_file(filename, (SWEEP, STIMULUS), ("parameters", "results.runs"))


# --------------------------------------------------------------------------------------------------
# Operations, not about this network: progress lines, device, pypet's settings, command line,
# output folder and lock, main(). Ctrl-C and SIGTERM stop cleanly (brian2pet 7.1); after any stop,
# even a SIGKILL inside a write, --resume runs what is left (brian2pet.prepare_resume).
# --------------------------------------------------------------------------------------------------


def say(line):
    """Print ``line`` in one write: lines that workers print at the same moment stay whole."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def explored_text(traj):
    """'R_EE = 2.5' for the current run (every explored parameter, by its short name)."""
    return ", ".join(f"{param.v_name} = {param.f_get()}"
                     for param in traj.f_get_explored_parameters(copy=False).values())


class RunFailed(RuntimeError):  # one run raised; the message names it and its explored values
    pass


class RunsSaid:
    """For a brian2pet manager: runs say when they start and end (and why the guard cancelled
    them), a failing run raises RunFailed naming it, ``fail_run`` fails a run on purpose (tests),
    and what a run freed goes back to the system before the next (glibc's malloc_trim: a run's
    synapses are ~200 MB of small C++ allocations at full scale). Only the original standalone
    manager compiles; its copies (SCOOP, --resume) run the program in OUT/standalone/NAME."""

    fail_run, _runs_here, _pre_running = None, 0, False

    def run_network(self, traj):
        if self._runs_here:
            with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
                ctypes.CDLL("libc.so.6").malloc_trim(0)
        started, run = time.time(), f"run {traj.v_idx + 1}/{len(traj)}"
        say(f"{run} started: {explored_text(traj)}")
        try:
            if traj.v_idx == self.fail_run:
                raise RuntimeError("deliberate failure (--fail-run)")
            super().run_network(traj)
        except Exception as error:
            raise RunFailed(f"run {traj.v_idx} ({explored_text(traj)}) failed: "
                            f"{type(error).__name__}: {error}") from error
        self._runs_here += 1
        cancelled = f"results.runs.{traj.v_crun}.statistics.pathological"
        why = f"; {traj.f_get(cancelled).reason}" if traj.f_contains(cancelled) else ""
        say(f"{run} done in {time.time() - started:.1f} s on {socket.gethostname()}: "
            f"{explored_text(traj)}{why}")

    def pre_build(self, traj):
        started = time.time()
        super().pre_build(traj)
        if getattr(self, "compiles", False) and not self._pre_running:  # else said below
            say(f"compiled '{traj.v_name}' in {time.time() - started:.0f} s into {self.directory}")

    def pre_run_network(self, traj):
        started, self._pre_running = time.time(), True
        super().pre_run_network(traj)
        if getattr(self, "compiles", False):
            say(f"compiled '{traj.v_name}' and analysed its pre-run in "
                f"{time.time() - started:.0f} s into {self.directory}")


class CNNetworkManager(RunsSaid, NetworkManager):
    """brian2pet's manager (--device runtime, the default)."""


class CNStandaloneNetworkManager(RunsSaid, StandaloneNetworkManager):
    """brian2pet's manager for a standalone device (--device cpp_standalone)."""


def use_device(device):
    """Simulate on ``device`` from here on: 'runtime', or a standalone one (brian2pet section 8)."""
    if device != "runtime":
        set_device(device, build_on_run=False)
        get_device().reinit()  # forget an earlier experiment's program
        get_device().activate(build_on_run=False)


def network_manager(args, name, **parts):
    """The experiment ``name``'s manager for --device, given the runner, components, analysers."""
    use_device(args.device)
    if args.device == "runtime":
        manager = CNNetworkManager(**parts)
    else:
        manager = CNStandaloneNetworkManager(
            directory=os.path.join(args.out, "standalone", name), **parts)
    manager.fail_run = args.fail_run
    return manager


HAVE_DILL = importlib.util.find_spec("dill") is not None  # pypet writes its resume files with dill


def environment_options(args, filename, resume_folder):
    """pypet's Environment settings that both experiments share (and a resumed one takes again)."""
    processes = {}  # one process; with SCOOP its workers get the run function pickled
    if args.scoop or args.ncores > 1:  # the workers send their results to this process, the one
        # writer of the file (LOCAL: pypet resumes LOCAL, LOCK and NETLOCK, not QUEUE); without
        # SCOOP, a worker is forked per run (no pool), so the pre-built network is not pickled
        processes = dict(multiproc=True, wrap_mode="LOCAL", **(
            dict(use_scoop=True) if args.scoop else dict(ncores=args.ncores, use_pool=False)))
    return dict(
        filename=filename, storage_service=CheckpointedHDF5StorageService,
        dynamic_imports=[Brian2Parameter, Brian2Result, Brian2MonitorResult], log_config=None,
        complevel=1,  # pypet's default, zlib level 9, costs a second per sweep for 2 % less file
        report_progress=False, resumable=HAVE_DILL, resume_folder=resume_folder,
        delete_resume=False,  # pypet would delete them before its final stores: experiment_done
        **processes,
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, easy to spot in a batch log
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None):
    parser = _Parser(prog="clustered_network.py", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--experiment", choices=("sweep", "stimulus", "both"), default="both")
    add("--scale", type=float, default=1.0, help="N_E = 4000*scale, N_I = 1000*scale (default 1)")
    add("--r-ee", type=float, nargs="+", default=[1.0, 1.5, 2.0, 2.5, 3.0, 3.5], metavar="R")
    add("--measure", type=float, default=10.0, help="seconds measured per R_EE (10)")
    add("--initial", type=float, default=0.5, help="seconds before the measurement, pre-run (0.5)")
    add("--stimulus-r-ee", type=float, default=2.5, metavar="R", help="its network's R_EE (2.5)")
    add("--strengths", type=float, nargs="+", default=[0.0, 0.07, 0.15], metavar="S",
        help="rises of mu of the stimulated E neurons (0 0.07 0.15; 0: the control)")
    add("--trials", type=int, default=8, help="trials per strength (8)")
    add("--stimulus-clusters", type=int, default=5, metavar="N", help="clusters stimulated (5)")
    add("--period", type=float, default=2.0, help="seconds without and with the stimulus (2)")
    add("--max-rate", type=float, default=100.0, metavar="HZ", help="the guard's E rate (100)")
    add("--ncores", type=int, help=f"processes for the runs (default: all, here {os.cpu_count()})")
    add("--seed", type=int, default=1, help="random seed (1)")
    add("--target", choices=("auto", "cython", "numpy"), default="auto", help="auto: cython if can")
    add("--device", choices=("runtime", "cpp_standalone"), default="runtime",
        help="cpp_standalone: compile each experiment once into a program that every run executes")
    add("--out", default="results", help="folder of the HDF5 file and figures (results)")
    add("--no-plots", action="store_true", help="draw no figures")
    add("--replot", metavar="FILE", help="redraw figures and tables from a stored HDF5 file")
    add("--scoop", action="store_true", help="under SCOOP: python -m scoop -n N SCRIPT --scoop")
    add("--resume", action="store_true", help="continue the interrupted experiments in --out")
    add("--fail-run", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    for flag in ("scale", "r_ee", "measure", "initial", "stimulus_r_ee", "trials",
                 "stimulus_clusters", "period", "max_rate", "ncores"):
        for value in np.atleast_1d([] if getattr(args, flag) is None else getattr(args, flag)):
            if not value > 0:
                parser.error(f"--{flag.replace('_', '-')} must be positive, got {value:g}")
    n_e, size = int(PAPER["N_E"] * args.scale), PAPER["cluster_size"]
    if args.seed < 0:
        parser.error(f"--seed must be 0 or more, got {args.seed}")
    if n_e < 2 * size or int(PAPER["N_I"] * args.scale) < 2:
        parser.error(f"--scale {args.scale} is too small: need two clusters of {size}")
    for flag, values in (("--r-ee", args.r_ee), ("--stimulus-r-ee", [args.stimulus_r_ee])):
        for r in values:
            if cluster_probabilities(r, n_e, size, PAPER["p_EE"])[0] > 1:
                parser.error(f"{flag} {r} gives a within-cluster probability above 1 at this scale")
    if args.stimulus_clusters > n_e // size:
        parser.error(f"--stimulus-clusters {args.stimulus_clusters} is more than the "
                     f"{n_e // size} clusters at this scale")
    if args.replot:
        try:
            check_experiments_file(args.replot)
        except FileRefused as error:
            parser.error(f"--replot: {error}")
    if args.scoop and args.ncores is not None:
        parser.error("--ncores does not apply with --scoop; SCOOP's -n sets the workers")
    args.ncores = args.ncores or (1 if args.scoop else os.cpu_count() or 1)
    return args


def hold_lock(folder):
    """Lock the folder (an flock that forked workers inherit) or exit: one command at a time."""
    try:
        import fcntl
    except ImportError:
        return say(f"clustered_network.py: no file locks here (fcntl): run one command at a time "
                   f"in {folder}")
    handle = open(os.path.join(folder, "clustered_network.lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        sys.exit(f"clustered_network.py: error: experiments in {folder} are still running "
                 f"({handle.read().strip() or 'unknown'}); wait for them, or stop them (kill PID; "
                 f"the workers stop with it) and then --resume")
    handle.truncate(0)
    handle.write(f"pid {os.getpid()}, process group {os.getpgrp()}\n")
    handle.flush()
    return handle  # the lock lives as long as this handle stays open


# What defines an experiment's runs (not --ncores, --out), in RESUME/NAME.settings.json till done.
EXPERIMENT_SETTINGS = ("scale", "r_ee", "measure", "initial", "seed", "target", "device",
                       "stimulus_r_ee", "strengths", "trials", "stimulus_clusters", "period",
                       "max_rate")


def settings_file(resume_folder, name):
    return os.path.join(resume_folder, f"{name}.settings.json")


def save_settings(args, resume_folder, name):
    os.makedirs(resume_folder, exist_ok=True)
    path = settings_file(resume_folder, name)
    with open(path + ".partial", "w") as handle:  # then renamed: a kill leaves no half file
        json.dump({key: getattr(args, key) for key in EXPERIMENT_SETTINGS}, handle)
    os.replace(path + ".partial", path)


def saved_settings(resume_folder, name):  # None if there are none, or they cannot be read
    with contextlib.suppress(OSError, ValueError), open(settings_file(resume_folder, name)) as file:
        settings = json.load(file)
        if isinstance(settings, dict) and set(settings) == set(EXPERIMENT_SETTINGS):
            return settings
    return None


def unfinished(resume_folder, name):  # from the start of the experiment until it is done
    return (os.path.isfile(settings_file(resume_folder, name))
            or os.path.isdir(os.path.join(resume_folder, name)))


def resume_experiment(args, filename, resume_folder, name):
    """Continue the experiment ``name`` after any stop, on its device (a standalone manager's copy
    runs the program compiled then): its trajectory, or None when nothing was left to resume."""
    runs_left = prepare_resume(filename, resume_folder, name)
    if runs_left is None:
        return None
    if runs_left == 0:  # stopped in the final stores, which pypet resumes in one process only
        args = argparse.Namespace(**{**vars(args), "ncores": 1, "scoop": False})
    check_file(filename, name, ("config", "parameters", "derived_parameters", "results"))
    use_device(args.device)
    env = ForkingEnvironment(trajectory=name, **environment_options(args, filename, resume_folder))
    env.resume(trajectory_name=name, resume_folder=resume_folder)
    env.disable_logging()
    return env.trajectory


def experiment_done(traj, resume_folder, name):
    """After pypet's last store: a run that did not complete (pypet only logs it when it ran in a
    worker) fails the experiment, which stays to --resume; else nothing is left to resume."""
    failed = []
    for idx, run_name in enumerate(traj.f_get_run_names()):
        if not traj.f_get_run_information(run_name)["completed"]:
            traj.v_idx = idx
            failed.append(f"run {idx} ({explored_text(traj)})")
    if failed:
        raise RunFailed(f"{', '.join(failed)} did not complete (its error is printed above, "
                        f"unless its process was killed)")
    with contextlib.suppress(FileNotFoundError):
        os.remove(settings_file(resume_folder, name))  # first: resume files alone still resume
    remove_resume_files(resume_folder, name)


def run_experiments(args, filename, resume_folder):
    """Run the chosen experiments in turn. With --resume: continue those that were stopped (or
    never got to start) with the settings they were started with, keep those that finished."""
    chosen = [EXPERIMENTS[e] for e in ("sweep", "stimulus") if args.experiment in (e, "both")]
    if args.resume and not HAVE_DILL:
        sys.exit("clustered_network.py: error: --resume needs the package dill (pip install dill)")
    if args.resume and not any(unfinished(resume_folder, name) for name, _ in chosen):
        sys.exit(f"clustered_network.py: error: nothing to resume in {resume_folder} (the "
                 f"experiments finished, or never started with this --out)")
    if not args.resume and args.experiment == "both":  # a new file, not the old with holes
        for leftover in (filename, filename + ".checkpoint", filename + ".writing"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
    stored = []
    with contextlib.suppress(FileRefused):
        stored = list(check_experiments_file(filename)) if args.resume else []
    plans = {name: "resume" if args.resume and unfinished(resume_folder, name) else
             "keep" if name in stored else "start" for name, _ in chosen}
    for name in (name for name, plan in plans.items() if plan == "start"):
        save_settings(args, resume_folder, name)
    for name, run in chosen:
        gc.collect()  # the previous experiment's network, before this one builds its own
        if plans[name] == "keep":
            say(f"'{name}' finished before; kept as it is")
            continue
        settings = saved_settings(resume_folder, name)
        args_then, traj = argparse.Namespace(**{**vars(args), **(settings or {})}), None
        say(f"resuming '{name}'" if plans[name] == "resume" else f"experiment '{name}'")
        if plans[name] == "resume":
            traj = resume_experiment(args_then, filename, resume_folder, name)
            if traj is None and settings is None:
                sys.exit(f"clustered_network.py: error: nothing to resume in {resume_folder} for "
                         f"'{name}' (it finished, or never started with this --out)")
            if traj is None:
                say(f"'{name}' stopped before its first run was stored: starting it afresh")
        if traj is None:
            shutil.rmtree(os.path.join(resume_folder, name), ignore_errors=True)
            restore_checkpoint(filename)  # a write was cut short: the checkpoint is the good file
            if remove_from_file(filename, [f"/{name}"]):
                say(f"removed what '{name}' stored in {filename} before it was stopped"
                    if args.resume else f"replaced the earlier '{name}' in {filename}")
            traj = run(args_then, filename, resume_folder)
        experiment_done(traj, resume_folder, name)


def main(argv=None):
    args = parse_args(argv)
    # With several processes the parent's pre-built neurons are never simulated (forked workers
    # simulate their copies), which Brian2 would warn about at exit.
    BrianLogger.suppress_name("unused_brian_object")
    if args.replot:
        try:
            report(args.replot, plots=True, require_runs=True)
            return 0
        except FileRefused as error:  # passed the first check, but is no readable experiment
            print(f"clustered_network.py: error: --replot: {error}", file=sys.stderr)
            return 1
    os.makedirs(args.out, exist_ok=True)
    filename, resume_folder = os.path.join(args.out, HDF5_NAME), os.path.join(args.out, "resume")
    lock, started = hold_lock(args.out) if not args.scoop else None, time.time()
    command = ["python", sys.argv[0], "--resume", "--out", args.out, "--ncores", str(args.ncores)]
    command += ["--experiment", args.experiment] + ["--no-plots"] * args.no_plots
    try:
        with stop_cleanly_on_signals():
            run_experiments(args, filename, resume_folder)
    except RunFailed as error:
        print(f"clustered_network.py: error: {error}\nfinished runs are kept in "
              f"{os.path.abspath(filename)}; to run the others again: {shlex.join(command)}",
              file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as stop:
        signal_name, status = ("SIGINT", 130) if isinstance(stop, KeyboardInterrupt) else (
            "SIGTERM", 143)  # 128 + the signal's number
        finished = [f"'{name}' {', '.join(map(str, runs))}" for name in (SWEEP, STIMULUS)
                    if (runs := finished_runs(resume_folder, name))]
        print(f"clustered_network.py: stopped by {signal_name}; runs finished and kept in "
              f"{os.path.abspath(filename)}: {'; '.join(finished) or 'none'}\n"
              f"continue with: {shlex.join(command)}", file=sys.stderr)
        return status
    except (FileDamaged, FileRefused) as error:
        print(f"clustered_network.py: error: {error}", file=sys.stderr)
        return 1
    say(f"finished in {time.time() - started:.0f} s")
    report(filename, plots=not args.no_plots)
    if lock is not None:
        lock.close()
    return 0


if __name__ == "__main__":
    run_command(main)  # sys.exit(main()), also under SCOOP (which drops the status otherwise)
