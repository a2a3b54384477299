"""Step 3 of the flow: channel-weighted whitening and the SVD of every matrix, computed once.

For a Linear y = W x with input Gram G = X X^T and channel scale D = diag(d):
- "paper" form (DipSVD Eq. 3): G~ = D G D = Q L Q^T, S = Q L^{1/2}, S^{-1} = L^{-1/2} Q^T.
- "code" form (the authors' public code): SVD of G D = U Sig V^T, S = U Sig^{1/2}, so that
  S S^T = (G D^2 G)^{1/2}; with D = I this is SVD-LLM's whitening too. In float64, U and Sig^2 come
  from the eigendecomposition of G D^2 G = (G D)(G D)^T instead: 2.7x faster than the SVD of G D
  (0.30 against 0.80 s at width 1536 on the 2-core CPU; cuSOLVER's eigh is faster than its SVD too).
  Squaring costs digits only where sigma_i < ~1e-8 sigma_1, directions the data all but never visit:
  on the bundled model's Grams (condition numbers up to 6e10) every truncation's data error
  ||(W - W') D X||_F came out within 0.13% of the SVD route's up to half the rank, median 1e-11
  (bench/RESULTS.md, "Factors by eigh"). In float32 the squared condition number leaves too few
  digits (the data error rose by up to 64% at 30% of the rank), so float32 compute keeps the SVD.
- `svd` (no data): S = I.
- Baselines with a diagonal S (S^{-1} its inverse, so every rank is still a slice):
  `fwsvd` (Fisher-weighted SVD, Hsu et al. 2022): S = diag(sqrt(f_j)) with f_j the row-wise Fisher
  of input channel j (importance.fisher_info, the same backward passes as the sensitivity);
  `asvd` (activation-aware SVD, Yuan et al. 2023): S = diag(mean|x_j|^0.5) from the statistics,
  with a uniform ratio. ASVD's per-layer sensitivity search for the ratios is left out.
Then W S = U Sigma V^T and the rank-k matrix is W' = U_k Sigma_k (V_k^T S^{-1}). A Factor keeps
U Sigma^{1/2}, sigma and Sigma^{1/2} V^T S^{-1} for all min(out, in) components, so any rank is a
slice. In the paper form
||(W - W') D X||_F = sqrt(sum_{i>k} sigma_i^2) exactly (where no eigenvalue was floored).
The whitening and the SVD run on the device of the weight and the Gram (the model's device), in
the spec's compute dtype (float64 by default); the factors are stored in float32 (or the model's
bfloat16) with sigma in float64. In float64 the SVD of W S is taken from the eigendecomposition of
the smaller of (W S)(W S)^T and (W S)^T (W S) (`_factor_by_eigh`), for the same reason as above.

Factors live on disk (`FactorStore`), one safetensors file per decoder block, laid out so that a
rank-k slice is k contiguous rows of each tensor: u is stored transposed, as ut = (U Sigma^{1/2})^T
(r, out), next to vs (r, in). Only sigma stays in memory; `Factor.low_rank(k)` reads k rows of
each through a memory map (safetensors `get_slice`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import DipSVDError
from .stats import channel_importance

log = logging.getLogger(__name__)

WHITENING_FORMS = ("paper", "code")
DEFAULT_WHITENING = "code"  # measured best on held-out text: bench/RESULTS.md
METHODS = ("svd", "svd-llm", "dipsvd", "fwsvd", "asvd")
GRAM_METHODS = ("svd-llm", "dipsvd")  # the methods whose whitening needs the input Grams
EIG_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-6}  # eigenvalues below this fraction of the largest are raised to it
DIAG_FLOOR = 1e-6  # diagonal scales below this fraction of the largest are raised to it (dead channels)
ASVD_ALPHA = 0.5  # ASVD's exponent on mean |x_j|
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


class Factor:
    """W S = U diag(sigma) V^T, stored pre-scaled so that any rank is a slice:
    us = U Sigma^{1/2} (out, r) and vs = Sigma^{1/2} V^T S^{-1} (r, in), r = min(out, in).

    In memory (`Factor(us, sigma, vs)`) or on disk (`Factor.on_disk(file, name, sigma)`): then only
    sigma is held, and `low_rank(k)` reads k rows of ut and vs."""

    def __init__(self, us: torch.Tensor | None, sigma: torch.Tensor, vs: torch.Tensor | None, floored: int = 0,
                 file: str | None = None, name: str = ""):
        self._us, self.sigma, self._vs, self.floored = us, sigma, vs, floored  # sigma: (r,) float64, descending
        self.file, self.name = file, name

    @classmethod
    def on_disk(cls, file: str, name: str, sigma: torch.Tensor, floored: int = 0) -> "Factor":
        return cls(None, sigma, None, floored, file, name)

    @property
    def max_rank(self) -> int:
        return self.sigma.numel()

    def _rows(self, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ut[:k], vs[:k]) as views: k rows of each. On disk the views lie in a memory map of the block
        file, so only the pages a copy of them touches are read."""
        if self.file is None:
            k = self.max_rank if k is None else k
            return self._us[:, :k].T, self._vs[:k]
        with safe_open(self.file, framework="pt") as f:
            ut, vs = f.get_slice(f"{self.name}/ut"), f.get_slice(f"{self.name}/vs")
            return (ut[:k], vs[:k]) if k is not None else (ut[:], vs[:])

    @property
    def us(self) -> torch.Tensor:
        return self._us if self._us is not None else self._rows(None)[0].T.clone(memory_format=torch.contiguous_format)

    @property
    def vs(self) -> torch.Tensor:
        return self._vs if self._vs is not None else self._rows(None)[1].clone()

    def low_rank(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, v) with W' = u @ v = U_k Sigma_k V_k^T S^{-1}; u is (out, k), v is (k, in). Fresh copies that
        hold nothing beyond their k rows."""
        ut, vs = self._rows(k)
        return ut.T.clone(memory_format=torch.contiguous_format), vs.clone()

    def weight(self, k: int) -> torch.Tensor:
        u, v = self.low_rank(k)
        return u.double() @ v.double()

    def loss_curve(self) -> torch.Tensor:
        """L(k) = sqrt(sum_{i>k} sigma_i^2) for k = 0..r: the whitened error of every rank."""
        return loss_curve(self.sigma)


def loss_curve(sigma: torch.Tensor) -> torch.Tensor:
    energy = sigma.double() ** 2
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])
    return torch.cat([tail, tail.new_zeros(1)]).clamp_min(0).sqrt()


def channel_scale(alpha: torch.Tensor, weight: float, bar: float) -> torch.Tensor:
    """d_j = weight for the top `bar` fraction of channels by alpha (round(bar * n) of them), else 1."""
    if weight <= 0:
        raise DipSVDError(f"weight must be positive (got {weight}); 1 disables channel protection")
    if not 0 <= bar <= 1:
        raise DipSVDError(f"bar must be a fraction in [0, 1] (got {bar})")
    d = torch.ones_like(alpha, dtype=torch.float64)
    n_top = int(round(bar * alpha.numel()))
    if n_top > 0 and weight != 1:
        d[torch.topk(alpha, n_top).indices] = float(weight)
    return d


def _floor(values: torch.Tensor, what: str, rel: float) -> tuple[torch.Tensor, int]:
    top = values.max().clamp_min(0)
    if top <= 0 or not torch.isfinite(top):
        raise DipSVDError(f"the {what} is zero or not finite: this layer saw no usable activations; "
                          "check the calibration text and the model's dtype")
    floor = top * rel
    n = int((values < floor).sum())
    if n:
        log.info("%s: %d of %d eigenvalues floored at %.3g", what, n, values.numel(), floor.item())
    return values.clamp_min(floor), n


def whitening(gram: torch.Tensor, d: torch.Tensor, form: str,
              compute: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(S, S^{-1}, n_floored) for Gram G and channel scale d, in `compute` dtype on the Gram's device."""
    G, d = gram.to(compute), d.to(gram.device, compute)
    rel = EIG_FLOOR[compute]
    if form == "paper":
        L, Q = torch.linalg.eigh(d[:, None] * G * d[None, :])
        L, n = _floor(L, "weighted Gram", rel)
        root = L.sqrt()
        return Q * root, Q.T / root[:, None], n
    if form == "code":
        GD = G * d[None, :]
        if compute == torch.float64:  # (G D)(G D)^T = U Sig^2 U^T: U and Sig by a symmetric eigendecomposition
            U, sig = left_singular_by_eigh(GD)
        else:  # squaring the condition number would leave float32 too few digits: the SVD itself
            U, sig, _ = torch.linalg.svd(GD)
        sig, n = _floor(sig, "weighted Gram", rel)
        root = sig.sqrt()
        return U * root, U.T / root[:, None], n
    raise DipSVDError(f"unknown whitening form '{form}'; use one of {', '.join(WHITENING_FORMS)}")


