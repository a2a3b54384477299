"""Step 4d of the flow: the allocation chosen after refinement (`--allocation refined-kl`).

Refinement reverses the ranking of allocations: on the bundled model at ratio 0.3, unrefined nested is 46% worse
than the heuristic and refined it is 5% better (bench/RESULTS.md, "Refine that never hurts"). The probes and
Bayesian optimisation score unrefined models, so they rank the candidates as an unrefined build would.
`refined_kl` scores each candidate allocation (the strategies in CANDIDATES, sliced from the same factor cache)
after refine, by the KL divergence of the refined model's next-token distribution from the original's,

    KL = mean over held-out tokens t of  sum_v p(v | t) (log p(v | t) - log q(v | t)),

p the original's, q the refined model's, on `bo_windows` held-out calibration windows (drawn from every source of a
mixed calibration, data.heldout_windows), and keeps the lowest. Each candidate costs one refine pass and one
evaluation of the held-out windows; nothing is copied but the candidate's factors (surgery shares every other
tensor), and one candidate's refined weights are held at a time. The original's log-probabilities are kept on the
host in bfloat16 (windows x seqlen x vocab x 2 bytes: 200 MB for 4 x 512 of SmolLM2, 2.1 GB for 4 x 2048 of
Llama-3's 128k vocabulary).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..common.errors import DipSVDError
from ..engine.evaluate import token_kl, window_logits
from ..lowrank.surgery import compress_model
from ..refine.choices import refine_choice
from .budget import Allocation

CANDIDATES = ("uniform", "heuristic", "nested")  # what refined-kl chooses among (registered allocations)


@torch.no_grad()
def log_probs(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """The next-token log-probabilities of each window, (seqlen, vocab) on the host in bfloat16."""
    return [F.log_softmax(logits.float(), dim=-1).to("cpu", torch.bfloat16).reshape(-1, logits.shape[-1])
            for _, _, logits in window_logits(model, windows)]


@torch.no_grad()
def kl_divergence(reference: list[torch.Tensor], model, windows: torch.Tensor) -> float:
    """Mean over tokens of KL(original || model) from the original's log-probabilities `reference`."""
    total, tokens = 0.0, 0
    for ref, (_, _, logits) in zip(reference, window_logits(model, windows)):
        total += float(token_kl(ref, logits).sum())
        tokens += ref.shape[0]
    value = total / max(tokens, 1)
    if not value == value:  # NaN
        raise DipSVDError("the refined model's logits are not finite on the held-out windows; load the model in "
                          "float32")
    return value


def refined_kl(ctx, settings, candidates: dict[str, Allocation], progress=None, callback=None,
               cancel=None) -> Allocation:
    """The candidate whose refined model is closest to the original by KL on held-out windows. `callback(i, value,
    best)` after each candidate (False stops), `cancel` stops before the next; the winner carries every candidate's
    KL (`values`, in CANDIDATES' order, and `history`, the best so far) and its name in `method`."""
    windows = ctx.heldout(settings.bo_windows)
    reference = log_probs(ctx.model, windows)
    refined = settings if refine_choice(settings.refine).refits else replace(settings, refine="sequential")
    scores: dict[str, float] = {}
    for i, (name, allocation) in enumerate(candidates.items(), 1):
        if cancel is not None and cancel.is_set():
            break
        if progress:
            progress((i - 1) / len(candidates), f"refined-kl: refining the {name} allocation ({i}/{len(candidates)})")
        weights, _ = ctx.refine(refined, allocation)
        model = compress_model(ctx.model, weights)
        scores[name] = kl_divergence(reference, model, windows)
        del model, weights
        if callback is not None and callback(i, scores[name], min(scores.values())) is False:
            break
    if not scores:
        raise DipSVDError("the refined-kl search was cancelled before its first candidate")
    best = min(scores, key=scores.get)
    values = list(scores.values())
    return replace(candidates[best], method=f"refined-kl ({best})", values=values,
                   history=[min(values[:i]) for i in range(1, len(values) + 1)])
