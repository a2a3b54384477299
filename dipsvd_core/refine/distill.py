"""End-to-end distillation after the build (DistillConfig in choices.py): the compressed model's low-rank factors and
its norms trained so that its next-token distribution matches the original's, KL(original || compressed) on every
token of the calibration windows, one window a step, AdamW with a linear warm-up and cosine decay and gradient
clipping (block tuning's schedule, choices.lr_scale). After every epoch the KL on held-out calibration windows
(disjoint from the fit) is measured, and the best epoch's weights are kept, the build itself (epoch 0) included: it
never makes that held-out KL worse.

Unlike refine, this is not block by block: the compressed model, its trainable parameters' float32 masters, their
gradients and AdamW's two moments, and one window's autograd through the whole model are held on its device at once
(the plan counts them), and the original runs beside it as the teacher, one window at a time. So it needs the
original (not a build in place) and a model that is not offloaded. The norms the compressed model shares with the
original are given their own copies first: nothing writes into the original.
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..common.errors import DipSVDError
from ..engine.evaluate import token_kl, window_logits
from ..engine.stream import window_ids
from ..lowrank.surgery import LowRankLinear
from ..model.blocks import find_blocks
from ..model.offload import is_offloaded
from .choices import DISTILL_SCOPES, DistillConfig, lr_scale


def trainable(model: nn.Module, original: nn.Module, scope: str = "factors") -> list[nn.Parameter]:
    """The parameters distillation trains (choices.DISTILL_SCOPES), made trainable: every norm's weight (a module
    whose class name holds "Norm"), with its scope every LowRankLinear's factors and the decoder blocks' dense
    matrices; the embeddings, the lm_head and the biases stay. A parameter shared with the original is first
    replaced by a copy of its own."""
    what = DISTILL_SCOPES[scope]
    theirs = {p.data_ptr() for p in original.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    whole = [m for m in model.modules() if _is_norm(m)] + (_dense(model) if what.dense else [])
    for module in whole:
        if module.weight.data_ptr() in theirs:
            module.weight = nn.Parameter(module.weight.detach().clone())
    chosen = [m.weight for m in whole]
    if what.factors:
        chosen += [f.weight for m in model.modules() if isinstance(m, LowRankLinear) for f in (m.u, m.v)]
    for p in chosen:
        p.requires_grad_(True)
    return chosen


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__ and isinstance(getattr(module, "weight", None), nn.Parameter)


def _dense(model: nn.Module) -> list[nn.Linear]:
    """The decoder blocks' Linears the allocation kept dense: every nn.Linear but a LowRankLinear's factors."""
    out = []
    for block in find_blocks(model)[1]:
        factors = {id(f) for m in block.modules() if isinstance(m, LowRankLinear) for f in (m.u, m.v)}
        out += [m for m in block.modules() if isinstance(m, nn.Linear) and id(m) not in factors]
    return out


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions, in float32 (evaluate.token_kl)."""
    return token_kl(F.log_softmax(teacher_logits.float(), -1), student_logits).mean()


@torch.no_grad()
def held_kl(student: nn.Module, teacher: nn.Module, held: torch.Tensor) -> float:
    """The mean KL of the student from the teacher over the held-out windows, each window's logits taken in turn."""
    total = 0.0
    for (_, _, s), (_, _, t) in zip(window_logits(student, held), window_logits(teacher, held)):
        total += float(kl_divergence(s, t.to(s.device)))
    return total / len(held)


@contextlib.contextmanager
def recomputed(blocks: list[nn.Module]):
    """While open, each of these decoder blocks' forward runs under non-reentrant gradient checkpointing: autograd
    keeps the block's inputs and recomputes its activations in the backward, so one window's backward holds one
    block's working set at a time, not every block's. The model must run without a KV cache (a recompute would
    append to it twice). The blocks' own forwards are given back on leaving."""
    before = [block.__dict__.get("forward") for block in blocks]  # an instance forward (a hook's) kept
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block, forward in zip(blocks, before):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


class _Masters:
    """float32 master copies of 16-bit parameters (a float32 parameter is its own master): AdamW steps the masters,
    and each step's result is copied back into the model's parameter."""

    def __init__(self, params: list[nn.Parameter]):
        self.pairs = [(p, p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True))
                      for p in params]
        self.masters = [m for _, m in self.pairs]

    def take_grads(self) -> None:
        for p, m in self.pairs:
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    def write_back(self) -> None:
        with torch.no_grad():
            for p, m in self.pairs:
                if m is not p:
                    p.copy_(m)

    def snapshot(self) -> list[torch.Tensor]:
        return [m.detach().clone() for m in self.masters]

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for m, s in zip(self.masters, saved):
                m.copy_(s)
        self.write_back()


