"""One block on both paths (BlockWalk): the original run that keeps every input group's X, the compressed runs that
stop at a group, the children replayed from their kept outputs, the refined forwards put in place; and where the
kept activations live (Park: on the device, or parked on the host when the block is offloaded)."""
from __future__ import annotations

import torch
from torch import nn

from ..common.errors import DipSVDError
from ..engine.stats import matmul_precision
from ..engine.stream import BlockInputs
from ..model.offload import weights_of
from .closed_form import GroupStats, gram_precision


def replace_forward(module: nn.Module, forward):
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


def low_rank(u: torch.Tensor, v: torch.Tensor | None, bias: torch.Tensor | None):
    """The forward of the pair (u, v), or of the dense matrix u where v is None, in the inputs' dtype (the float32
    masters of block tuning run on a bfloat16 model's activations)."""
    def forward(x):
        z = x if v is None else nn.functional.linear(x, v.to(x.dtype))
        z = nn.functional.linear(z, u.to(x.dtype))
        return z + bias.to(z.dtype) if bias is not None else z
    return forward


def _replay(outputs: list, current: list, park: "Park"):
    """A forward that returns the kept output of the current window, as a copy: a block may add to what a child
    returns in place (a cheap copy next to the child's own cost)."""
    def fresh(y):
        if isinstance(y, torch.Tensor):
            return y.clone()
        return type(y)(fresh(v) for v in y) if isinstance(y, tuple) and not hasattr(y, "_fields") else y

    def forward(*args, **kwargs):
        return fresh(park.get(outputs[current[0]]))
    return forward


PARK_CHECK = False  # tests only: see Park


class _Stop(Exception):
    """Raised by a pre-hook once the input it waits for is taken: the rest of the block is not run."""


def block_out(out):
    return out[0] if isinstance(out, tuple) else out


class Park:
    """Where refine keeps its per-window activations between uses (the two paths' block inputs and outputs, each
    group's original inputs X, a replayed child's outputs): in host memory when the blocks run on a GPU, one
    window's brought back to the device at a time (Llama-3-8B at 256 x 2048: 4.3 GB per set of activations,
    several sets), else where they are. `get` gives a kept tensor (or tuple) back on the device.
    With PARK_CHECK (tests only) a kept tensor is wrapped in _Parked, which no torch operation takes: a use that
    forgets `get` then fails on the CPU as it would on a GPU."""

    def __init__(self, device: torch.device):
        self.device, self.host = device, device.type == "cuda"

    def put(self, x):
        if isinstance(x, tuple) and not hasattr(x, "_fields"):
            return tuple(self.put(v) for v in x)
        if not isinstance(x, torch.Tensor):
            return x
        x = x.to("cpu") if self.host else x
        return _Parked(x) if PARK_CHECK else x

    def get(self, x):
        if isinstance(x, tuple) and not hasattr(x, "_fields"):
            return tuple(self.get(v) for v in x)
        if isinstance(x, _Parked):
            x = x.tensor
        return x.to(self.device) if isinstance(x, torch.Tensor) else x