def factor_matrix(W: torch.Tensor, S: torch.Tensor | None = None, S_inv: torch.Tensor | None = None,
                  floored: int = 0, dtype: torch.dtype = torch.float32,
                  compute: torch.dtype = torch.float64) -> Factor:
    """SVD of W S (or of W when S is None), keeping all min(out, in) components, on W's device.

    The SVD runs in `compute` dtype; `dtype` is how us and vs are stored. sigma comes back in float64 on the CPU.
    """
    Wc = W.detach().to(compute)
    if S is not None:
        S, S_inv = S.to(Wc.device, compute), S_inv.to(Wc.device, compute)
    A = Wc @ S if S is not None else Wc
    if compute == torch.float64:
        us, sigma, vs = _factor_by_eigh(Wc, A, S_inv)
    else:  # float32 keeps the SVD: squaring the condition number would leave too few digits
        U, sigma, Vt = torch.linalg.svd(A, full_matrices=False)
        root = sigma.sqrt()
        us, vs = U * root, root[:, None] * (Vt @ S_inv if S_inv is not None else Vt)
    return Factor(us.to(dtype), sigma.double().cpu(), vs.to(dtype), floored)


def left_singular_by_eigh(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, sigma) of A = U Sigma V^T, largest first, from the eigendecomposition A A^T = U Sigma^2 U^T: rounding
    leaves sigma_i accurate to about eps sigma_1 / sigma_i relative, so float64 only (module docstring)."""
    lam, U = torch.linalg.eigh(A @ A.T)
    return U.flip(1), lam.flip(0).clamp_min(0).sqrt()


def _factor_by_eigh(W: torch.Tensor, A: torch.Tensor, S_inv: torch.Tensor | None):
    """(us, sigma, vs) of A = W S = U Sigma V^T from the eigendecomposition of the smaller of A A^T and A^T A.

    With A A^T = U Sigma^2 U^T (out <= in): us = U Sigma^{1/2} and vs = Sigma^{1/2} V^T S^{-1} =
    Sigma^{-1/2} U^T W, so that us_k vs_k = U_k U_k^T W. With A^T A = V Sigma^2 V^T (out > in):
    us = A V Sigma^{-1/2} and vs = Sigma^{1/2} V^T S^{-1}. Either way the full rank gives back W, and
    a rank-k slice is the same truncation as the SVD's up to the squared condition number's rounding (on
    the bundled model 2-3.4x faster than the SVD; bench/RESULTS.md, "Factors by eigh"). A component with
    sigma = 0 is left at zero; the divisions use sigma floored at 1e-12 sigma_1 so that none overflows."""
    wide = A.shape[0] <= A.shape[1]
    Q, sigma = left_singular_by_eigh(A if wide else A.T)  # U, or V from A^T = V Sigma U^T
    root = sigma.sqrt()
    div = sigma.clamp_min(max(float(sigma[0]) * 1e-12, 1e-300)).sqrt()
    if wide:
        return Q * root, sigma, (Q.T @ W) / div[:, None]
    return (A @ Q) / div, sigma, root[:, None] * (Q.T @ S_inv if S_inv is not None else Q.T)


@dataclass(frozen=True)
class FactorSpec:
    """What the factors depend on, besides the model and the calibration windows."""

    method: str = "dipsvd"
    weight: float = 30.0
    bar: float = 0.03
    whitening: str = DEFAULT_WHITENING
    compute: str = "float64"  # dtype of the whitening and the SVD
    storage: str = "float32"  # dtype of the stored factors (bfloat16 halves the disk and the reads)

    def __post_init__(self):
        if self.method not in METHODS:
            raise DipSVDError(f"unknown method '{self.method}'; use one of {', '.join(METHODS)}")
        if self.whitening not in WHITENING_FORMS:
            raise DipSVDError(f"unknown whitening form '{self.whitening}'; use paper or code")
        if self.compute not in ("float64", "float32"):
            raise DipSVDError(f"unknown compute dtype '{self.compute}'; use float64 or float32")
        if self.storage not in ("float32", "bfloat16"):
            raise DipSVDError(f"unknown factor dtype '{self.storage}'; use float32 or bfloat16")

    @property
    def key(self) -> tuple:
        dtypes = () if (self.compute, self.storage) == ("float64", "float32") else (self.compute, self.storage)
        if self.method == "svd":
            return ("svd", *dtypes)
        if self.method == "svd-llm":  # D = I: both forms give S S^T = G; eigh ("paper") is cheaper
            return ("svd-llm", *dtypes)
        if self.method == "fwsvd":  # the Fisher key is added by the Workbench
            return ("fwsvd", DIAG_FLOOR, *dtypes)
        if self.method == "asvd":
            return ("asvd", ASVD_ALPHA, DIAG_FLOOR, *dtypes)
        return ("dipsvd", float(self.weight), float(self.bar), self.whitening, *dtypes)


def diagonal_scale(scale: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(S, S^{-1}, n_floored) for S = diag(scale); zero (dead) entries are floored so S^{-1} exists."""
    s, n = _floor(scale.double(), what, DIAG_FLOOR)
    return torch.diag(s), torch.diag(1 / s), n


