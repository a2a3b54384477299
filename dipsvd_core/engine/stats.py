"""Step 2 of the flow: second moments of every targeted Linear's input, one decoder block at a time.

For each targeted Linear y = W x the factors need the input Gram G = sum_tokens x x^T (in x in).
Layers that read the very same input tensor (q/k/v, gate/up) share one Gram, computed once: within
each window the hooks recognise a tensor they already saw. The pass runs block by block (stream.py):
a block's Grams exist only while that block is processed and are handed to `on_block` (which
factors them and writes the factors to disk), then freed. What is kept for every block is small:
channel importance alpha and mean |x| per input group, and of the block output's Gram H^T H its
eigenvalues (for the effective rank), its diagonal (the energy of each hidden dimension: a few massive
dimensions can hold nearly all of it) and the eigenvalues of the Gram with those massive dimensions set
aside (`massive_dims`; the second effective rank). Hooks live here and in stream.py and nowhere else.

Accumulation runs on the model's device: each window's X^T X in float32 (TF32 off), summed in
`accumulate` dtype (float64 by default; a window's product loses ~1e-7 relative).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..common.cache import load_tensors, make_key, save_tensors
from ..common.errors import DipSVDError
from ..model.blocks import find_blocks
from ..model.models import LoadedModel
from ..model.offload import block_on_device
from .stream import capture_inputs, forward_block, release_host_memory


@dataclass
class Stats:
    group_of: dict[str, str]  # Linear name -> group name (the first Linear reading the same input)
    alphas: dict[str, torch.Tensor]  # group -> (in,) float64 channel importance
    abs_means: dict[str, torch.Tensor]  # group -> (in,) float64 mean |x_j| over tokens
    block_spectra: list[torch.Tensor]  # per block: eigenvalues (sigma^2, ascending) of H^T H, float64
    n_tokens: int
    seconds: float = 0.0
    block_energy: list[torch.Tensor] = field(default_factory=list)  # per block: diag of H^T H (d,), float64
    trimmed_spectra: list[torch.Tensor] = field(default_factory=list)  # per block: eigenvalues of H^T H without
    # its massive dimensions (massive_dims), ascending, float64

    def alpha(self, name: str) -> torch.Tensor:
        """Channel importance (paper Eq. 1): alpha_j = ||G[:, j]||_2, since alpha_j^2 = ||X^T x_j||^2."""
        return self.alphas[self.group_of[name]]

    def abs_mean(self, name: str) -> torch.Tensor:
        return self.abs_means[self.group_of[name]]


def channel_importance(gram: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(gram, dim=0)


MASSIVE_FACTOR = 500.0  # a hidden dimension whose energy is this many times the median one's is massive (500 in
# energy: about 22x in RMS magnitude over the calibration tokens). On the bundled model, 8 x 256 wiki-chat windows,
# dimension 507 holds 25-98% of the output energy of blocks 1-28 at 878x to 107,517x the median dimension's: 500
# sets it aside in every one of them; in block 0 no dimension is above 208x


def massive_dims(energy: torch.Tensor) -> torch.Tensor:
    """The hidden dimensions of a block output whose energy (diag of H^T H) exceeds MASSIVE_FACTOR x the median."""
    return torch.nonzero(energy > MASSIVE_FACTOR * energy.median()).flatten()


def output_summary(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What outlives a block of its output Gram H^T H (d, d), all on the CPU in float64: its eigenvalues, its
    diagonal, and the eigenvalues of the Gram with the massive dimensions' rows and columns removed."""
    g = gram.double()
    energy = torch.diagonal(g).clone()
    keep = torch.ones(g.shape[0], dtype=torch.bool, device=g.device)
    keep[massive_dims(energy)] = False
    trimmed = torch.linalg.eigvalsh(g[keep][:, keep])
    return torch.linalg.eigvalsh(g).cpu(), energy.cpu(), trimmed.cpu()


SIXTEEN_BIT = (torch.bfloat16, torch.float16)  # activations whose float32 copies TF32 holds exactly
TRIANGLE_ROWS = 4  # block rows of a Gram product that computes only the upper block triangle
TRIANGLE_MIN = 256  # narrower Grams take one full GEMM


