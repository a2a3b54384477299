"""Step 3b of the flow: the SVD of every scaled matrix W S, computed once, and the factors on disk.

The scaling S is a registered strategy per factor method (scalings.py: identity, Gram whitening, channel-weighted
Gram whitening, Fisher rows, activation means); this module is the same for all of them.
Then W S = U Sigma V^T and the rank-k matrix is W' = U_k Sigma_k (V_k^T S^{-1}). A Factor keeps
U Sigma^{1/2}, sigma and Sigma^{1/2} V^T S^{-1} for all min(out, in) components, so any rank is a
slice. In the paper form
||(W - W') D X||_F = sqrt(sum_{i>k} sigma_i^2) exactly (where no eigenvalue was floored).
The whitening and the SVD run on the device of the weight and the Gram (the model's device), in
the spec's compute dtype (float64 by default); the factors are stored in float32 (or the model's
bfloat16) with sigma in float64. In float64 the SVD of W S is taken from the eigendecomposition of
the smaller of (W S)(W S)^T and (W S)^T (W S) (`_factor_by_eigh`), since squaring the condition number costs digits only where the data
all but never goes (scalings.py).

Factors live on disk (`FactorStore`), one safetensors file per decoder block, laid out so that a
rank-k slice is k contiguous rows of each tensor: u is stored transposed, as ut = (U Sigma^{1/2})^T
(r, out), next to vs (r, in). Only sigma stays in memory; `Factor.low_rank(k)` reads k rows of
each through a memory map (safetensors `get_slice`).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..common.errors import DipSVDError
from ..common.options import check_options
from .scalings import (EIG_FLOOR, ScaleData, Scaling,  # noqa: F401 (re-exported)
                       channel_scale, diagonal_scale, left_singular_by_eigh, lower_matmul, right_inverse, scaling,
                       whitening)

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


def factor_matrix(W: torch.Tensor, S: torch.Tensor | None = None, S_inv: torch.Tensor | None = None,
                  floored: int = 0, dtype: torch.dtype = torch.float32,
                  compute: torch.dtype = torch.float64) -> Factor:
    """SVD of W S (or of W when S is None), keeping all min(out, in) components, on W's device.

    The SVD runs in `compute` dtype; `dtype` is how us and vs are stored. sigma comes back in float64 on the CPU.
    """
    Wc = W.detach().to(compute)
    if S is not None:
        S = S.to(Wc.device, compute)
        S_inv = S_inv.to(Wc.device, compute) if S_inv is not None else None
    if S is None:
        A = Wc
    elif S_inv is None:  # S is a Cholesky factor: lower triangular
        A = lower_matmul(Wc, S)
    else:
        A = Wc @ S
    if compute == torch.float64:
        us, sigma, vs = _factor_by_eigh(Wc, A, S, S_inv)
    else:  # float32 keeps the SVD: squaring the condition number would leave too few digits
        U, sigma, Vt = torch.linalg.svd(A, full_matrices=False)
        root = sigma.sqrt()
        us, vs = U * root, root[:, None] * right_inverse(Vt, S, S_inv)
    return Factor(us.to(dtype), sigma.double().cpu(), vs.to(dtype), floored)


def _factor_by_eigh(W: torch.Tensor, A: torch.Tensor, S: torch.Tensor | None, S_inv: torch.Tensor | None):
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
    return (A @ Q) / div, sigma, root[:, None] * right_inverse(Q.T, S, S_inv)


@dataclass(frozen=True)
class FactorSpec:
    """What the factors depend on, besides the model and the calibration windows. `method` names the scaling
    (scalings.SCALINGS); `options` are that scaling's own (its Options dataclass: dipsvd's weight, bar and
    whitening), its defaults where not given, None for a scaling without options."""

    method: str = "dipsvd"
    options: object = None
    compute: str = "float64"  # dtype of the whitening and the SVD
    storage: str = "float32"  # dtype of the stored factors (bfloat16 halves the disk and the reads)

    def __post_init__(self):
        own = scaling(self.method).Options  # an unknown name says which exist
        if own is None and self.options is not None:
            raise DipSVDError(f"{self.method} has no options of its own (got {self.options!r})")
        if own is not None:
            if self.options is None:
                object.__setattr__(self, "options", own())
            elif not isinstance(self.options, own):
                raise DipSVDError(f"{self.method}'s options are a {own.__name__}, not {type(self.options).__name__}")
            check_options(self.options)
        if self.compute not in ("float64", "float32"):
            raise DipSVDError(f"unknown compute dtype '{self.compute}'; use float64 or float32")
        if self.storage not in ("float32", "bfloat16"):
            raise DipSVDError(f"unknown factor dtype '{self.storage}'; use float32 or bfloat16")

    @property
    def scaling(self) -> Scaling:
        return scaling(self.method)

    @property
    def key(self) -> tuple:
        dtypes = () if (self.compute, self.storage) == ("float64", "float32") else (self.compute, self.storage)
        return (*self.scaling.key(self), *dtypes)


def factor_model(weights: dict[str, torch.Tensor], spec: FactorSpec, group_of: dict[str, str] | None = None,
                 grams: dict[str, torch.Tensor] | None = None, abs_means: dict[str, torch.Tensor] | None = None,
                 fisher_rows: dict[str, torch.Tensor] | None = None, progress=None) -> dict[str, Factor]:
    """Factor these matrices (one block's, or any set) with the spec's scaling. A scaling shared by an input
    group (every one but a per-matrix scaling) is computed once per group.

    Each scaling reads what it needs (scalings.py): `group_of` and the groups' `grams`, `abs_means` per group,
    or `fisher_rows` (name -> (in,) row-wise Fisher, from fisher.fisher_info).
    """
    compute, storage = DTYPES[spec.compute], DTYPES[spec.storage]
    scale, data = spec.scaling, ScaleData(group_of, grams, abs_means, fisher_rows)
    cache: dict[str, tuple | None] = {}
    out = {}
    for i, (name, W) in enumerate(weights.items()):
        group = (group_of or {}).get(name, name)
        ident = name if scale.per_matrix else group
        if ident not in cache:
            cache[ident] = scale.scale(spec, name, group, data, compute)
        S, S_inv, n = cache[ident] or (None, None, 0)
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