def factor_model(weights: dict[str, torch.Tensor], spec: FactorSpec, group_of: dict[str, str] | None = None,
                 grams: dict[str, torch.Tensor] | None = None, abs_means: dict[str, torch.Tensor] | None = None,
                 fisher_rows: dict[str, torch.Tensor] | None = None, progress=None) -> dict[str, Factor]:
    """Factor these matrices (one block's, or any set). The whitening of a shared input group is computed once.

    svd-llm and dipsvd need `group_of` and the `grams` of the groups; asvd needs `abs_means` per group;
    fwsvd needs `fisher_rows` (name -> (in,) row-wise Fisher, from importance.fisher_info).
    """
    if spec.method == "fwsvd" and fisher_rows is None:
        raise DipSVDError("fwsvd needs the Fisher weights of the calibration loss; pass fisher_rows "
                          "(Workbench.factors does this)")
    compute, storage = DTYPES[spec.compute], DTYPES[spec.storage]
    whiten_cache: dict[str, tuple] = {}
    out = {}
    for i, (name, W) in enumerate(weights.items()):
        S = S_inv = None
        n = 0
        if spec.method == "fwsvd":  # per matrix: the Fisher of each weight differs even in a shared group
            S, S_inv, n = diagonal_scale(fisher_rows[name].sqrt(), f"Fisher scale of {name}")
        elif spec.method != "svd":
            group = group_of[name]
            if group not in whiten_cache:
                if spec.method == "asvd":
                    whiten_cache[group] = diagonal_scale(abs_means[group].double() ** ASVD_ALPHA,
                                                         f"activation scale of {group}")
                else:
                    gram = grams[group]
                    if spec.method == "dipsvd":
                        d = channel_scale(channel_importance(gram.double()), spec.weight, spec.bar)
                        whiten_cache[group] = whitening(gram, d, spec.whitening, compute)
                    else:
                        whiten_cache[group] = whitening(gram, torch.ones(gram.shape[0], dtype=torch.float64),
                                                        "paper", compute)
            S, S_inv, n = whiten_cache[group]
        out[name] = factor_matrix(W, S, S_inv, n, storage, compute)
        if progress:
            progress((i + 1) / len(weights), f"factoring {name}")
    return out


