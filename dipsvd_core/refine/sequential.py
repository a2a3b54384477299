"""Sequential compensation: each block compressed against what the compressed blocks before it feed it.

Every factor method truncates W against the ORIGINAL model's inputs X: its ranks are chosen as if
block l saw the activations of an uncompressed model. After blocks 0..l-1 are compressed, block l
really sees X^, and the error compounds from block to block. `refine` (as in SAES-SVD, and in the
spirit of GPTQ's sequential quantization) takes the allocation's ranks and replaces each factored
matrix by the rank-k matrix closest to the original output on those inputs:

    min over rank(W') <= k  of  ||W X - W' X^||_F^2,

where X (in x tokens) are the inputs of W in the original model and X^ those in the model whose
earlier blocks are already compressed. With the Gram G^ = X^ X^^T and the cross-Gram C = X X^^T:

1. Least-squares target. The unconstrained minimiser solves W' G^ = W C, so W* = W C G^^{-1}. In
   practice G^ is damped, W* = W C (G^ + delta I)^{-1} with delta = 0.01 x its mean eigenvalue (as
   GPTQ damps its Hessian): undamped, the target fits the calibration windows and loses on held-out
   text (measured in bench/RESULTS.md).
   The residual W X - W* X^ is orthogonal to the rows of X^ (normal equations), so for ANY W'
       ||W X - W' X^||^2 = ||W X - W* X^||^2 + ||(W* - W') X^||^2
   (Pythagoras): the first term does not depend on W', and what is left is a whitened truncation.
2. Whitened truncation. ||(W* - W') X^||^2 = ||(W* - W') S||^2 for any S with S S^T = G^, and the best
   rank-k W' is U_k Sigma_k V_k^T S^{-1} from the SVD of W* S (Eckart-Young): the very step every
   factor method already takes, with G^ in place of G. G^^{-1} and S use the same eigenvalue floor.
3. Channel weighting still applies: dipsvd whitens with D G^ D (D from the channel importance of G^,
   with its weight and bar), asvd and fwsvd with their diagonal scales, so step 2 minimises the
   method's own weighted error of W* - W' while step 1 has already absorbed what X^ lost.

4. The residual stream. In a pre-norm block (Llama, Mistral, Qwen2) the block's last Linear writes
   straight into the residual stream: output = r + down_proj(x). The compressed path's residual r^
   has drifted from the original r, and no later matrix of the block can correct that drift. So the
   last Linear's target is the original output plus the drift: Y = W X + (R - R^), giving
   W* = (W C + (R - R^) X^^T) (G^ + delta I)^{-1}, and the block output, not only the matrix output,
   is brought back to the original's (in the spirit of SAES-SVD's alignment with the original model's
   outputs). The last Linear is found by running one window and checking that nothing with weights
   runs after it; otherwise (post-norms, as in Gemma) the plain target is used. Since the original
   block's output is B = R + W X, the numerator is one product, W C + (R - R^) X^^T = (B - R^) X^^T:
   hidden x in per token instead of C's in x in plus the drift's hidden x in (3.7x fewer for
   SmolLM2's down_proj), and the original X of that Linear is not kept at all.

5. Never worse on text it did not fit. The closed form fits the calibration windows it sees; with few of them
   it fits their noise and the refined model can be worse than the unrefined one (bench/RESULTS.md, issue 25).
   So every HOLDOUT-th window (held_windows) is held out: it still flows through both paths, but only the
   other windows' sums G^, C (or the numerator) fit. Each matrix's contenders, all fitted on the fit windows,
   are scored by their output error on the held-out windows, computed from the held-out sums alone
   (||Y - W' X^||^2 = ||Y||^2 - 2 tr(W' T^T) + tr(W' G^ W'^T), T = W C or the numerator, GroupStats.held_error):
   - the unrefined factors (W truncated against the original inputs' Gram of the fit windows);
   - the refined ones at each damping tau in TAUS, as ridge regression towards those unrefined factors W0,
         W*_tau = (W C + delta W0) (G^ + delta I)^{-1},  delta = tau x the mean eigenvalue of G^,
     which runs from the plain least squares (tau -> 0) back to W0 itself (tau -> infinity).
   The winner is refitted on every window (the unrefined one is the factor pass's own). Then the block as a
   whole: the block with every matrix at its fit-window winner against the block with the fit-window unrefined
   factors, on the held-out windows, each against the original block's output (Contest); where the refined
   block is not closer, the block ships its unrefined factors, and the next block sees their outputs. With
   refine "block", a third contender is the refined block trained by AdamW on its parameters (TuneConfig)
   (the second stage of AA-SVD, arXiv 2604.02119), kept only where it wins there too.

The pass streams like the statistics pass (stream.py), with two sets of activations: the original
path and the compressed one. For block l it runs the original block once, keeping every input
group's X; then, group by group in the order the block calls them (q/k/v, o, gate/up, down), it runs
the block on the compressed path with the groups before already refined, stopping at the group, to
take X^ (so o_proj and down_proj are fitted to the inputs they will really see), and refines the
group's factored matrices; finally the refined block's outputs on the compressed path become block
l+1's inputs (one more run, with the attention replayed; keeping the last Linear's X^ to skip it would hold
windows x seqlen x intermediate). On the compressed path a refined
matrix runs as its two factors in place of the Linear's own forward (the dense product is not
computed), and a child of the block that has finished with all its matrices refined (the attention,
once o_proj is) is replayed from its kept outputs instead of being run again for the later groups.
Dense-kept matrices stay the original's. Refining is a build step: the allocation (ranks) comes from
the fast factor-once path.

The code keeps the pass's jobs apart, as GPTQ keeps `add_batch` apart from `fasterquant`, one module each:
choices (the refine choices, compensation, TuneConfig and the constants), closed_form (`GroupStats` gathers,
window by window, what one input group's closed form needs; `choose` solves a group: steps 1 to 3 and the
held-out choice), walk (`BlockWalk` walks one block on both paths: the original run that takes every X, the
compressed runs that stop at a group, the replayed children, the refined forwards put in place) and contest
(step 5 at the block level, with the tuned contender). `refine`, here, strings them together block by block.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..common import cores
from ..common.errors import DipSVDError
from ..engine.data import DEFAULT_SEQLEN, DEFAULT_WINDOWS, HOLDOUT, is_held
from ..engine.stream import BlockInputs, capture_inputs, release_host_memory
from ..lowrank.factors import FactorSpec
from ..model.blocks import find_blocks
from ..model.offload import block_on_device
from .choices import DAMP, FULL, RESIDUAL, TAUS, Compensation, TuneConfig, compensation
from .closed_form import choose
from .contest import keep_or_revert
from .walk import BlockWalk, Park


def held_windows(n: int, every: int = None) -> frozenset:
    """The held-out windows of n: every HOLDOUT-th (the last of each run of HOLDOUT), at least one and never
    all; refine validates on them and fits on the rest."""
    every = every or HOLDOUT
    if n < 2:
        raise DipSVDError(f"refine fits on part of the calibration windows and checks the result on the rest, so "
                          f"it needs at least 2 windows (given {n}); raise --calib-windows")
    return frozenset(i for i in range(n) if is_held(i, every)) or frozenset({n - 1})


def _block_ranks(walk: "BlockWalk", ranks: dict, compensate: Compensation, residual: bool) -> tuple[dict, str | None,
                                                                                                     list[str]]:
    """This block's ranks with the dense matrices `compensate` picks marked FULL, and its residual-writing Linear
    (a compensated dense one included); runs the original block (run_original), which groups the inputs."""
    dense = [n for n in walk.linears if ranks.get(n) is None]
    trial = {**ranks, **dict.fromkeys(dense, FULL)} if compensate.name != "none" else ranks
    last = walk.residual_writer(trial) if residual else None
    leaders = walk.run_original(last)
    marked = {**ranks, **{n: FULL for n in dense if compensate.picks(walk, n)}}
    return marked, (last if last is None or marked.get(last) is not None else None), leaders


def _as_parameters(out: dict) -> dict:
    """refine's result as compress_model takes it: a pair per factored matrix, a compensated dense matrix (u, None)
    as its weight's path and value, and a tuned parameter (already a path) as it is."""
    result = {}
    for n, w in out.items():
        if isinstance(w, tuple) and w[1] is None:
            result[f"{n}.weight"] = w[0]
        else:
            result[n] = w
    return result