def check_distillable(model: nn.Module, inplace: bool) -> None:
    """Refuse, before any pass runs, a build that cannot be distilled: one in place (no teacher left), or of an
    offloaded model (the training holds the whole model on one device)."""
    if inplace:
        raise DipSVDError("distillation needs the original model as its teacher, and an in-place build converts it: "
                          "build a copy (leave out --no-eval-original) or use --distill-epochs 0")
    if is_offloaded(model):
        raise DipSVDError("distillation trains the whole compressed model on one device, and this model is "
                          "offloaded: use --distill-epochs 0, or a device that holds the model (see `plan`)")


def distill(student: nn.Module, teacher: nn.Module, fit: torch.Tensor, held: torch.Tensor, cfg: DistillConfig,
            progress=None) -> dict:
    """Train `student` (in place) towards `teacher` on the `fit` windows for cfg.epochs; keep the epoch whose KL on
    the `held` windows is lowest (0: the student as given). Returns what a report keeps. Every parameter's
    requires_grad is as it was afterwards (the student shares most of its tensors with the teacher: a flag turned
    off there would change how the original computes, a fused pair's product for one)."""
    flags = {id(p): p.requires_grad for p in [*student.parameters(), *teacher.parameters()]}  # shared: the original's
    try:
        return _distill(student, teacher, fit, held, cfg, progress)
    finally:  # a norm copied from the original's takes its flag (default True)
        for p in [*student.parameters(), *teacher.parameters()]:
            p.requires_grad_(flags.get(id(p), True))


def _distill(student: nn.Module, teacher: nn.Module, fit: torch.Tensor, held: torch.Tensor, cfg: DistillConfig,
             progress=None) -> dict:
    t0 = time.perf_counter()
    params = trainable(student, teacher, cfg.scope)
    masters = _Masters(params)
    opt = torch.optim.AdamW(masters.masters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(fit)
    curve = [held_kl(student, teacher, held)]
    best, kept = masters.snapshot(), 0
    order = torch.Generator().manual_seed(0)
    blocks = find_blocks(student)[1] if cfg.recompute else []  # checkpointed in each step's forward
    step = 0
    for epoch in range(cfg.epochs):
        for n, i in enumerate(torch.randperm(len(fit), generator=order).tolist()):
            _, w = next(window_ids(student, fit[i:i + 1]))
            with torch.no_grad():
                target = teacher(w).logits[0].to(w.device)
            with recomputed(blocks):
                loss = kl_divergence(student(w, use_cache=False).logits[0], target)
            if not torch.isfinite(loss):
                raise DipSVDError(f"distillation's loss is not finite at epoch {epoch + 1}; lower --distill-lr "
                                  f"(now {cfg.lr:g}) or load the model in float32")
            loss.backward()
            masters.take_grads()
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(masters.masters, cfg.clip)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_scale(step, total, cfg.warmup)
            opt.step()
            opt.zero_grad(set_to_none=True)
            masters.write_back()
            step += 1
            if progress:
                progress(step / (total + 1), f"distilling: epoch {epoch + 1}/{cfg.epochs}, window {n + 1}/{len(fit)}")
        curve.append(held_kl(student, teacher, held))
        if curve[-1] < curve[kept]:
            best, kept = masters.snapshot(), epoch + 1
    masters.restore(best)
    if progress:
        progress(1.0, f"distilled: kept epoch {kept} of {cfg.epochs}")
    return {"held_kl": curve, "kept_epoch": kept, "epochs": cfg.epochs, "scope": cfg.scope,
            "trained_params": sum(p.numel() for p in params), "fit_windows": len(fit), "held_windows": len(held),
            "seconds": time.perf_counter() - t0}


def distilled_summary(info: dict) -> str:
    """One line for a report or the app: "distilled 4 epochs (the factors and norms), kept epoch 4 (held-out KL
    0.459 -> 0.382, 320 s)", or where no epoch lowered the held-out KL, that the build was kept as it was; with the
    model's own text, how many of the fit windows it was ("distilled 1 epoch (...) on 128 windows, 96 of them the
    model's own text, ...")."""
    kl, kept, epochs = info["held_kl"], info["kept_epoch"], info["epochs"]
    own = info.get("own_text", 0)
    head = f"distilled {epochs} epoch{'s' if epochs != 1 else ''} ({DISTILL_SCOPES[info['scope']].trains})" + (
        f" on {info['fit_windows']} windows, {own} of them the model's own text" if own else "")
    if kept == 0:
        return (f"{head}, none lowered the held-out KL ({kl[0]:.3f}; best {min(kl[1:]):.3f}): the build kept as it "
                f"was ({info['seconds']:.0f} s)")
    return f"{head}, kept epoch {kept} (held-out KL {kl[0]:.3f} -> {kl[kept]:.3f}, {info['seconds']:.0f} s)"
