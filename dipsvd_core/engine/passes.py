"""The passes the engine can run, as one small vocabulary that every method, scaling and allocation declares
its needs in.

A strategy says which of these it reads for given settings (`needs(settings) -> frozenset`); the plan's phases,
`Workbench.quick_build`, the sweep's prefetch, the app's "this needs ..." buttons and the refusals are derived from
those declarations (methods.needs), never listed again. Each pass records its seconds in the run's timings under
its own name, so a run can be checked against its plan.

- writing: the model writes its own calibration text (the `self` source, engine/self_text.py) when the windows
  are first drawn; a run reads it only where its calibration names `self`, not by a method's declaration.
- statistics: one streaming pass over the calibration windows: alpha and mean |x| per input group, the
  block-output spectra (stats.py).
- grams: a scaling that whitens by the input Grams factors each block inside the statistics pass, while the
  block's Grams exist (they are never stored); planned as part of the statistics phase.
- fisher: backward passes of the next-token loss, block by block (fisher.fisher_info).
- factors: every targeted matrix's full-rank factors, once per factor spec, on disk (factors.py).
- block probe / type probe (and any probe registered by allocation.probes.register_probe): the loss with one
  group of matrices (a block, a matrix type) truncated at a time on held-out windows.
- search: Bayesian optimisation of the per-block keep ratios (bayes.py).
- training: Dobi-SVD's gradient descent on truncation positions (dobi.py).
- weight update: Dobi-SVD's incremental PCA of every layer's outputs at build time (dobi.ipca_weights).
- refine: sequential compensation, one more streaming pass at build time (refine.py).
- distill: end-to-end distillation of the built model from the original (refine/distill.py), after surgery.
"""
from __future__ import annotations

from .self_text import BATCH, NEW_TOKENS

WRITING = "writing"
STATISTICS = "statistics"
GRAMS = "grams"
FISHER = "fisher"
FACTORS = "factors"
SEARCH = "search"
TRAINING = "training"
UPDATE = "weight update"
REFINE = "refine"
DISTILL = "distill"

PASSES = [WRITING, STATISTICS, GRAMS, FISHER, FACTORS, SEARCH, TRAINING, UPDATE, REFINE, DISTILL]  # in run order; probes register
# the plan's phase (and the timings key) each pass is counted in: the Gram whitening runs inside the statistics pass
PHASE = {p: p for p in PASSES} | {GRAMS: STATISTICS}
# what each pass costs, in a user's words (the app's buttons and the refusal messages)
COST = {WRITING: f"the model writes its own text (the self source, distillation's own text): groups of {BATCH} sampled "
                 f"documents of {NEW_TOKENS} tokens, once per model and seed, then read from the cache",
        STATISTICS: "one forward pass over the calibration windows, collecting each layer's input statistics",
        FISHER: "one backward pass per calibration window",
        FACTORS: "one SVD of every matrix (about a minute for the bundled model); after that every ratio is a slice",
        SEARCH: "one evaluation of the objective per call, each on a model sliced from the cached factors",
        TRAINING: "gradient steps on every matrix's truncation position (minutes on a CPU)",
        UPDATE: "one forward pass over the calibration windows with an incremental PCA of every layer's outputs",
        REFINE: "one more streaming pass at build time, refitting each block to the compressed inputs",
        DISTILL: "after the build, a forward of the original and a forward and backward of the compressed model per "
                 "calibration window and epoch, the whole model on one device"}

# how the app asks for a pass that has not run: (what it gives, the button, the job's title)
ASK = {STATISTICS: ("the calibration statistics", "Collect statistics", "Collecting statistics"),
       FACTORS: ("factors", "Factor matrices", "Factoring"),
       FISHER: ("Fisher sensitivity", "Compute Fisher sensitivity", "Computing Fisher sensitivity")}


def register_pass(name: str, cost: str, ask: tuple[str, str, str] | None = None, before: str = SEARCH) -> str:
    """Add a pass to the vocabulary (a probe registers its own: allocation.probes.register_probe): its place in the
    run order (before `before`), its plan phase (its own name), its cost in a user's words and, when the app can
    run it on its own, its (what it gives, button, job title). Returns the name, for the declaring module."""
    if name in PASSES:
        raise ValueError(f"a pass named '{name}' exists already")
    PASSES.insert(PASSES.index(before), name)
    PHASE[name], COST[name] = name, cost
    if ask is not None:
        ASK[name] = ask
    return name


def unregister_pass(name: str) -> None:
    if name in PASSES:
        PASSES.remove(name)
    for table in (PHASE, COST, ASK):
        table.pop(name, None)


def phases(needs) -> frozenset:
    """The plan phases (and timings keys) a set of needs runs."""
    return frozenset(PHASE[n] for n in needs)