class FactorStore:
    """A method's factors on disk: block-NNNN.safetensors per decoder block, then meta.json once all are in.

    Each block file holds, per matrix, ut (r, out), vs (r, in) and sigma (r,): a rank-k slice is the
    first k rows of ut and vs, a contiguous read."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @property
    def complete(self) -> bool:
        return (self.folder / "meta.json").exists()

    def block_file(self, b: int) -> Path:
        return self.folder / f"block-{b:04d}.safetensors"

    def start(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)  # an unfinished earlier pass is not trusted
        self.folder.mkdir(parents=True)

    def write_block(self, b: int, factors: dict[str, Factor]) -> dict[str, Factor]:
        """Write one block's in-memory factors; returns them as on-disk Factors (the memory is freed)."""
        tensors = {}
        for n, f in factors.items():
            tensors.update({f"{n}/ut": f.us.T.contiguous().cpu(), f"{n}/vs": f.vs.contiguous().cpu(),
                            f"{n}/sigma": f.sigma})
        path = self.block_file(b)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        return {n: Factor.on_disk(str(path), n, f.sigma, f.floored) for n, f in factors.items()}

    def finish(self, blocks: dict[str, int], factors: dict[str, Factor], meta: dict) -> None:
        meta = dict(meta, blocks=blocks, floored={n: f.floored for n, f in factors.items()})
        tmp = self.folder / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self.folder / "meta.json")

    def load(self) -> dict[str, Factor] | None:
        """Every factor as on-disk Factors (sigma read now, the rest on demand); None if incomplete or torn."""
        try:
            meta = json.loads((self.folder / "meta.json").read_text())
            out = {}
            for b in sorted(set(meta["blocks"].values())):
                path = str(self.block_file(b))
                with safe_open(path, framework="pt") as f:
                    for n in [n for n, nb in meta["blocks"].items() if nb == b]:
                        out[n] = Factor.on_disk(path, n, f.get_tensor(f"{n}/sigma"), meta["floored"][n])
            return {n: out[n] for n in meta["blocks"]}
        except Exception:  # a torn or stale folder is recomputed, not trusted
            return None

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.safetensors"))
