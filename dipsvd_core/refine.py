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

The pass streams like the statistics pass (stream.py), with two sets of activations: the original
path and the compressed one. For block l it runs the original block once, keeping every input
group's X; then, group by group in the order the block calls them (q/k/v, o, gate/up, down), it runs
the block on the compressed path with the groups before already refined, stopping at the group, to
take X^ (so o_proj and down_proj are fitted to the inputs they will really see), and refines the
group's factored matrices; finally the refined block's outputs on the compressed path become block
l+1's inputs (when the last group is the residual-writing Linear, they are r^ plus its refined output,
from the run that fitted it, so the block is not run a fourth time). On the compressed path a refined
matrix runs as its two factors in place of the Linear's own forward (the dense product is not
computed), and a child of the block that has finished with all its matrices refined (the attention,
once o_proj is) is replayed from its kept outputs instead of being run again for the later groups.
Dense-kept matrices stay the original's. Refining is a build step: the allocation (ranks) comes from
the fast factor-once path.

The code keeps the pass's three jobs apart, as GPTQ keeps `add_batch` apart from `fasterquant`:
`_GroupStats` gathers, window by window, what one input group's closed form needs (G^, and C or the
last Linear's whole numerator); `_BlockWalk` walks one block on both paths (the original run that takes
every X, the compressed runs that stop at a group, the replayed children, the refined forwards put in
place); `_closed_form` solves a group (steps 1 to 3: the least-squares target, then the whitened
truncation through factors.factor_model). `refine` strings them together block by block.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from .errors import DipSVDError
from .factors import EIG_FLOOR, FactorSpec, factor_model
from .models import find_blocks, weights_of
from .stream import BlockInputs, capture_inputs, release_host_memory

REFINES = ("none", "sequential")
DAMP = 0.01  # delta = DAMP x mean eigenvalue of G^ in the least-squares target (GPTQ's percdamp)
RESIDUAL = True  # the block's last Linear also takes back the residual stream's drift


CHOL_MARGIN = 100.0  # Cholesky when delta >= this x (the eigenvalue floor's bound): the floor cannot matter


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
    L, Q = torch.linalg.eigh(G)
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


def _replace_forward(module: nn.Module, forward):
    """Run `forward` instead of the module's own; returns the function that puts the old one back (an instance
    forward already there, as accelerate's offload hook installs, is kept and restored)."""
    old = module.__dict__.get("forward")
    module.forward = forward

    def restore():
        if old is None:
            del module.forward
        else:
            module.forward = old
    return restore


def _low_rank(u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None):
    def forward(x):
        z = nn.functional.linear(nn.functional.linear(x, v), u)
        return z + bias if bias is not None else z
    return forward


def _replay(outputs: list, current: list):
    """A forward that returns the kept output of the current window, as a copy: a block may add to what a child
    returns in place (a cheap copy next to the child's own cost)."""
    def fresh(y):
        if isinstance(y, torch.Tensor):
            return y.clone()
        return type(y)(fresh(v) for v in y) if isinstance(y, tuple) and not hasattr(y, "_fields") else y

    def forward(*args, **kwargs):
        return fresh(outputs[current[0]])
    return forward


class _Stop(Exception):
    """Raised by a pre-hook once the input it waits for is taken: the rest of the block is not run."""


def _block_out(out):
    return out[0] if isinstance(out, tuple) else out


