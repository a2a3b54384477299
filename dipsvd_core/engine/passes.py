"""The passes the engine can run, as one small vocabulary that every method, scaling and allocation declares
its needs in.

A strategy says which of these it reads for given settings (`needs(settings) -> frozenset`); the plan's phases,
`Workbench.quick_build`, the sweep's prefetch, the app's "this needs ..." buttons and the refusals are derived from
those declarations (methods.needs), never listed again. Each pass records its seconds in the run's timings under
its own name, so a run can be checked against its plan.

- statistics: one streaming pass over the calibration windows: alpha and mean |x| per input group, the
  block-output spectra (stats.py).
- grams: a scaling that whitens by the input Grams factors each block inside the statistics pass, while the
  block's Grams exist (they are never stored); planned as part of the statistics phase.
- fisher: backward passes of the next-token loss, block by block (fisher.fisher_info).
- factors: every targeted matrix's full-rank factors, once per factor spec, on disk (factors.py).
- block probe / type probe: the loss with one block, or one matrix type, truncated on held-out windows.
- search: Bayesian optimisation of the per-block keep ratios (bayes.py).
- training: Dobi-SVD's gradient descent on truncation positions (dobi.py).
- weight update: Dobi-SVD's incremental PCA of every layer's outputs at build time (dobi.ipca_weights).
- refine: sequential compensation, one more streaming pass at build time (refine.py).
"""
from __future__ import annotations

STATISTICS = "statistics"
GRAMS = "grams"
FISHER = "fisher"
FACTORS = "factors"
BLOCK_PROBE = "block probe"
TYPE_PROBE = "type probe"
SEARCH = "search"
TRAINING = "training"
UPDATE = "weight update"
REFINE = "refine"

PASSES = (STATISTICS, GRAMS, FISHER, FACTORS, BLOCK_PROBE, TYPE_PROBE, SEARCH, TRAINING, UPDATE, REFINE)
# the plan's phase (and the timings key) each pass is counted in: the Gram whitening runs inside the statistics pass
PHASE = {p: p for p in PASSES} | {GRAMS: STATISTICS}
# what each pass costs, in a user's words (the app's buttons and the refusal messages)
COST = {STATISTICS: "one forward pass over the calibration windows, collecting each layer's input statistics",
        FISHER: "one backward pass per calibration window",
        FACTORS: "one SVD of every matrix (about a minute for the bundled model); after that every ratio is a slice",
        BLOCK_PROBE: "one forward pass over the held-out windows with each block alone truncated",
        TYPE_PROBE: "one forward pass over the held-out windows with all matrices of one type truncated",
        SEARCH: "one evaluation of the objective per call, each on a model sliced from the cached factors",
        TRAINING: "gradient steps on every matrix's truncation position (minutes on a CPU)",
        UPDATE: "one forward pass over the calibration windows with an incremental PCA of every layer's outputs",
        REFINE: "one more streaming pass at build time, refitting each block to the compressed inputs"}

# how the app asks for a pass that has not run: (what it gives, the button, the job's title)
ASK = {STATISTICS: ("the calibration statistics", "Collect statistics", "Collecting statistics"),
       FACTORS: ("factors", "Factor matrices", "Factoring"),
       FISHER: ("Fisher sensitivity", "Compute Fisher sensitivity", "Computing Fisher sensitivity"),
       BLOCK_PROBE: ("a calibration of its estimate by probing every block once", "Probe the blocks",
                     "Probing the blocks"),
       TYPE_PROBE: ("a calibration of its estimate by probing every matrix type once", "Probe the matrix types",
                    "Probing the matrix types")}


def phases(needs) -> frozenset:
    """The plan phases (and timings keys) a set of needs runs."""
    return frozenset(PHASE[n] for n in needs)