@torch.no_grad()
def refine(model: nn.Module, names: list[str], windows: torch.Tensor, spec: FactorSpec, ranks: dict[str, int | None],
           abs_means: dict | None = None, fisher_rows: dict | None = None, progress=None,
           damp: float = DAMP, residual: bool = RESIDUAL, fallback: dict | None = None,
           taus: tuple = TAUS, tune: TuneConfig | None = None, compensate: str = "none") -> tuple[dict, dict]:
    """Refined (u, v) of every matrix that `ranks` factors, from one streaming pass over `windows`.
    Returns (weights, info) with info: seconds, the number of eigenvalues of G^ floored, and with `fallback`
    the held-out windows and, per block, what was refined and its held-out gain (`blocks`).

    Within a block the input groups are refined in the order the block calls them (q/k/v, o, gate/up,
    down for Llama): the compressed-path inputs of a group are taken with the groups before it already
    refined, since those are the inputs it will see in the compressed model. Each group's inputs are
    taken by a forward that stops at that group. `compensate` (COMPENSATIONS) also refits dense-kept matrices,
    which then come back as their weight's path and value (compress_model takes both).

    `fallback`: the unrefined (u, v) of every factored matrix. With it, refine never makes a block worse on
    text it did not fit: it fits on the calibration windows but the held-out ones (held_windows), chooses each
    matrix's damping among `taus` (ridge towards its unrefined factors) or the unrefined factors themselves by
    the held-out output error, and keeps a block unrefined where its refined output is not closer to the
    original block's on the held-out windows. With `tune` (a TuneConfig) as well, each block also tries the
    block-level training (Contest.tune) and keeps it where it wins there. Without `fallback`, every window is
    fitted at the one damping `damp` towards zero (the plain closed form)."""
    t0 = time.perf_counter()
    prefix, blocks = find_blocks(model)
    wanted, comp = set(names), compensation(compensate)
    compute = torch.float64 if spec.compute == "float64" else torch.float32
    held = held_windows(len(windows)) if fallback is not None else frozenset()
    taus = tuple(taus) if fallback is not None else (damp,)
    orig = capture_inputs(model, blocks, windows)
    park = Park(orig.hidden[0].device)
    orig.hidden = [park.put(h) for h in orig.hidden]
    hat = BlockInputs(list(orig.hidden), orig.kwargs)  # identical until block 0 is compressed
    out, floored, report = {}, 0, []
    n_blocks = len(blocks)
    for b, block in enumerate(blocks):
        cores.share()  # each block its share of the cores as the machine's compute jobs are now
        with block_on_device(block):  # sent once for the block's every pass over the windows
            walk = BlockWalk(block, f"{prefix}.{b}" if prefix else str(b), wanted, orig, hat, park, held or None)
            block_ranks, last, leaders = _block_ranks(walk, ranks, comp, residual)
            chosen: dict[str, tuple] = {}
            try:
                for j, leader in enumerate(leaders):
                    members = [n for n in walk.linears
                               if walk.group_of.get(n) == leader and block_ranks.get(n) is not None]
                    if members:
                        stats = walk.compressed_inputs(leader, leader == last, held)
                        picks, k = choose(stats, leader, {n: walk.linears[n] for n in members}, spec, block_ranks,
                                           compute, taus, fallback, abs_means, fisher_rows)
                        floored += k
                        for n in members:
                            installed = walk.install(n, *picks[n]["final"])
                            if block_ranks[n] != FULL or picks[n]["tau"] is not None:  # a dense one kept as is: not new
                                out[n] = installed
                            chosen[n] = picks[n]
                        del picks, stats
                    walk.taken.pop(leader, None)
                    if progress:
                        progress((b + (j + 1) / (len(leaders) + 1)) / n_blocks,
                                 f"block {b + 1}/{n_blocks}: refining {leader.rsplit('.', 1)[-1]}")
                inputs = list(hat.hidden)
                walk.advance()
                if held and chosen:
                    report.append(keep_or_revert(walk, b, chosen, inputs, held, fallback, out, tune))
            finally:
                walk.restore()  # also when a group fails: the model is left as it came
        release_host_memory()
    if progress:
        progress(1.0, f"block {n_blocks}/{n_blocks}: refined")
    info = {"seconds": time.perf_counter() - t0, "floored": floored, "compensate": compensate}
    if held:
        info.update(held_windows=sorted(held), fit_windows=len(windows) - len(held), taus=list(taus), blocks=report)
    return _as_parameters(out), info