def _check(x: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(x).all():
        raise DipSVDError(f"NaN or infinite activations at {name} while refining; load the model in float32")
    return x


class _GroupStats:
    """The accumulator of one input group: what its closed form needs, added window by window on the
    compressed path, in float64. Always the Gram G^ = X^ X^^T, (in, in). A plain group adds the cross-Gram
    C = X X^^T, (in, in), with X the original inputs; the residual-writing Linear (`full`) adds instead the
    whole numerator (B - R^) X^^T, (hidden, in), and keeps each window's X^ and r^, (tokens, in) and
    (tokens, hidden), to give the next block its inputs once the Linear is refined."""

    def __init__(self, full: bool):
        self.full = full
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.numerator: torch.Tensor | None = None
        self.kept_x: list[torch.Tensor] = []
        self.kept_r: list[torch.Tensor] = []

    def _add_gram(self, xh: torch.Tensor) -> None:
        if self.gram is None:
            dim = xh.shape[-1]
            self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=xh.device)
            if not self.full:
                self.cross = torch.zeros(dim, dim, dtype=torch.float64, device=xh.device)
        self.gram += (xh.T @ xh).double()

    def add(self, xh: torch.Tensor, x: torch.Tensor) -> None:
        """A plain group's window: X^ (tokens, in) in float32 and the original X (tokens, in)."""
        self._add_gram(xh)
        self.cross += (x.float().T @ xh).double()

    def add_residual(self, x_raw: torch.Tensor, r_h: torch.Tensor, block_out: torch.Tensor) -> None:
        """The residual-writing Linear's window: its input X^ (tokens, in), the compressed path's residual r^
        (tokens, hidden) and the original block's output B, whatever its shape."""
        xh = x_raw.float()
        self.kept_x.append(x_raw)
        self.kept_r.append(r_h)
        # B - R^ with B the original block's output: (B - R^) X^^T = W C + (R - R^) X^^T
        d = (block_out.reshape(-1, r_h.shape[-1]) - r_h).float()
        part = (d.T @ xh).double()
        self.numerator = part if self.numerator is None else self.numerator + part
        self._add_gram(xh)

    def check(self, name: str) -> None:
        _check(self.gram, name)  # a NaN in any window's X or X^ reaches G^ or C: one check per group
        _check(self.numerator if self.full else self.cross, name)

    def outputs(self, refined, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """full: the block's outputs r^ + the refined last Linear, per window, shaped as `like`: the block
        need not run again."""
        return [(self.kept_r[i] + refined(self.kept_x[i])).reshape(like[i].shape) for i in range(len(like))]


class _BlockWalk:
    """One block on both paths. `run_original` runs the original block once and keeps every input group's X;
    `compressed_inputs` runs the compressed path up to one group; `install` puts a refined matrix in place on
    the compressed path; `advance` gives the next block its compressed-path inputs; `restore` puts every
    replaced forward back, leaving the model as it came."""

    def __init__(self, block: nn.Module, base: str, wanted: set[str], orig: BlockInputs, hat: BlockInputs):
        self.block, self.orig, self.hat = block, orig, hat
        self.n_win = len(orig.hidden)
        self.linears = {f"{base}.{n}": m for n, m in block.named_modules()
                        if isinstance(m, nn.Linear) and f"{base}.{n}" in wanted}
        self.group_of: dict[str, str] = {}  # Linear -> the first Linear called on the same input tensor
        self.taken: dict[str, list[torch.Tensor]] = {}  # group -> its original inputs X per window, (tokens, in)
        self.seen: dict[int, tuple[torch.Tensor, str]] = {}  # this window's inputs so far (shared inputs once)
        self.unkept: set[str] = set()  # groups whose original inputs X are not needed
        self.current = [0]  # the window the compressed path is running, for the children's kept outputs
        self.kept: dict[nn.Module, list] = {}  # a finished child's output per window, while it is being recorded
        self.calls: dict[nn.Module, int] = {}
        self.replayed: set[nn.Module] = set()
        self.children = [m for m in block.children() if any(isinstance(x, nn.Linear) for x in m.modules())]
        self.swaps: list = []  # restore functions of the replaced forwards, undone when the block is done
        self.next_hidden: list[torch.Tensor] | None = None  # the refined block's outputs, if the last group gives them

    def _take(self, name: str):
        def hook(module, args):
            x = args[0]
            hit = self.seen.get(id(x))
            if hit is not None and hit[0] is x:
                self.group_of[name] = hit[1]
                return
            self.seen[id(x)] = (x, name)
            self.group_of[name] = name
            if name not in self.unkept:
                self.taken.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]))
        return hook

    def residual_writer(self, ranks: dict[str, int | None]) -> str | None:
        """The block's last Linear when nothing with weights runs after it: it writes straight into the residual
        stream (Llama, Mistral, Qwen2: block output = r + down_proj(x)), and its target also takes back the drift
        r - r^ (4. in the module docstring). None when it shares its inputs or stays dense (the plain targets).
        One window finds it; the probe only groups the inputs, it keeps none."""
        finished: list[nn.Module] = []
        leaves = [m for m in self.block.modules() if next(m.parameters(recurse=False), None) is not None]
        probes = [m.register_forward_hook(lambda mod, a, y: finished.append(mod)) for m in leaves]
        probes += [m.register_forward_pre_hook(self._take(n)) for n, m in self.linears.items()]
        self.unkept.update(self.linears)
        try:
            self.block(self.orig.hidden[0], **self.orig.kwargs[0])
        finally:
            for h in probes:
                h.remove()
        last = next((n for n, m in self.linears.items() if finished and m is finished[-1]), None)
        alone = [n for n in self.linears if self.group_of.get(n) == last]
        if last is None or alone != [last] or ranks.get(last) is None:
            last = None
        self.unkept.clear()
        self.group_of.clear()
        self.seen.clear()
        return last

    def run_original(self, last: str | None) -> list[str]:
        """1. The original block, window by window: every group's original inputs X (but `last`'s, whose target
        takes the block's outputs instead), and the original path's next inputs. Returns the groups' leaders in
        the order the block calls them."""
        if last is not None:
            self.unkept.add(last)
        handles = [m.register_forward_pre_hook(self._take(n)) for n, m in self.linears.items()]
        try:
            for i in range(self.n_win):
                self.seen.clear()
                self.orig.hidden[i] = _block_out(self.block(self.orig.hidden[i], **self.orig.kwargs[i]))
        finally:
            for h in handles:
                h.remove()
        self.seen.clear()
        return [n for n in self.group_of if self.group_of[n] == n]

    def _record(self, child: nn.Module):
        def hook(module, args, kwargs, y):
            self.calls[module] = self.calls.get(module, 0) + 1
            self.kept.setdefault(module, [None] * self.n_win)[self.current[0]] = y
        return hook

    def compressed_inputs(self, leader: str, full: bool) -> _GroupStats:
        """2. This group's compressed-path inputs X^, the groups before it already refined, gathered window by
        window. A plain group's forward stops at its leader (a pre-hook raises _Stop); the residual-writing
        Linear (`full`) keeps X^ and adds nothing, so the block returns r^ itself."""
        stats, got = _GroupStats(full), []
        linear = self.linears[leader]

        def stop(module, args):
            raise _Stop(args[0].detach().reshape(-1, args[0].shape[-1]))

        def silent(x):
            got.append(x.detach().reshape(-1, x.shape[-1]))
            return x.new_zeros(*x.shape[:-1], linear.out_features)

        if full:
            restore = _replace_forward(linear, silent)
        else:
            handle = linear.register_forward_pre_hook(stop)
        self.kept.clear()
        self.calls.clear()
        recorders = [] if full else [c.register_forward_hook(self._record(c), with_kwargs=True)
                                     for c in self.children if c not in self.replayed]
        try:
            for i in range(self.n_win):
                self.current[0] = i
                try:
                    out_h, xh = _block_out(self.block(self.hat.hidden[i], **self.hat.kwargs[i])), None
                except _Stop as e:
                    xh = e.args[0].float()
                if xh is not None:  # outside the except: the stopped block's frames are let go first
                    stats.add(xh, self.taken[leader][i])
                elif full:
                    stats.add_residual(got.pop(), out_h.reshape(-1, out_h.shape[-1]), self.orig.hidden[i])
                else:
                    raise DipSVDError(f"{leader} was not called on the compressed path; this block's "
                                      "structure is not supported by refine")
        finally:
            if full:
                restore()
            else:
                handle.remove()
            for h in recorders:
                h.remove()
        self._replay_finished()
        stats.check(leader)
        return stats

    def _replay_finished(self) -> None:
        """A child of the block that finished before this group's inputs were reached, once per window, holds only
        matrices already refined (or dense) and takes inputs no later group changes: its outputs are the same in
        every later run of the compressed path, so they are kept and replayed instead of running it again (the
        attention, for the gate/up and down groups of a Llama block)."""
        for child, ys in self.kept.items():
            if self.calls[child] == self.n_win and all(y is not None for y in ys):
                self.swaps.append(_replace_forward(child, _replay(ys, self.current)))
                self.replayed.add(child)
        self.kept.clear()

    def install(self, name: str, u: torch.Tensor, v: torch.Tensor):
        """(u, v) in the model's dtype on the host, and the refined forward now in place of the Linear's on the
        compressed path: its two factors, so the dense product is not computed there."""
        linear = self.linears[name]
        with weights_of(linear):
            dev, dt = linear.weight.device, linear.weight.dtype
            bias = None if linear.bias is None else linear.bias.detach().clone()
        host = (u.to("cpu", dt), v.to("cpu", dt))
        refined = _low_rank(u.to(dev, dt), v.to(dev, dt), bias)
        self.swaps.append(_replace_forward(linear, refined))
        return host, refined

    def advance(self) -> None:
        """The refined block on the compressed path gives the next block its inputs (already at hand when the last
        group was the residual-writing Linear: r^ + its refined output)."""
        for i in range(self.n_win):
            self.current[0] = i
            self.hat.hidden[i] = self.next_hidden[i] if self.next_hidden is not None else _block_out(
                self.block(self.hat.hidden[i], **self.hat.kwargs[i]))

    def restore(self) -> None:
        for undo in reversed(self.swaps):
            undo()


