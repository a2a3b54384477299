"""Step 4 of the flow, by name: every allocation is a registered strategy that declares what it needs.

An `AllocationStrategy` has its name, the passes it reads (passes.py), its help text, whether the app can
recompute it cheaply (`reproducible`; a search is kept instead, and extra ratios fall back to `fallback`),
and `allocate(ctx, settings, bounds, progress, callback, cancel)`, where `ctx` is what the run hands it (context.py:
the model, the windows, the caches; never the run itself). `Workbench.allocate` is one lookup; the CLI's choices, the sweep's grid, the plan's phases and the Allocation
page's options and buttons all read this registry. Whether a refined build can skip the factor pass follows from
the needs: an allocation that does not read `factors` (uniform, heuristic) leaves them to refine.

A new allocation is one function plus one `@register_allocation(...)` line (tests/extensions.py registers one at
test time); one that needs a probe of its own declares it with probes.register_probe and reads it with
`ctx.probe(kind)` (tests/extension_probe.py). The math the strategies call lives in allocation.py (the projector, uniform) and
allocators.py (heuristic, coupled, nested); Bayesian optimisation in bayes.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..common.errors import DipSVDError
from ..engine import passes as P
from . import allocators
from . import budget as alloc
from . import refined_search
from .probes import BLOCK_PROBE, TYPE_PROBE


@dataclass(frozen=True)
class AllocationStrategy:
    name: str
    allocate: Callable  # (ctx, settings, bounds, progress=None, callback=None, cancel=None) -> Allocation
    needs: frozenset = frozenset()
    help: str = ""
    reproducible: bool = True  # False: a search; the app keeps its result, other ratios use `fallback`
    fallback: str = "uniform"
    own_of: str | None = None  # a method's own allocation (Dobi-SVD's "trained"): its handler builds it
    unrefined_note: str = ""  # what the app says when it is built without refine
    follows_q: bool = False  # its per-block keep ratios are the heuristic's p_l = c Q_l: the app explains Q's ties
    search_refines: int = 0  # its search runs this many refine passes (the plan times its search by them)

    @property
    def reads_factors(self) -> bool:
        return P.FACTORS in self.needs

    def rebuildable(self) -> str:
        """The allocation a rebuild at another ratio uses: this one, or its fallback for a search."""
        return self.name if self.reproducible else self.fallback

    def shared(self) -> str:
        """The allocation rows of several methods share (a sweep): this one, or the fallback for a search or a
        method's own."""
        return self.name if self.reproducible and self.own_of is None else self.fallback


ALLOCATIONS: dict[str, AllocationStrategy] = {}
OBJECTIVE = "objective"  # the memo kind of BO's objective, keyed (factor key, objective, windows)


def register_allocation(name: str, **declared):
    """Decorator: register fn(ctx, settings, bounds, ...) as allocation `name` with its declared needs."""
    def wrap(fn):
        ALLOCATIONS[name] = AllocationStrategy(name, fn, **declared)
        return fn
    return wrap


def unregister_allocation(name: str) -> None:
    ALLOCATIONS.pop(name, None)


def strategy(name: str) -> AllocationStrategy:
    if name not in ALLOCATIONS:
        raise DipSVDError(f"unknown allocation '{name}'; use one of {', '.join(ALLOCATIONS)}")
    return ALLOCATIONS[name]


def names_for(method: str) -> list[str]:
    """The allocations a method can use: its own, if it has one, else every shared one."""
    own = [a for a, s in ALLOCATIONS.items() if s.own_of == method]
    return own or [a for a, s in ALLOCATIONS.items() if s.own_of is None]


# --- the built-in strategies ---

@register_allocation("uniform", help="every block keeps the same fraction (SVD-LLM)")
def _uniform(ctx, settings, bounds, **_):
    return alloc.uniform(ctx.targets, settings.ratio, **bounds)


@register_allocation("heuristic", needs=frozenset({P.STATISTICS, P.FISHER}), follows_q=True,
                     help="p_l proportional to Q_l = S̃^β R̃^(1-β) (DipSVD Eq. 13)")
