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
    n_blocks, n_win = len(blocks), len(orig.hidden)
    for b, block in enumerate(blocks):
        base = f"{prefix}.{b}" if prefix else str(b)
        linears = {f"{base}.{n}": m for n, m in block.named_modules()
                   if isinstance(m, nn.Linear) and f"{base}.{n}" in wanted}
        # 1. the original block: every group's original inputs X, per window (shared inputs once)
        group_of: dict[str, str] = {}
        taken: dict[str, list[torch.Tensor]] = {}
        seen: dict[int, tuple[torch.Tensor, str]] = {}
        unkept: set[str] = set()  # groups whose original inputs X are not needed

        def take(name):
            def hook(module, args):
                x = args[0]
                hit = seen.get(id(x))
                if hit is not None and hit[0] is x:
                    group_of[name] = hit[1]
                    return
                seen[id(x)] = (x, name)
                group_of[name] = name
                if name not in unkept:
                    taken.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]))
            return hook

        # The block's last Linear, when nothing with weights runs after it, writes straight into the
        # residual stream (Llama, Mistral, Qwen2: block output = r + down_proj(x)); with `residual` its
        # target also takes back the drift r - r^ of the residual stream. One window finds it.
        last = None
        if residual:
            finished: list[nn.Module] = []
            leaves = [m for m in block.modules() if next(m.parameters(recurse=False), None) is not None]
            probes = [m.register_forward_hook(lambda mod, a, y: finished.append(mod)) for m in leaves]
            probes += [m.register_forward_pre_hook(take(n)) for n, m in linears.items()]
            unkept.update(linears)  # the probe only groups
            try:
                block(orig.hidden[0], **orig.kwargs[0])
            finally:
                for h in probes:
                    h.remove()
            last = next((n for n, m in linears.items() if finished and m is finished[-1]), None)
            alone = [n for n in linears if group_of.get(n) == last]
            if last is None or alone != [last] or ranks.get(last) is None:
                last = None  # the last Linear shares its inputs, or stays dense: the plain targets
            unkept.clear()
            if last is not None:
                unkept.add(last)  # its target takes the block's outputs instead (4. in the module docstring)
            group_of.clear()
            seen.clear()
        handles = [m.register_forward_pre_hook(take(n)) for n, m in linears.items()]
        try:
            for i in range(n_win):
                seen.clear()
                orig.hidden[i] = _block_out(block(orig.hidden[i], **orig.kwargs[i]))
        finally:
            for h in handles:
                h.remove()
        seen.clear()

        current = [0]  # the window the compressed path is running, for the children's kept outputs
        kept: dict[nn.Module, list] = {}  # a finished child's output per window, while it is being recorded
        calls: dict[nn.Module, int] = {}
        replayed: set[nn.Module] = set()
        children = [m for m in block.children() if any(isinstance(x, nn.Linear) for x in m.modules())]

        def record(child):
            def hook(module, args, kwargs, y):
                calls[module] = calls.get(module, 0) + 1
                kept.setdefault(module, [None] * n_win)[current[0]] = y
            return hook

        swaps = []  # restore functions of the replaced forwards, undone when the block is done
        next_hidden: list[torch.Tensor] | None = None  # the refined block's outputs, when the last group gives them
        leaders = [n for n in group_of if group_of[n] == n]  # in the order the block calls them
        try:
            for j, leader in enumerate(leaders):
                members = [n for n in linears if group_of.get(n) == leader and ranks.get(n) is not None]
                if members:
                    # 2. this group's compressed-path inputs X^, the groups before it already refined
                    gram = cross = numerator = None  # G^, C; full: the whole numerator (B - R^) X^^T
                    full = leader == last  # the residual-writing Linear, alone in its group and factored
                    got: list[torch.Tensor] = []
                    kept_x: list[torch.Tensor] = []  # full: the last Linear's inputs X^ and the residual r^, per window
                    kept_r: list[torch.Tensor] = []

                    def stop(module, args):
                        raise _Stop(args[0].detach().reshape(-1, args[0].shape[-1]))

                    def silent(x):  # full: keeps X^ and adds nothing, so the block returns r^ itself
                        got.append(x.detach().reshape(-1, x.shape[-1]))
                        return x.new_zeros(*x.shape[:-1], linears[leader].out_features)

                    if full:
                        restore = _replace_forward(linears[leader], silent)
                    else:
                        handle = linears[leader].register_forward_pre_hook(stop)
                    kept.clear()
                    calls.clear()
                    recorders = [] if full else [c.register_forward_hook(record(c), with_kwargs=True)
                                                 for c in children if c not in replayed]
                    try:
                        for i in range(n_win):
                            current[0] = i
                            try:
                                out_h = _block_out(block(hat.hidden[i], **hat.kwargs[i]))
                                if not full:
                                    raise DipSVDError(f"{leader} was not called on the compressed path; this block's "
                                                      "structure is not supported by refine")
                                x_raw = got.pop()
                                xh = x_raw.float()
                                r_h = out_h.reshape(-1, out_h.shape[-1])
                                kept_x.append(x_raw)
                                kept_r.append(r_h)
                                # B - R^ with B the original block's output: (B - R^) X^^T = W C + (R - R^) X^^T
                                d = (orig.hidden[i].reshape(-1, out_h.shape[-1]) - r_h).float()
                                part = (d.T @ xh).double()
                                numerator = part if numerator is None else numerator + part
                            except _Stop as e:
                                xh = e.args[0].float()
                            if gram is None:
                                dim = xh.shape[-1]
                                gram = torch.zeros(dim, dim, dtype=torch.float64, device=xh.device)
                                if not full:
                                    cross = torch.zeros(dim, dim, dtype=torch.float64, device=xh.device)
                            gram += (xh.T @ xh).double()
                            if not full:
                                cross += (taken[leader][i].float().T @ xh).double()
                    finally:
                        if full:
                            restore()
                        else:
                            handle.remove()
                        for h in recorders:
                            h.remove()
                    # A child of the block that finished before this group's inputs were reached, once per window,
                    # holds only matrices already refined (or dense) and takes inputs no later group changes: its
                    # outputs are the same in every later run of the compressed path, so they are kept and replayed
                    # instead of running it again (the attention, for the gate/up and down groups of a Llama block).
                    for child, ys in kept.items():
                        if calls[child] == n_win and all(y is not None for y in ys):
                            swaps.append(_replace_forward(child, _replay(ys, current)))
                            replayed.add(child)
                    kept.clear()
                    _check(gram, leader)  # a NaN in any window's X or X^ reaches G^ or C: one check per group
                    _check(numerator if full else cross, leader)
                    # 3. refine the group's factored matrices against (C, G^)
                    targets = {}
                    solve, k = solver(gram, compute, damp)  # one factorisation of G^ for the whole group
                    floored += k
                    for n in members:
                        if full:  # the whole numerator, W C + (R - R^) X^^T, is at hand
                            targets[n] = solve(numerator)
                            continue
                        with weights_of(linears[n]):
                            targets[n], _ = least_squares_target(linears[n].weight.detach(), cross, gram, compute, damp,
                                                                 solve=solve)
                    factors = factor_model(targets, spec, {n: leader for n in members}, {leader: gram}, abs_means,
                                           fisher_rows)
                    for n in members:
                        u, v = factors[n].low_rank(ranks[n])
                        with weights_of(linears[n]):
                            dev, dt = linears[n].weight.device, linears[n].weight.dtype
                            bias = None if linears[n].bias is None else linears[n].bias.detach().clone()
                        out[n] = (u.to("cpu", dt), v.to("cpu", dt))  # kept, in the model's dtype, on the host
                        # the refined matrix in place of the original on the compressed path: its forward replaced,
                        # so the dense product is not computed there
                        refined = _low_rank(u.to(dev, dt), v.to(dev, dt), bias)
                        swaps.append(_replace_forward(linears[n], refined))
                    if full:  # the block output is r^ + the refined last Linear (the group's one member): no need
                        # to run the block again
                        next_hidden = [(kept_r[i] + refined(kept_x[i])).reshape(hat.hidden[i].shape)
                                       for i in range(n_win)]
                    del factors, targets, gram, cross, kept_x, kept_r
                taken.pop(leader, None)
                if progress:
                    progress((b + (j + 1) / (len(leaders) + 1)) / n_blocks,
                             f"block {b + 1}/{n_blocks}: refining {leader.rsplit('.', 1)[-1]}")
            # 4. the refined block on the compressed path gives the next block its inputs (already at hand when
            # the last group was the residual-writing Linear: r^ + its refined output)
            for i in range(n_win):
                current[0] = i
                hat.hidden[i] = next_hidden[i] if next_hidden is not None else _block_out(block(hat.hidden[i],
                                                                                                 **hat.kwargs[i]))
        finally:
            for undo in reversed(swaps):  # also when a group fails: the model is left as it came
                undo()
        release_host_memory()
    if progress:
        progress(1.0, f"block {n_blocks}/{n_blocks}: refined")
    return out, {"seconds": time.perf_counter() - t0, "floored": floored}