class _Parked:
    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class BlockWalk:
    """One block on both paths. `run_original` runs the original block once and keeps every input group's X;
    `compressed_inputs` runs the compressed path up to one group; `install` puts a refined matrix in place on
    the compressed path; `advance` gives the next block its compressed-path inputs; `restore` puts every
    replaced forward back, leaving the model as it came."""

    def __init__(self, block: nn.Module, base: str, wanted: set[str], orig: BlockInputs, hat: BlockInputs,
                 park: Park, held: frozenset | None = None):
        self.block, self.orig, self.hat, self.park, self.base = block, orig, hat, park, base
        self.held = held  # the held-out windows when refine validates (then the original Grams are summed)
        self.orig_grams: dict[str, list] = {}  # group -> [X X^T on the fit windows, on the held-out ones]
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

    def _take(self, name: str):
        def hook(module, args):
            x = args[0]
            hit = self.seen.get(id(x))
            if hit is not None and hit[0] is x:
                self.group_of[name] = hit[1]
                return
            self.seen[id(x)] = (x, name)
            self.group_of[name] = name
            part = int(self.held is not None and self.current[0] in self.held)
            # the original inputs' Gram X X^T, fit and held-out parts apart (the residual-writing Linear's held-out
            # error reads ||B - R^||^2 instead: its held-out part is not needed)
            if self.held is not None and not (part and name in self.unkept):
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                parts = self.orig_grams.setdefault(name, [None, None])
                with matmul_precision(gram_precision(x)):
                    g = (flat.T @ flat).double()
                parts[part] = g if parts[part] is None else parts[part] + g
            if name not in self.unkept:
                self.taken.setdefault(name, []).append(self.park.put(x.detach().reshape(-1, x.shape[-1])))
        return hook

    def solo(self, name: str) -> bool:
        """Whether `name` alone reads its input (known once run_original has grouped the inputs)."""
        return sum(g == self.group_of.get(name) for g in self.group_of.values()) == 1

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
        held, self.held = self.held, None  # the probe sums nothing
        try:
            self.block(self.park.get(self.orig.hidden[0]), **self.orig.kwargs[0])
        finally:
            self.held = held
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
                self.current[0] = i
                out = block_out(self.block(self.park.get(self.orig.hidden[i]), **self.orig.kwargs[i]))
                self.orig.hidden[i] = self.park.put(out)
        finally:
            for h in handles:
                h.remove()
        self.seen.clear()
        return [n for n in self.group_of if self.group_of[n] == n]

    def _record(self, child: nn.Module):
        def hook(module, args, kwargs, y):
            self.calls[module] = self.calls.get(module, 0) + 1
            self.kept.setdefault(module, [None] * self.n_win)[self.current[0]] = self.park.put(y)
        return hook

    def compressed_inputs(self, leader: str, full: bool, held: frozenset = frozenset()) -> GroupStats:
        """2. This group's compressed-path inputs X^, the groups before it already refined, gathered window by
        window. A plain group's forward stops at its leader (a pre-hook raises _Stop); the residual-writing
        Linear (`full`) keeps X^ and adds nothing, so the block returns r^ itself."""
        stats, got = GroupStats(full, held), []
        if held:
            stats.orig_fit, stats.held.gram_x = self.orig_grams.pop(leader)  # one group's at a time
        linear = self.linears[leader]

        def stop(module, args):
            raise _Stop(args[0].detach().reshape(-1, args[0].shape[-1]))

        def silent(x):
            got.append(x.detach().reshape(-1, x.shape[-1]))
            return x.new_zeros(*x.shape[:-1], linear.out_features)

        if full:
            restore = replace_forward(linear, silent)
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
                    out_h, xh = block_out(self.block(self.park.get(self.hat.hidden[i]), **self.hat.kwargs[i])), None
                except _Stop as e:
                    xh = e.args[0]  # in the model's dtype: GroupStats.add picks the precision
                if xh is not None:  # outside the except: the stopped block's frames are let go first
                    stats.add(i, xh, self.park.get(self.taken[leader][i]))
                elif full:
                    stats.add_residual(i, got.pop(), out_h.reshape(-1, out_h.shape[-1]),
                                       self.park.get(self.orig.hidden[i]))
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
                self.swaps.append(replace_forward(child, _replay(ys, self.current, self.park)))
                self.replayed.add(child)
        self.kept.clear()

    def install(self, name: str, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, v) in the model's dtype on the host, with the refined forward now in place of the Linear's on the
        compressed path: its two factors, so the dense product is not computed there."""
        linear = self.linears[name]
        with weights_of(linear):
            dev, dt = linear.weight.device, linear.weight.dtype
            bias = None if linear.bias is None else linear.bias.detach().clone()
        host = (u.to("cpu", dt), None if v is None else v.to("cpu", dt))
        self.swaps.append(replace_forward(linear, low_rank(u.to(dev, dt), None if v is None else v.to(dev, dt),
                                                             bias)))
        return host

    def advance(self) -> None:
        """The refined block on the compressed path gives the next block its inputs (its finished children, the
        attention, replayed: what runs again is the rest, the MLP of a Llama block)."""
        for i in range(self.n_win):
            self.current[0] = i
            out = block_out(self.block(self.park.get(self.hat.hidden[i]), **self.hat.kwargs[i]))
            self.hat.hidden[i] = self.park.put(out)

    def restore(self) -> None:
        for undo in reversed(self.swaps):
            undo()
