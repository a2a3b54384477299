"""The block-level check of refine (step 5): each contender block, the unrefined, the refined and, with refine
"block", the tuned one (AdamW on the block's parameters, the second stage of AA-SVD, arXiv 2604.02119), scored
against the original block's output on the held-out windows; the block keeps the best or reverts."""
from __future__ import annotations

import torch
from torch import nn

from ..model.offload import offloads, weights_of
from .choices import TuneConfig, lr_scale
from .walk import BlockWalk, Park, block_out, low_rank, replace_forward


def token_errors(out: torch.Tensor, ref: torch.Tensor, error: str) -> torch.Tensor:
    """Each token's error of a block's output `out` against the original's `ref` (choices.BLOCK_ERRORS): the mean
    squared distance over the hidden size, or with "relative" that over the original output's mean square at the
    token. In out's dtype, so it also serves as block tuning's loss (its mean)."""
    sq = (out - ref.to(out.dtype)).pow(2).mean(-1)
    if error == "relative":
        sq = sq / ref.to(out.dtype).pow(2).mean(-1).clamp_min(torch.finfo(out.dtype).tiny)
    return sq


def _held_error(reference: list, outputs: dict, held, park: Park, error: str = "absolute") -> float:
    """The held-out windows' error, summed over their tokens (absolute: their summed squared distance)."""
    total = 0.0
    for i in held:
        out = park.get(outputs[i]).double()
        total += float(token_errors(out, park.get(reference[i]), error).sum()) * out.shape[-1]
    return total