def row_blocks(dim: int) -> list[slice]:
    """The block rows of upper_gram_add: TRIANGLE_ROWS equal slices of 0..dim (one where dim < TRIANGLE_MIN)."""
    step = dim if dim < TRIANGLE_MIN else -(-dim // TRIANGLE_ROWS)
    return [slice(i, min(i + step, dim)) for i in range(0, dim, step)]


def upper_gram_add(out: torch.Tensor, x: torch.Tensor) -> None:
    """out += X^T X in its upper block triangle only: block row i gets X_i^T X[:, i:], the blocks left of the
    diagonal are not written. With 4 block rows that is 10 of 16 blocks' multiplications (X^T X is symmetric;
    measured 0.58-0.65x the full GEMM's time at widths 576 and 1536, one and two threads). mirror_lower fills the
    rest."""
    xt = x.T
    for rows in row_blocks(x.shape[1]):
        out[rows, rows.start:].addmm_(xt[rows], x[:, rows.start:])


def mirror_lower(m: torch.Tensor) -> None:
    """Copy m's upper block triangle (upper_gram_add's blocks) onto the blocks left of the diagonal, and each diagonal
    block's upper triangle onto its lower one (a GEMM's two halves can differ in the last bit), in place: m comes
    out exactly symmetric."""
    for rows in row_blocks(m.shape[0]):
        m[rows, :rows.start].copy_(m[:rows.start, rows].T)
        block = m[rows, rows]
        block.copy_(torch.triu(block) + torch.triu(block, 1).T)


class GramAccumulator:
    """Accumulates X^T X and sum |x| over windows on X's device: each window's product in float32 (its upper block
    triangle, upper_gram_add, into a float32 partial sum, FLUSH windows of them, mirrored at the flush), the partial
    sum then added to the float64 sum, so the float64 conversion and addition of the d x d sum run once per FLUSH
    windows, not once per window (the statistics pass of the bundled model, 8 x 512 on two threads: bench/RESULTS.md,
    "Cold statistics and factors"). A NaN or infinite activation reaches the partial sum and is raised as
    NonFiniteActivations when it is flushed (`finish`)."""

    FLUSH = 8  # windows per float32 partial sum: 8 x 512 tokens; a partial's rounding stays near one product's

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype = torch.float64):
        self._sum = torch.zeros(dim, dim, dtype=dtype, device=device)
        self._part: torch.Tensor | None = None  # the float32 partial sum of the windows since the last flush
        self._in_part = 0
        self.abs_sum = torch.zeros(dim, dtype=torch.float64, device=device)  # for ASVD's mean |x_j|
        self.n = 0

    @property
    def gram(self) -> torch.Tensor:
        self.finish()
        return self._sum

    def finish(self) -> None:
        """Add the partial sum to the float64 sum (raises NonFiniteActivations where it is not finite)."""
        if not self._in_part:
            return
        if not torch.isfinite(self._part).all():
            raise NonFiniteActivations()
        mirror_lower(self._part)
        self._sum += self._part.to(self._sum.device, self._sum.dtype)
        self._part.zero_()
        self._in_part = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        # 16-bit activations are exact in TF32 (its 10 mantissa bits hold bfloat16's 7 and float16's 10): on CUDA
        # their product runs on the TF32 tensor cores, float32 accumulation; float32 activations stay IEEE
        precision = "tf32" if x.dtype in SIXTEEN_BIT and x.is_cuda else torch.backends.cuda.matmul.fp32_precision
        x = x.float()
        if self._part is None:
            self._part = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        with matmul_precision(precision):
            upper_gram_add(self._part, x)
        self._in_part += 1
        self.abs_sum += x.abs().sum(0).double()  # one window's column sums in float32 (n terms), then float64
        self.n += x.shape[0]
        if self._in_part >= self.FLUSH:
            self.finish()


class NonFiniteActivations(Exception):
    pass


class BlockStats:
    """One block's statistics while its windows run: a Gram per input group and the output Gram."""

    def __init__(self, linears: dict[str, nn.Linear], accumulate: torch.dtype = torch.float64):
        self.linears, self.accumulate = linears, accumulate
        self.group_of: dict[str, str] = {}
        self.accs: dict[str, GramAccumulator] = {}
        self.output: GramAccumulator | None = None
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}  # this window's inputs, by identity

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            seen = self._seen.get(id(x))
            if seen is not None and seen[0] is x:  # the same tensor as an earlier Linear: share its Gram
                self.group_of[name] = seen[1]
                return
            self._seen[id(x)] = (x, name)  # holding x keeps its id from being reused in this window
            self.group_of[name] = name
            if name not in self.accs:
                self.accs[name] = GramAccumulator(x.shape[-1], x.device, self.accumulate)
            self.accs[name].add(x.detach())
        return hook

    def attach(self) -> list:
        return [m.register_forward_pre_hook(self._hook(n)) for n, m in self.linears.items()]

    def add_output(self, h: torch.Tensor) -> None:
        self._seen.clear()  # a window ends with its block output
        if self.output is None:
            self.output = GramAccumulator(h.shape[-1], h.device, self.accumulate)
        self.output.add(h.detach())

    def finish(self) -> None:
        """Every accumulator's partial sum into its float64 sum (NonFiniteActivations where one is not finite)."""
        for acc in [*self.accs.values(), *([self.output] if self.output is not None else [])]:
            acc.finish()

    @property
    def grams(self) -> dict[str, torch.Tensor]:
        return {n: a.gram for n, a in self.accs.items()}


@contextlib.contextmanager
def matmul_precision(precision: str):
    """float32 matmuls on CUDA in `precision` within ("ieee", or "tf32"), restored after. The statistics pass runs
    in "ieee": TF32 rounds float32 inputs to 10 mantissa bits, ~1e-3 relative in every Gram."""
    m = torch.backends.cuda.matmul
    prev = m.fp32_precision
    m.fp32_precision = precision
    try:
        yield
    finally:
        m.fp32_precision = prev