def _closed_form(stats: _GroupStats, leader: str, members: dict[str, nn.Linear], spec: FactorSpec,
                 compute: torch.dtype, damp: float, abs_means: dict | None, fisher_rows: dict | None):
    """3. The group's factors from its statistics: the least-squares targets W* (step 1 of the module docstring;
    for the residual-writing Linear the whole numerator (B - R^) X^^T), then the method's whitened truncation
    against G^ (steps 2 and 3, through factor_model). Returns (factors, eigenvalues of G^ floored)."""
    targets = {}
    solve, floored = solver(stats.gram, compute, damp)  # one factorisation of G^ for the whole group
    for n, linear in members.items():
        if stats.full:  # the whole numerator, W C + (R - R^) X^^T, is at hand
            targets[n] = solve(stats.numerator)
            continue
        with weights_of(linear):
            targets[n], _ = least_squares_target(linear.weight.detach(), stats.cross, stats.gram, compute, damp,
                                                 solve=solve)
    factors = factor_model(targets, spec, {n: leader for n in members}, {leader: stats.gram}, abs_means,
                           fisher_rows)
    return factors, floored


@torch.no_grad()
def refine(model: nn.Module, names: list[str], windows: torch.Tensor, spec: FactorSpec, ranks: dict[str, int | None],
           abs_means: dict | None = None, fisher_rows: dict | None = None, progress=None,
           damp: float = DAMP, residual: bool = RESIDUAL) -> tuple[dict, dict]:
    """Refined (u, v) of every matrix that `ranks` factors, from one streaming pass over `windows`.
    Returns (weights, info) with info: seconds and the number of eigenvalues of G^ floored.

    Within a block the input groups are refined in the order the block calls them (q/k/v, o, gate/up,
    down for Llama): the compressed-path inputs of a group are taken with the groups before it already
    refined, since those are the inputs it will see in the compressed model. Each group's inputs are
    taken by a forward that stops at that group."""
    t0 = time.perf_counter()
    prefix, blocks = find_blocks(model)
    wanted = set(names)
    compute = torch.float64 if spec.compute == "float64" else torch.float32
    orig = capture_inputs(model, blocks, windows)
    hat = BlockInputs(list(orig.hidden), orig.kwargs)  # identical until block 0 is compressed
    out, floored = {}, 0
    n_blocks = len(blocks)
    for b, block in enumerate(blocks):
        walk = _BlockWalk(block, f"{prefix}.{b}" if prefix else str(b), wanted, orig, hat)
        last = walk.residual_writer(ranks) if residual else None
        leaders = walk.run_original(last)
        try:
            for j, leader in enumerate(leaders):
                members = [n for n in walk.linears if walk.group_of.get(n) == leader and ranks.get(n) is not None]
                if members:
                    stats = walk.compressed_inputs(leader, leader == last)
                    factors, k = _closed_form(stats, leader, {n: walk.linears[n] for n in members}, spec, compute,
                                              damp, abs_means, fisher_rows)
                    floored += k
                    for n in members:
                        out[n], refined = walk.install(n, *factors[n].low_rank(ranks[n]))
                    if stats.full:  # the group's one member: the block's outputs without running it again
                        walk.next_hidden = stats.outputs(refined, hat.hidden)
                    del factors, stats
                walk.taken.pop(leader, None)
                if progress:
                    progress((b + (j + 1) / (len(leaders) + 1)) / n_blocks,
                             f"block {b + 1}/{n_blocks}: refining {leader.rsplit('.', 1)[-1]}")
            walk.advance()
        finally:
            walk.restore()  # also when a group fails: the model is left as it came
        release_host_memory()
    if progress:
        progress(1.0, f"block {n_blocks}/{n_blocks}: refined")
    return out, {"seconds": time.perf_counter() - t0, "floored": floored}