class Contest:
    """The block-level check, on the held-out windows and from the same compressed-path inputs (`inputs`): each
    contender is the block with every factored matrix as one of the picks (`chosen`, from choose), against the
    original block's output. The contenders are fitted on the fit windows alone; the winner is what the block
    ships (the closed-form ones refitted on every window)."""

    def __init__(self, walk: BlockWalk, chosen: dict, inputs: list, held, error: str = "absolute"):
        self.walk, self.chosen, self.inputs, self.held, self.kind = walk, chosen, inputs, held, error
        self.fit = [i for i in range(walk.n_win) if i not in held]

    def _put(self, weights: dict) -> None:
        self.walk.restore()
        self.walk.swaps, self.walk.replayed = [], set()
        for n, (u, v) in weights.items():
            self.walk.install(n, u, v)

    def _forward(self, i: int, extra: dict | None = None) -> torch.Tensor:
        """Window i through the block as installed, with the parameters in `extra` (block-local name -> tensor, in
        any dtype) in place of the block's own."""
        walk = self.walk
        args, kwargs = (walk.park.get(self.inputs[i]),), walk.hat.kwargs[i]
        if not extra:
            return block_out(walk.block(*args, **kwargs))
        own = dict(walk.block.named_parameters())
        swapped = {k: t.to(own[k].dtype) for k, t in extra.items()}
        return block_out(torch.func.functional_call(walk.block, swapped, args, kwargs, strict=False))

    def run(self, weights: dict, windows, extra: dict | None = None) -> dict:
        self._put(weights)
        return {i: self.walk.park.put(self._forward(i, extra)) for i in windows}

    def error(self, weights: dict, extra: dict | None = None) -> float:
        return _held_error(self.walk.orig.hidden, self.run(weights, self.held, extra), self.held, self.walk.park,
                           self.kind)

    def picks(self, which: str) -> dict:
        return {n: p[which] for n, p in self.chosen.items()}

    def _masters(self, start: dict, scope: str) -> tuple[dict, dict]:
        """float32 master copies of what block tuning trains: every pick's (u, v) (v None for a dense refit), put in
        place on the compressed path; with scope "block", also every other parameter of the block (its dense
        matrices, biases and norms) by block-local name, of an offloaded block its norms alone."""
        walk = self.walk
        walk.restore()
        walk.swaps, walk.replayed = [], set()
        pairs = {}
        for n, (u, v) in start.items():
            with weights_of(walk.linears[n]):
                dev = walk.linears[n].weight.device
                bias = None if walk.linears[n].bias is None else walk.linears[n].bias.detach()
            pairs[n] = tuple(None if t is None else nn.Parameter(t.detach().to(dev, torch.float32).clone())
                             for t in (u, v))
            walk.swaps.append(replace_forward(walk.linears[n], low_rank(*pairs[n], bias)))
        extra = {}
        if scope == "block":
            skip = {f"{n[len(walk.base) + 1:]}.{k}" for n in start for k in ("weight", "bias")}
            if offloads(walk.block):  # its dense matrices stay: tuned, they would be held on the device after
                skip |= {f"{m}.{k}" for m, mod in walk.block.named_modules() if isinstance(mod, nn.Linear)
                         for k, _ in mod.named_parameters()}
            extra = {k: nn.Parameter(t.detach().float().clone()) for k, t in walk.block.named_parameters()
                     if k not in skip}
        return pairs, extra

    def tune(self, start: dict, windows: list, cfg: "TuneConfig") -> tuple[dict, dict]:
        """Block-level training (the second stage of AA-SVD, arXiv 2604.02119) from `start`: AdamW with a warm-up
        and cosine decay, gradients clipped, over `windows` (shuffled each epoch, seeded) for cfg.epochs; the loss
        is the mean over tokens of the block's output error on the compressed-path inputs against the original
        block's output (token_errors, by cfg.error; "absolute" is AA-SVD's squared distance). Returns the tuned
        pairs (float32) and, with scope "block", the block's other tuned parameters by block-local name."""
        pairs, extra = self._masters(start, cfg.scope)
        params = [t for uv in pairs.values() for t in uv if t is not None] + list(extra.values())
        frozen = [p for p in self.walk.block.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        order, total, step = torch.Generator().manual_seed(0), cfg.epochs * len(windows), 0
        try:
            with torch.enable_grad():
                for _ in range(cfg.epochs):
                    for k in torch.randperm(len(windows), generator=order).tolist():
                        for group in opt.param_groups:
                            group["lr"] = cfg.lr * lr_scale(step, total, cfg.warmup)
                        out = self._forward(windows[k], extra).float()
                        ref = self.walk.park.get(self.walk.orig.hidden[windows[k]])
                        loss = token_errors(out, ref, cfg.error).mean()
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        if cfg.clip > 0:
                            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                        opt.step()
                        step += 1
        finally:
            for p in frozen:
                p.requires_grad_(True)
        tuned = {n: tuple(None if t is None else t.detach() for t in uv) for n, uv in pairs.items()}
        return tuned, {k: t.detach() for k, t in extra.items()}


def keep_or_revert(walk: BlockWalk, b: int, chosen: dict, inputs: list, held, fallback: dict, out: dict,
                    tune: TuneConfig | None = None) -> dict:
    """The block-level check (Contest): the refined block against the unrefined one (and, with `tune`, the
    refined one trained by Contest.tune on the fit windows), all fitted on the fit windows and scored on the
    held-out ones. Where the refined block is not the closest to the original, the block ships the winner: its
    unrefined factors (`fallback`; a compensated dense matrix goes back to the original's), or the tuned block as
    trained on the fit windows (what the held-out windows scored), whose outputs give the next block its inputs
    (walk.hat, which holds the refined block's outputs). Returns the block's line of the report."""
    contest = Contest(walk, chosen, inputs, held, tune.error if tune is not None else "absolute")
    errors = {"refined": contest.error(contest.picks("fit")), "unrefined": contest.error(contest.picks("base"))}
    tuned = extra = None
    if tune is not None:
        tuned, extra = contest.tune(contest.picks("fit"), contest.fit, tune)
        errors["tuned"] = contest.error(tuned, extra)
    winner = min(errors, key=lambda k: (errors[k], k != "unrefined"))  # a tie keeps the block unrefined
    if winner != "refined":
        base = contest.picks("base")
        final = tuned if winner == "tuned" else {n: base[n] if base[n][1] is None else fallback[n] for n in chosen}
        extra = extra if winner == "tuned" else {}
        outputs = contest.run(final, range(walk.n_win), extra)
        for n, (u, v) in final.items():
            with weights_of(walk.linears[n]):
                dt = walk.linears[n].weight.dtype
            out[n] = (u.to("cpu", dt), None if v is None else v.to("cpu", dt))
            if v is None and winner == "unrefined":
                out.pop(n)  # a compensated dense matrix back to the original's: nothing new to ship
        own = dict(walk.block.named_parameters())
        out.update({f"{walk.base}.{k}": t.to("cpu", own[k].dtype) for k, t in extra.items()})
        for i in range(walk.n_win):
            walk.hat.hidden[i] = outputs[i]
    matrices = {n: {"tau": p["tau"], "gain": p["gain"], "dense": p["fit"][1] is None} for n, p in chosen.items()}
    best = min(errors["refined"], errors.get("tuned", float("inf")))
    return {"block": b, "refined": winner != "unrefined", "choice": winner,
            "gain": 1 - best / errors["unrefined"] if errors["unrefined"] > 0 else 0.0,
            "errors": errors, "matrices": matrices}