def stream_stats(model: nn.Module, names: list[str], windows: torch.Tensor, on_block=None, progress=None,
                 accumulate: torch.dtype = torch.float64) -> Stats:
    """One pass over the calibration windows (n, seqlen), block by block. `on_block(index, block_stats)`
    is called after each block's windows have run, while its Grams still exist; Stats.seconds leaves
    the time spent in it out."""
    t0 = time.perf_counter()
    prefix, blocks = find_blocks(model)
    wanted = set(names)
    group_of, alphas, abs_means, outputs, n_tokens, t_other = {}, {}, {}, [], 0, 0.0
    with matmul_precision("ieee"):
        try:
            inputs = capture_inputs(model, blocks, windows)
        except torch.OutOfMemoryError:
            raise DipSVDError("out of memory while running the calibration windows; use a shorter --seqlen, "
                              "fewer --calib-windows, or the CPU") from None
        n_blocks = len(blocks)
        for b, block in enumerate(blocks):
            base = f"{prefix}.{b}" if prefix else str(b)  # as model.blocks.find_targets names them
            linears = {f"{base}.{n}": m for n, m in block.named_modules()
                       if isinstance(m, nn.Linear) and f"{base}.{n}" in wanted}
            with block_on_device(block):  # sent once, for the forward and on_block's factors
                st = BlockStats(linears, accumulate)
                handles = st.attach()

                def step(i, n, b=b):
                    if progress:
                        progress((b + i / n) / n_blocks, f"block {b + 1}/{n_blocks}: statistics, window {i}/{n}")
                try:
                    forward_block(block, inputs, st.add_output, step)
                    st.finish()
                except NonFiniteActivations:
                    raise DipSVDError(
                        f"NaN or infinite activations in decoder block {b}; the model overflows in this dtype. "
                        "Load it in float32 (--dtype float32)") from None
                except torch.OutOfMemoryError:
                    raise DipSVDError(f"out of memory in decoder block {b}; use a shorter --seqlen, fewer "
                                      "--calib-windows, or the CPU") from None
                finally:
                    for h in handles:
                        h.remove()
                group_of.update(st.group_of)
                for g, acc in st.accs.items():
                    alphas[g] = channel_importance(acc.gram.double()).cpu()
                    abs_means[g] = (acc.abs_sum / acc.n).cpu()
                outputs.append(output_summary(st.output.gram))
                n_tokens = st.output.n
                if on_block is not None:
                    t_block = time.perf_counter()
                    on_block(b, st)
                    t_other += time.perf_counter() - t_block
            del st
            release_host_memory()
    missing = wanted - set(group_of)
    if missing:
        raise DipSVDError(f"layer {sorted(missing)[0]} was never called in a forward pass; this architecture is "
                          "not supported")
    spectra, energy, trimmed = (list(x) for x in zip(*outputs))
    return Stats(group_of, alphas, abs_means, spectra, n_tokens, time.perf_counter() - t0 - t_other, energy, trimmed)


def stats_key(lm: LoadedModel, windows: torch.Tensor) -> str:
    return make_key("stats-v4", lm.fingerprint, windows.shape, make_key(windows.tolist()))


def save_stats(key: str, st: Stats) -> None:
    tensors = {f"alpha/{n}": a for n, a in st.alphas.items()}
    tensors.update({f"absmean/{n}": m for n, m in st.abs_means.items()})
    tensors.update({f"spectrum/{i}": s for i, s in enumerate(st.block_spectra)})
    tensors.update({f"energy/{i}": s for i, s in enumerate(st.block_energy)})
    tensors.update({f"trimmed/{i}": s for i, s in enumerate(st.trimmed_spectra)})
    save_tensors("stats", key, tensors, {"leaders": list(st.alphas), "group_of": st.group_of,
                                         "n_blocks": len(st.block_spectra), "n_tokens": st.n_tokens,
                                         "seconds": st.seconds, "massive_factor": MASSIVE_FACTOR})


def load_stats(key: str) -> Stats | None:
    hit = load_tensors("stats", key)
    if hit is None:
        return None
    t, meta = hit
    blocks = range(meta["n_blocks"])
    if meta.get("massive_factor") != MASSIVE_FACTOR:  # written before the output's energies were kept, or with
        return None  # another rule for the massive dimensions: measure again (the key, which others share, stays)
    return Stats(meta["group_of"], {n: t[f"alpha/{n}"] for n in meta["leaders"]},
                 {n: t[f"absmean/{n}"] for n in meta["leaders"]},
                 [t[f"spectrum/{i}"] for i in blocks], meta["n_tokens"], 0.0,
                 [t[f"energy/{i}"] for i in blocks], [t[f"trimmed/{i}"] for i in blocks])


def cached_stats(lm: LoadedModel, windows: torch.Tensor, progress=None, on_block=None) -> Stats:
    """Statistics for these exact windows, from the cache when present (then `on_block` is not called)."""
    key = stats_key(lm, windows)
    st = load_stats(key)
    if st is None:
        st = stream_stats(lm.model, [t.name for t in lm.targets], windows, on_block, progress)
        save_stats(key, st)
    return st
