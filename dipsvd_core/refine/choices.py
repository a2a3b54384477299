"""The choices of refine, each declared once: the refine choices (none, sequential, block), what dense matrices
are compensated, the block tuning's settings (TuneConfig, with its learning-rate schedule), end-to-end
distillation's (DistillConfig) and the closed form's
constants (damping, the held-out dampings, the residual target)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..common.errors import DipSVDError
from ..common.knobs import Widget, knob
from ..common.options import register_options


@dataclass(frozen=True)
class RefineChoice:
    """A `--refine` choice: whether a build runs the refine pass, and whether that pass also tunes each block."""

    name: str
    refits: bool
    tunes: bool
    help: str


REFINE_CHOICES = {c.name: c for c in (
    RefineChoice("none", False, False, "the factors as the allocation slices them"),
    RefineChoice("sequential", True, False, "each block refitted in closed form to the compressed inputs, where "
                                            "that lowers the held-out error"),
    RefineChoice("block", True, True, "sequential, then each block trained as AA-SVD's second stage (AdamW on "
                                      "every parameter of the block) where that pays"))}
REFINES = tuple(REFINE_CHOICES)


def refine_choice(name: str) -> RefineChoice:
    if name not in REFINE_CHOICES:
        raise DipSVDError(f"unknown refine '{name}'; use one of {', '.join(REFINES)}")
    return REFINE_CHOICES[name]
@dataclass(frozen=True)
class Compensation:
    """A `--compensate` choice: which dense-kept matrices of a block refine refits in closed form to the drifted
    inputs the compressed blocks before it produce (same target and held-out choice as a factored matrix's, no
    truncation, so no parameter is added); `picks(walk, name)` says whether a dense matrix is one of them."""

    name: str
    picks: object
    help: str


# "auto" compensates the outputs up to this fraction removed and nothing above: on the quality panel (bench/RESULTS.md,
# "Quality panel") `outputs` lowered every panel text at 0.2 and 0.3 and raised every one at 0.4
AUTO_UP_TO = 0.3
AUTO = "auto"
COMPENSATIONS = {c.name: c for c in (
    Compensation(AUTO, None, f"outputs up to {AUTO_UP_TO:g} removed, none above (measured: outputs helped up to "
                             f"there and hurt at 0.4)"),
    Compensation("none", lambda walk, n: False, "dense matrices stay the original's"),
    Compensation("outputs", lambda walk, n: walk.solo(n), "the dense matrices that alone read their input (o_proj "
                                                          "and down_proj in Llama): they write the residual stream"),
    Compensation("all", lambda walk, n: True, "every dense matrix (measured at 0.2-0.3: lower perplexity than "
                                              "outputs on every text, more repetitive greedy text)"))}


def compensation(name: str) -> Compensation:
    """The Compensation that picks the matrices for `name`; "auto" must first be resolved by compensation_for."""
    if name not in COMPENSATIONS or COMPENSATIONS[name].picks is None:
        raise ValueError(f"compensate '{name}': name one that picks matrices (resolve 'auto' with "
                         "choices.compensation_for)")
    return COMPENSATIONS[name]


def compensation_for(name: str, ratio: float) -> str:
    """The compensation a build at `ratio` removed runs: `name`, or for "auto" outputs up to AUTO_UP_TO, else none."""
    if name != AUTO:
        return name
    return "outputs" if ratio <= AUTO_UP_TO + 1e-9 else "none"


# What a block's output error is, in block tuning's loss and the block check after it. The residual stream of many
# models holds a few massive activations on the first token of a window (SmolLM2-135M: |h| up to 29,000 from block 11
# on, 96-99% of the hidden states' squared norm), so the absolute error is mostly that one token's. Measured on the
# quality panel all the same (bench/RESULTS.md, "Quality panel"), tuning by the relative error was 0.7-3.9% worse on
# every text at 0.2 than by the absolute one: absolute, AA-SVD's, is the default.
BLOCK_ERRORS = {
    "absolute": "the squared distance from the original block's output, summed over tokens (AA-SVD's mean squared "
                "error)",
    "relative": "each token's squared distance over the original output's squared norm at that token, so a token "
                "with massive activations weighs as much as any other",
}


@dataclass(frozen=True)
class AdamWSchedule:
    """The optimiser's settings that block tuning and distillation share (AA-SVD's values as defaults): AdamW's peak
    learning rate and weight decay, a linear warm-up then cosine decay (lr_scale), gradient clipping. Each owner's
    flags are --<its name>-lr and so on (common/options.flag_of)."""

    lr: float = knob(1e-4, "AdamW's peak learning rate", widget=Widget("Peak learning rate", 1e-7, 1e-2, 1e-5, "%.6f"))
    weight_decay: float = knob(0.01, "AdamW's weight decay", widget=Widget("Weight decay", 0.0, 1.0, 0.01))
    warmup: float = knob(0.1, "share of the steps that warm up linearly (then cosine decay to 0)",
                         widget=Widget("Warm-up share", 0.0, 0.9, 0.05))
    clip: float = knob(1.0, "the gradients' norm is clipped to this (0: no clipping)",
                       widget=Widget("Gradient clip", 0.0, 100.0, 0.5))

    def schedule_ok(self) -> bool:
        return self.lr > 0 and self.weight_decay >= 0 and 0 <= self.warmup < 1 and self.clip >= 0


@dataclass(frozen=True)
class TuneConfig(AdamWSchedule):
    """Block tuning (refine "block"), the second stage of AA-SVD (arXiv 2604.02119) with its settings as defaults:
    AdamW, a linear warm-up then cosine decay, gradient clipping, float32 master weights."""

    epochs: int = knob(25, "block tuning: epochs over the fit windows", "--tune-epochs", "positive",
                       widget=Widget("Tuning epochs", 1, 100, 1))
    error: str = knob("absolute", "block tuning minimises, and the block check that follows it scores: "
                      + "; ".join(f"{k}: {v}" for k, v in BLOCK_ERRORS.items()), "--tune-error",
                      choices=lambda: tuple(BLOCK_ERRORS), widget=Widget("Error"))
    scope: str = knob("block", "block tuning trains: factors (the low-rank factors), or block (every parameter of "
                               "the block: factors, dense matrices, norms; an offloaded block its factors and norms)",
                      "--tune-scope", choices=lambda: TUNE_SCOPES, widget=Widget("Trains"))

    def check(self) -> "TuneConfig":
        if self.error not in BLOCK_ERRORS:
            raise DipSVDError(f"unknown tune error '{self.error}'; use one of {', '.join(BLOCK_ERRORS)}")
        if self.scope not in TUNE_SCOPES:
            raise DipSVDError(f"unknown tune scope '{self.scope}'; use one of {', '.join(TUNE_SCOPES)}")
        if not (self.epochs >= 1 and self.schedule_ok()):
            raise DipSVDError("block tuning needs epochs >= 1, lr > 0, weight_decay >= 0, 0 <= warmup < 1 and "
                              f"clip >= 0 (got {self.epochs}, {self.lr}, {self.weight_decay}, {self.warmup}, "
                              f"{self.clip})")
        return self


TUNE_SCOPES = ("factors", "block")
register_options("tune", TuneConfig, "block tuning (--refine block)", "changes rebuild")


@dataclass(frozen=True)
class DistillScope:
    """A `--distill-scope` choice: what distillation trains beside every norm (refine/distill.trainable); the plan
    counts their optimizer state."""

    help: str
    trains: str  # in a summary's words: "distilled 4 epochs (<trains>)"
    factors: bool  # the low-rank factors
    dense: bool = False  # the decoder blocks' matrices the allocation kept dense, each a copy of the original's


DISTILL_SCOPES = {
    "factors": DistillScope("the low-rank factors and every norm (their gradients, AdamW's moments and the best "
                            "epoch's copy are 4x the factors' bytes in float32, 11x in bfloat16: the plan gives "
                            "145 GiB for Llama-3-8B, more than an 80 GB card)", "the factors and norms", factors=True),
    "norms": DistillScope("every norm alone (thousands of parameters: the original and the compressed model on the "
                          "device, and one window's autograd; the plan gives 30 GiB for Llama-3-8B at 512 tokens, 52 "
                          "GiB at 2048, and 27 and 33 GiB with recompute)", "the norms", factors=False),
    "blocks": DistillScope("every parameter of the decoder blocks: the factors, the matrices kept dense (copied from "
                           "the original first) and every norm; on the bundled model 1-7% lower perplexity than "
                           "factors, for 10-36% more time; the plan gives 155 GiB for Llama-3-8B",
                           "every parameter of the blocks", factors=True, dense=True),
}


@dataclass(frozen=True)
class DistillConfig(AdamWSchedule):
    """End-to-end distillation after the build (refine/distill.py): the compressed model's low-rank factors and norms
    trained to give the original's next-token distribution (KL) on the calibration windows and `own_text` windows of
    text the original writes itself, AdamW with block tuning's schedule, the best epoch by the KL on held-out
    calibration windows kept (the build itself, epoch 0, included). Off (0 epochs) by default; measured on the
    bundled model in bench/RESULTS.md ("End-to-end distillation")."""

    epochs: int = knob(0, "distillation: epochs over the calibration windows (and the model's own text) after the "
                       "build (0: off); each costs about four whole-model forwards a window", "--distill-epochs", "int",
                       widget=Widget("Distillation epochs", 0, 50, 1))
    held: int = knob(4, "distillation: held-out calibration windows whose KL picks the epoch kept", "--distill-held",
                     "positive", widget=Widget("Held-out windows", 1, 64, 1))
    scope: str = knob("factors", "distillation trains: " + "; ".join(f"{k}: {s.help}" for k, s in
                                                                      DISTILL_SCOPES.items()),
                      "--distill-scope", choices=lambda: tuple(DISTILL_SCOPES), widget=Widget("Trains"))
    own_text: int = knob(0, "distillation: windows of text the original writes itself (sampled from prompts of the "
                         "calibration halves, a stream apart from the `self` source's) trained on beside the calibration "
                         "windows; written once per model and seed, then read from the cache", "--distill-own-text",
                         "int", widget=Widget("Windows of the model's own text", 0, 1024, 16))
    recompute: bool = knob(False, "distillation keeps only each block's input for the backward and recomputes the "
                           "rest there (gradient checkpointing): one block's activations on the device instead of "
                           "every block's, for about a quarter more time", "--distill-recompute",
                           widget=Widget("Recompute activations in the backward"))

    def check(self) -> "DistillConfig":
        if self.scope not in DISTILL_SCOPES:
            raise DipSVDError(f"unknown distill scope '{self.scope}'; use one of {', '.join(DISTILL_SCOPES)}")
        if not (self.epochs >= 0 and self.schedule_ok() and self.held >= 1 and self.own_text >= 0):
            raise DipSVDError("distillation needs epochs >= 0, lr > 0, weight_decay >= 0, 0 <= warmup < 1, clip >= 0, "
                              f"held >= 1 and own text >= 0 (got {self.epochs}, {self.lr}, {self.weight_decay}, "
                              f"{self.warmup}, {self.clip}, {self.held}, {self.own_text})")
        return self


register_options("distill", DistillConfig, "end-to-end distillation after the build (--distill-epochs)",
                 "changes rebuild")


def lr_scale(step: int, total: int, warmup: float) -> float:
    """The learning rate's multiple at `step` of `total`: linear warm-up over the first `warmup` share of the steps
    (at least one), then cosine decay to 0."""
    warm = max(1, round(total * warmup))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


DAMP = 0.01  # delta = DAMP x mean eigenvalue of G^ in the plain least-squares target (GPTQ's percdamp)
TAUS = (0.01, 0.1, 1.0, 10.0)  # the candidate dampings (ridge towards the unrefined factors) held-out windows choose
RESIDUAL = True  # the block's last Linear also takes back the residual stream's drift


CHOL_MARGIN = 100.0  # Cholesky when delta >= this x (the eigenvalue floor's bound): the floor cannot matter
FULL = -1  # the "rank" of a dense matrix that refine refits (compensation) without truncating it