def summary(info: dict) -> str:
    """The refine report in one line: how many blocks were refined, their held-out gain, which kept unrefined."""
    blocks = info.get("blocks")
    if not blocks:
        return f"refined every factored matrix ({info['seconds']:.1f} s)"
    kept = [r for r in blocks if r["refined"]]
    gains = sorted(r["gain"] for r in kept)
    median = gains[len(gains) // 2] if gains else 0.0
    back = [str(r["block"]) for r in blocks if not r["refined"]]
    tuned = sum(r.get("choice") == "tuned" for r in blocks)
    dense = sum(m.get("dense", False) and m["tau"] is not None for r in kept for m in r["matrices"].values())
    return (f"refined {len(kept)} of {len(blocks)} blocks" + (f", {tuned} of them tuned" if tuned else "")
            + (f", {dense} dense matrices refitted" if dense else "")
            + f" (median held-out gain {100 * median:+.0f}%: block-output error that much below unrefined, "
            f"{len(info['held_windows'])} of {len(info['held_windows']) + info['fit_windows']} windows "
            f"held out)" + (f"; kept unrefined: blocks {', '.join(back)}" if back else "")
            + f" ({info['seconds']:.1f} s)")


def refine_table(info: dict) -> list[dict]:
    """The per-block report as rows for a table: block, refined or kept unrefined, its held-out gain, and per
    matrix type its damping (or "unrefined") and gain."""
    rows = []
    for b in info.get("blocks", []):
        row = {"block": b["block"], "refined": "yes" if b["refined"] else "kept unrefined",
               "block gain": f"{100 * b['gain']:+.1f}%"}
        for name, m in b["matrices"].items():
            short = name.rsplit(".", 1)[-1]
            kept = "dense, as it was" if m.get("dense") else "unrefined"
            row[short] = kept if m["tau"] is None else (("dense, refitted " if m.get("dense") else "")
                                                        + f"{100 * m['gain']:+.0f}% (damping {m['tau']:g})")
        rows.append(row)
    return rows


ADVISED_CALIBRATION = (DEFAULT_WINDOWS, DEFAULT_SEQLEN)  # windows x tokens from which refine is measured to pay
SCALED_PASSES = ("statistics", "fisher", "refine")  # the passes whose time grows with the calibration tokens
CACHED_BELOW_S = 0.5  # a pass under this was read from the cache, or too small to scale from: not timed


def calibration_advice(windows: int, seqlen: int, timings: dict | None = None) -> str | None:
    """What the app says when the calibration is small for a refined build (None when it is not): what refine
    fits on, and what the advised calibration would cost, from the passes' seconds measured at this size."""
    tokens, (w, t) = windows * seqlen, ADVISED_CALIBRATION
    if tokens >= w * t:
        return None
    factor = w * t / tokens
    held = len(held_windows(windows)) if windows >= 2 else 0
    return (f"The calibration ({windows} x {seqlen} = {tokens:,} tokens) is small for a refined build: refine fits on "
            f"{windows - held} windows and checks each block on {held} held out, and at this size it keeps fewer "
            f"blocks refined and gains less than at {w} x {t} (measured on the bundled model). Loading "
            f"{w} windows of {t} tokens (Model and data page) multiplies the time of the statistics, Fisher and "
            f"refine passes by about {factor:.0f}{_scaled_cost(timings or {}, factor)}.")


def _scaled_cost(timings: dict, factor: float) -> str:
    """calibration_advice's cost at the advised size, from the passes timed here (those under CACHED_BELOW_S were
    read from the cache or too small to scale from: said so, never counted as 0 s)."""
    timed = {k: timings[k] for k in SCALED_PASSES if k in timings}
    measured = {k: v for k, v in timed.items() if v >= CACHED_BELOW_S}
    cached = [k for k in timed if k not in measured]
    from_cache = f"{', '.join(cached)} under {CACHED_BELOW_S:g} s here: read from the cache or too small to time" \
        if cached else ""
    if not measured:
        return f" ({from_cache})" if from_cache else ""
    total = sum(measured.values())
    return (f": about {total * factor:.0f} s for {', '.join(measured)}, timed here at {total:.0f} s"
            + (f" ({from_cache})" if from_cache else ""))