def _heuristic(ctx, settings, bounds, progress=None, **_):
    return allocators.heuristic(ctx.importance(settings, progress)["Q"], ctx.targets, settings.ratio, **bounds)


@register_allocation("bayes", needs=frozenset({P.STATISTICS, P.FISHER, P.FACTORS, P.SEARCH}), reproducible=False,
                     help="Bayesian optimization of p_l on held-out calibration text (DipSVD Sec. 3.2.1)")
def _bayes(ctx, settings, bounds, progress=None, callback=None, cancel=None):
    from .bayes import Objective, bayes

    factors = ctx.factors(settings.spec, progress)
    objective = ctx.memo.get(OBJECTIVE, (settings.spec.key, settings.bo_objective, settings.bo_windows),
                             lambda: Objective(ctx.model, ctx.targets, factors,
                                               ctx.heldout(settings.bo_windows), settings.bo_objective))
    warm = [alloc.uniform(ctx.targets, settings.ratio, **bounds).p_blocks, _heuristic(ctx, settings, bounds,
                                                                                         progress).p_blocks]
    with ctx.timed(P.SEARCH):
        found = bayes(objective, ctx.targets, settings.ratio, warm, settings.bo_calls, settings.seed,
                      callback=callback, cancel=cancel, progress=progress, **bounds)
    return found


@register_allocation("coupled", needs=frozenset({P.FISHER, P.FACTORS, BLOCK_PROBE}),
                     help="one rank per matrix, minimising each matrix's estimated loss increase, calibrated by "
                          "probing every block (ours, not in the paper)")
def _coupled(ctx, settings, bounds, progress=None, **_):
    factors = ctx.factors(settings.spec, progress)
    return allocators.coupled(factors, ctx.coupled_weights(settings, progress), ctx.targets, settings.ratio,
                              **bounds)


@register_allocation("nested", needs=frozenset({P.STATISTICS, P.FISHER, P.FACTORS, TYPE_PROBE}), follows_q=True,
                     help="the heuristic's budget per block, split among each block's matrices by their estimated "
                          "loss, calibrated by probing every matrix type; best with Refine on the Compress page "
                          "(ours, not in the paper)",
                     unrefined_note="The nested allocation is meant to be refined: unrefined, its uneven split inside "
                                    "a block can cost more than the heuristic's even one (on the bundled model it loses "
                                    "at ratio 0.3), and refining takes that back.")
def _nested(ctx, settings, bounds, progress=None, **_):
    outer = _heuristic(ctx, settings, bounds, progress)
    return allocators.nested(outer, ctx.factors(settings.spec, progress), ctx.nested_weights(settings, progress),
                             ctx.targets, **bounds)


@register_allocation("refined-kl", needs=frozenset({P.STATISTICS, P.FISHER, P.FACTORS, TYPE_PROBE, P.SEARCH}),
                     reproducible=False, fallback="nested", search_refines=len(refined_search.CANDIDATES),
                     help="of uniform, heuristic and nested, the one whose refined model is closest to the original "
                          "(KL of the next-token distribution on held-out windows): one refine pass per candidate "
                          "(ours, not in the paper)",
                     unrefined_note="The refined-kl allocation is chosen by how its refined model scores: build it "
                                    "with Refine on.")
def _refined_kl(ctx, settings, bounds, progress=None, callback=None, cancel=None):
    candidates = {n: ALLOCATIONS[n].allocate(ctx, settings, bounds, progress=progress)
                  for n in refined_search.CANDIDATES}
    with ctx.timed(P.SEARCH):
        found = refined_search.refined_kl(ctx, settings, candidates, progress, callback, cancel)
    return found


@register_allocation("trained", own_of="dobi",
                     help="Dobi-SVD learns one truncation position per matrix by gradient descent (its own allocation)")
def _trained(ctx, settings, bounds, **_):
    raise DipSVDError("allocation 'trained' comes out of Dobi-SVD's training: build with method dobi "
                      "(Workbench.build) instead of allocating")
