"""Refine's closed form for one input group (steps 1 to 3 and 5 of refine.sequential): the sums it needs, window by
window (_Sums, GroupStats), the least-squares target and its solver, the whitened truncation (Truncation), and
the held-out choice among the unrefined factors and the refits at each damping (choose, refit)."""
from __future__ import annotations

import torch
from torch import nn

from ..common.errors import DipSVDError
from ..engine.stats import SIXTEEN_BIT, matmul_precision
from ..lowrank.factors import DTYPES, EIG_FLOOR, FactorSpec, factor_matrix
from ..lowrank.scalings import ScaleData, symmetric_eigh
from ..model.offload import weights_of
from .choices import CHOL_MARGIN, FULL


def _product(u: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    return u if v is None else u @ v


def _check(x: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(x).all():
        raise DipSVDError(f"NaN or infinite activations at {name} while refining; load the model in float32")
    return x


def solver(gram_hat: torch.Tensor, compute: torch.dtype = torch.float64, damp: float = 0.0):
    """(solve, n_floored) with solve(M) = M (G^ + delta I)^{-1}, delta = damp x the mean eigenvalue of G^ (GPTQ's
    dampening). Undamped, or where delta could be near the eigenvalue floor, the inverse comes from the
    floored eigendecomposition (eigenvalues below EIG_FLOOR x the largest raised to it). Damped as refine
    damps, every eigenvalue of G^ + delta I is at least delta, far above any floor (delta >= CHOL_MARGIN x
    EIG_FLOOR x trace >= CHOL_MARGIN x the floor), so a Cholesky solve gives the same matrix, about 5x
    faster than the eigendecomposition (measured at 1536 x 1536); one solver serves a whole input group."""
    G = gram_hat.to(compute)
    trace = G.diagonal().sum()
    if not trace > 0 or not torch.isfinite(trace):
        raise DipSVDError("the compressed model's activations have a zero or non-finite Gram; nothing to refine "
                          "against (check the calibration text and the model's dtype)")
    delta = damp * trace / G.shape[0]
    if damp > 0 and delta >= CHOL_MARGIN * EIG_FLOOR[compute] * trace:
        chol, info = torch.linalg.cholesky_ex(G + delta * torch.eye(G.shape[0], dtype=compute, device=G.device))
        if int(info) == 0:
            return (lambda M: torch.cholesky_solve(M.to(compute).T, chol).T), 0
    L, Q = symmetric_eigh(G)
    top = L.max()
    if not top > 0 or not torch.isfinite(top):
        raise DipSVDError("the compressed model's activations have a zero or non-finite Gram; nothing to refine "
                          "against (check the calibration text and the model's dtype)")
    floor = top * EIG_FLOOR[compute]
    n = int((L < floor).sum())
    inv = (Q / (L.clamp_min(floor) + delta)) @ Q.T
    return (lambda M: M.to(compute) @ inv.to(M.device)), n


def least_squares_target(W: torch.Tensor, cross: torch.Tensor, gram_hat: torch.Tensor,
                         compute: torch.dtype = torch.float64, damp: float = 0.0,
                         solve=None) -> tuple[torch.Tensor, int]:
    """(W* = W C (G^ + delta I)^{-1}, eigenvalues floored) with delta = damp x the mean eigenvalue of G^; `solve`
    (from `solver`) reuses one factorisation of G^ for every matrix of an input group."""
    n = 0
    if solve is None:
        solve, n = solver(gram_hat, compute, damp)
    return solve(W.to(compute) @ cross.to(compute, copy=False).to(W.device)), n


class _Sums:
    """One part's sums (the fit windows' or the held-out windows'), in float64: the Gram G^ = X^ X^^T and the
    cross-Gram C = X X^^T (a plain group) or the numerator (B - R^) X^^T (the residual-writing Linear). A held
    part also has what the error's constant term needs: X X^T (plain, from the original path;
    ||W X||^2 = tr(W X X^T W^T)) or ||B - R^||^2 (the residual-writing Linear)."""

    def __init__(self, held: bool):
        self.held = held
        self.gram = self.cross = self.numerator = self.gram_x = None
        self.target_sq = 0.0
        self.windows = 0

    def add_gram(self, xh: torch.Tensor) -> None:
        self.add("gram", (xh.T @ xh).double())
        self.windows += 1

    def add(self, name: str, value: torch.Tensor) -> None:
        """value (a fresh tensor of the caller's) added into the sum in place: no third g x g matrix meanwhile."""
        old = getattr(self, name)
        setattr(self, name, value if old is None else old.add_(value))


def gram_precision(*xs: torch.Tensor) -> str:
    """The float32 matmul precision for products of these inputs: TF32 where all are 16-bit on CUDA (exact for
    them, float32 accumulation: the statistics pass's rule, stats.GramAccumulator.add), else as set."""
    sixteen = all(x.dtype in SIXTEEN_BIT and x.is_cuda for x in xs)
    return "tf32" if sixteen else torch.backends.cuda.matmul.fp32_precision


class GroupStats:
    """The accumulator of one input group: what its closed form needs, added window by window on the
    compressed path, each window into its part (`held`: the indices of the held-out windows, scored and not
    fitted; empty: every window is fitted). Always the Gram G^ = X^ X^^T, (in, in). A plain group adds the
    cross-Gram C = X X^^T, (in, in), with X the original inputs; the residual-writing Linear (`full`) adds
    instead the whole numerator (B - R^) X^^T, (hidden, in). Nothing is kept per window. `gram`, `cross` and
    `numerator` are the fit part's."""

    def __init__(self, full: bool, held: frozenset = frozenset()):
        self.full, self.held_windows = full, held
        self.fit, self.held = _Sums(False), _Sums(True)
        self.orig_fit: torch.Tensor | None = None  # the original inputs' X X^T on the fit windows (set by the walk)
        self._terms: dict[str, tuple] = {}  # matrix -> (||W X||^2, W C) on the held-out windows (held_error)

    gram = property(lambda self: self.fit.gram)
    cross = property(lambda self: self.fit.cross)
    numerator = property(lambda self: self.fit.numerator)

    def _part(self, i: int) -> _Sums:
        return self.held if i in self.held_windows else self.fit

    def add(self, i: int, xh: torch.Tensor, x: torch.Tensor) -> None:
        """A plain group's window i: X^ (tokens, in) and the original X (tokens, in), multiplied in float32."""
        part = self._part(i)
        with matmul_precision(gram_precision(xh, x)):
            xh = xh.float()
            part.add_gram(xh)
            part.add("cross", (x.float().T @ xh).double())

    def add_residual(self, i: int, x_raw: torch.Tensor, r_h: torch.Tensor, block_out: torch.Tensor) -> None:
        """The residual-writing Linear's window i: its input X^ (tokens, in), the compressed path's residual r^
        (tokens, hidden) and the original block's output B, whatever its shape."""
        part, xh = self._part(i), x_raw.float()
        # B - R^ with B the original block's output: (B - R^) X^^T = W C + (R - R^) X^^T
        d = block_out.reshape(-1, r_h.shape[-1]) - r_h
        with matmul_precision(gram_precision(x_raw, d)):
            d = d.float()
            part.add("numerator", (d.T @ xh).double())
            part.add_gram(xh)
        if part.held:
            part.target_sq += float(d.double().pow(2).sum())

    def total(self) -> _Sums:
        """Both parts summed: what the chosen damping is refitted on. Summed into the fit part in place, the held-out
        part let go (neither is read once the contenders are chosen): at Llama-3-8B's down_proj each is 1.6 GB."""
        for name in ("gram", "cross", "numerator"):
            held = getattr(self.held, name)
            if held is not None:
                fit = getattr(self.fit, name)
                setattr(self.fit, name, held if fit is None else fit.add_(held))
                setattr(self.held, name, None)
        self.fit.windows += self.held.windows
        self.held.windows = 0
        return self.fit

    def check(self, name: str) -> None:
        for part in (self.fit, self.held):
            if part.windows:  # a NaN in any window's X or X^ reaches G^ or C: one check per group and part
                _check(part.gram, name)
                _check(part.numerator if self.full else part.cross, name)

    def held_error(self, W: torch.Tensor | None, u: torch.Tensor, v: torch.Tensor, key: str | None = None) -> float:
        """||Y - u v X^||^2 on the held-out windows, from their sums alone (Y = W X, or B - R^ for the
        residual-writing Linear): ||Y||^2 - 2 tr(u v T^T) + tr(u^T u v G^ v^T) with T = W C or the numerator.
        With `key` (the matrix's name) ||Y||^2 and T are computed once for every contender of that matrix."""
        h = self.held
        dev = h.gram.device
        u, v = u.double().to(dev), None if v is None else v.double().to(dev)
        if self.full:
            const, T = h.target_sq, h.numerator
        elif key is not None and key in self._terms:
            const, T = self._terms[key]
        else:
            Wd = W.double().to(dev)
            const, T = float(((Wd @ h.gram_x) * Wd).sum()), Wd @ h.cross
            if key is not None:
                self._terms[key] = const, T
        if v is None:  # a dense refit: tr(u G^ u^T) and tr(u T^T)
            return const - 2 * float((u * T).sum()) + float(((u @ h.gram) * u).sum())
        quad = float(((u.T @ u) * (v @ h.gram @ v.T)).sum())
        return const - 2 * float(((u.T @ T) * v).sum()) + quad


class _Truncation:
    """Steps 2 and 3 for one input group: the method's whitened rank-k truncation of a target against a Gram (the
    fit part's G^, both parts', or the original inputs' for the unrefined baseline). The scaling (the whitening's eigendecomposition) is computed once per group (per matrix for a
    per-matrix scaling) and serves every candidate damping."""

    def __init__(self, gram: torch.Tensor, leader: str, members: list[str], spec: FactorSpec,
                 compute: torch.dtype, abs_means: dict | None, fisher_rows: dict | None):
        self.spec, self.leader, self.compute = spec, leader, compute
        self.data = ScaleData({n: leader for n in members}, {leader: gram}, abs_means, fisher_rows)
        self.cache: dict[str, tuple] = {}

    def __call__(self, name: str, target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        if rank == FULL:  # a dense matrix refitted, not truncated
            return target.to(DTYPES[self.spec.storage]), None
        scale = self.spec.scaling
        ident = name if scale.per_matrix else self.leader
        if ident not in self.cache:
            self.cache[ident] = scale.scale(self.spec, name, self.leader, self.data, self.compute) or (None, None, 0)
        S, S_inv, n = self.cache[ident]
        return factor_matrix(target, S, S_inv, n, DTYPES[self.spec.storage], self.compute).low_rank(rank)


def _numerators(stats: _Sums, full: bool, members: dict[str, nn.Linear], compute: torch.dtype) -> dict:
    """T per member: W C, or the residual-writing Linear's whole numerator (B - R^) X^^T; shared by every damping."""
    out = {}
    for n, linear in members.items():
        if full:  # the whole numerator, W C + (R - R^) X^^T, is at hand
            out[n] = stats.numerator.to(compute)
            continue
        with weights_of(linear):
            W = linear.weight.detach()
            out[n] = W.to(compute) @ stats.cross.to(compute, copy=False).to(W.device)
    return out


def _targets(stats: _Sums, numerators: dict, compute: torch.dtype, tau: float, priors: dict | None):
    """Step 1 at damping tau, per member: W*_tau = (T + delta W0) (G^ + delta I)^{-1}, T from _numerators,
    delta = tau x the mean eigenvalue of the part's G^, and W0 the prior: the unrefined rank-k matrix (ridge
    towards it: tau -> infinity gives back the unrefined factors) or, without priors, zero (the damped least
    squares). Yields (name, W*_tau, eigenvalues floored); one factorisation of G^ serves the whole group."""
    solve, floored = solver(stats.gram, compute, tau)
    delta = tau * float(stats.gram.diagonal().sum()) / stats.gram.shape[0]
    for n, T in numerators.items():
        if priors is not None and delta > 0:
            u0, v0 = priors[n]
            T = T + delta * _product(u0.to(T.device, compute), None if v0 is None else v0.to(T.device, compute))
        yield n, solve(T), floored


def choose(stats: GroupStats, leader: str, members: dict[str, nn.Linear], spec: FactorSpec, ranks: dict,
            compute: torch.dtype, taus: tuple, priors: dict | None, abs_means: dict | None,
            fisher_rows: dict | None) -> tuple[dict, int]:
    """3. The group's factors. Without held-out windows: the least-squares targets at the one damping taus[0]
    (step 1) and their whitened truncation (steps 2 and 3). With them, each member is chosen on the held-out
    windows, with every contender fitted on the fit windows alone: the refined factors at each damping in `taus`
    against the unrefined ones (W truncated against the original inputs' Gram of the fit windows). The winner
    is refitted on every window (the refined ones at their damping; the unrefined ones are `priors`, as the
    factor pass made them). Returns ({name: pick}, eigenvalues floored), a pick being {"final": (u, v),
    "fit": (u, v) of the winner fitted on the fit windows, "base": the fit windows' unrefined (u, v),
    "tau": the damping or None (unrefined), "gain": 1 - its held-out error / the unrefined one's}."""
    names = list(members)
    if not (stats.held.windows and priors is not None):
        floored, out = 0, {}
        truncate = _Truncation(stats.gram, leader, names, spec, compute, abs_means, fisher_rows)
        for n, target, floored in _targets(stats.fit, _numerators(stats.fit, stats.full, members, compute), compute,
                                           taus[0], priors):
            out[n] = {"final": truncate(n, target, ranks[n]), "tau": taus[0], "gain": None}
        return out, floored
    weights = {}
    for n, linear in members.items():
        with weights_of(linear):
            weights[n] = linear.weight.detach().clone()
    # a compensated dense matrix's unrefined form is itself
    priors = {n: (weights[n].float(), None) if ranks[n] == FULL else priors[n] for n in names}
    original = _Truncation(stats.orig_fit, leader, names, spec, compute, abs_means, fisher_rows)
    best = {}
    for n in names:
        base = original(n, weights[n], ranks[n])
        err = stats.held_error(None if stats.full else weights[n], *base, key=n)
        best[n] = {"fit": base, "base": base, "tau": None, "err": err, "base_err": err}
    del original  # its whitening, and the original inputs' Gram, are not read again: one g x g matrix each
    stats.orig_fit = None
    truncate = _Truncation(stats.gram, leader, names, spec, compute, abs_means, fisher_rows)
    fit_priors = {n: b["base"] for n, b in best.items()}  # the prior fitted on the same windows (no leak)
    numerators = _numerators(stats.fit, stats.full, members, compute)
    for tau in taus:
        for n, target, _ in _targets(stats.fit, numerators, compute, tau, fit_priors):
            uv = truncate(n, target, ranks[n])
            err = stats.held_error(None if stats.full else weights[n], *uv, key=n)
            if err < best[n]["err"]:
                best[n].update(fit=uv, tau=tau, err=err)
    del truncate, numerators
    return _refit(stats, leader, members, spec, ranks, compute, priors, abs_means, fisher_rows, best)


def _refit(stats: GroupStats, leader: str, members: dict, spec: FactorSpec, ranks: dict, compute: torch.dtype,
           priors: dict, abs_means: dict | None, fisher_rows: dict | None, best: dict) -> tuple[dict, int]:
    """The chosen contenders refitted on every window: a refined member at its damping against both parts' G^,
    an unrefined one as its factors (`priors`)."""
    total, floored = stats.total(), 0
    truncate = _Truncation(total.gram, leader, list(members), spec, compute, abs_means, fisher_rows)
    refitted = {n: members[n] for n, b in best.items() if b["tau"] is not None}
    numerators = _numerators(total, stats.full, refitted, compute)
    for tau in {b["tau"] for b in best.values() if b["tau"] is not None}:
        chosen = {n: T for n, T in numerators.items() if best[n]["tau"] == tau}
        for n, target, floored in _targets(total, chosen, compute, tau, priors):
            best[n]["final"] = truncate(n, target, ranks[n])
    out = {}
    for n, b in best.items():
        gain = 1 - b["err"] / b["base_err"] if b["base_err"] > 0 else 0.0
        out[n] = {"final": b.get("final", priors[n]), "fit": b["fit"], "base": b["base"], "tau": b["tau"],
                  "gain": gain}
    return out, floored
