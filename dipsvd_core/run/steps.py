"""The passes as objects: each pass the engine can run (engine.passes names it and holds its plan phase, its cost
in a user's words and its button text, which the plan and the app read there), with what a run does for it: `done(bench, settings)`, whether its result for
these settings is in memory (or, for a probe, in the disk cache), and `run(bench, settings, ...)`, which makes it.
The app's "this needs ..." buttons, `Workbench.quick_build` and the report read them; a new pass is one entry here
and its name in engine.passes; a probe's object is made from its registration (allocation.probes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import plan
from ..allocation.probes import PROBES, probe_of
from ..engine import passes as P
from ..methods.handlers import handler, needs


def _never(bench, settings) -> bool:
    return False


@dataclass(frozen=True)
class Pass:
    """A pass with every verb a run, the plan and the app use: `done` and `run` here; its phase, its cost in a user's
    words and the app's button from its declaration (engine.passes); `memory` and `seconds` from the plan's
    registered function for its phase (plan.memory.cost_of, plan.timing.time_of; a probe's from the probes'
    registry). The plan's functions live in the plan (a lower layer than this one) and are found by the phase."""

    name: str
    done: Callable[..., bool] = _never  # (bench, settings) -> its result is here
    run: Callable[..., object] | None = None  # (bench, settings, progress, callback, cancel) -> its result

    @property
    def phase(self) -> str:
        return P.PHASE[self.name]

    @property
    def cost(self) -> str | None:
        """Its cost in a user's words (the Grams', inside the statistics pass, are that pass's)."""
        return P.COST.get(self.name) or P.COST.get(self.phase)

    @property
    def ask(self) -> tuple[str, str, str] | None:
        """(what it gives, the app's button, the job's title), where the app runs it on its own."""
        return P.ASK.get(self.name)

    def memory(self, sh, run, cuda: bool, runtime: int = 0):
        """Its phase's predicted bytes (plan.Phase: host, device, disk) for these shapes and run."""
        return plan.memory(sh, run, cuda, runtime)[self.phase]

    def seconds(self, sh, run, rates) -> float:
        """Its phase's predicted seconds at the microbenchmark's `rates` (plan.timing.Rates)."""
        phases = plan.memory(sh, run, False, 0)
        plan.timing(phases, sh, run, rates)
        return phases[self.phase].seconds


def _factors_here(bench, s) -> bool:
    return bench.factor_cache.has(s.spec)


def _make_factors(bench, s, progress, callback, cancel):
    return bench.factors(s.spec, progress)


STEPS = {p.name: p for p in (
    Pass(P.WRITING),  # inside the first draw of the windows (run/calibration.py)
    Pass(P.STATISTICS, lambda bench, s: bench.data.has_stats,
         lambda bench, s, progress, callback, cancel: bench.stats(progress)),
    Pass(P.GRAMS, _factors_here, _make_factors),
    Pass(P.FISHER, lambda bench, s: bench.data.has_fisher,
         lambda bench, s, progress, callback, cancel: bench.fisher(progress)),
    Pass(P.FACTORS, _factors_here, _make_factors),
    Pass(P.SEARCH, run=lambda bench, s, progress, callback, cancel: bench.allocate(s, progress, callback, cancel)),
    Pass(P.TRAINING, lambda bench, s: handler(s.method).prepared(bench.context, s),
         lambda bench, s, progress, callback, cancel: handler(s.method).prepare(bench.context, s, progress, callback,
                                                                                cancel)),
    Pass(P.UPDATE),
    Pass(P.REFINE),
    Pass(P.DISTILL),
)}

assert set(STEPS) == set(P.PASSES) - {p.step for p in PROBES.values()}, "every pass but the probes has its object here"


def _probe_step(kind: str) -> Pass:
    return Pass(PROBES[kind].step, lambda bench, s: bench.probes.has(s, kind),
                lambda bench, s, progress, callback, cancel: bench.probes.measure(s, kind, progress))


def step(name: str) -> Pass:
    """Pass `name`'s object: one of STEPS, or a registered probe's (allocation.probes)."""
    found = probe_of(name)
    return _probe_step(found.kind) if found is not None else STEPS[name]


def done(bench, name: str, settings) -> bool:
    """Whether what pass `name` gives for these settings is here."""
    return step(name).done(bench, settings)


def run(bench, name: str, settings, progress=None, callback=None, cancel=None):
    """Run pass `name` for these settings (the app's buttons call this); a search returns its allocation."""
    found = step(name)
    if found.run is None:
        raise ValueError(f"the {name} pass runs inside the build; it has no step of its own")
    return found.run(bench, settings, progress, callback, cancel)


def missing(bench, settings, allocation_given: bool = False) -> list[str]:
    """The passes these settings need that have not run yet, in the order of engine.passes.PASSES."""
    want = needs(settings, allocation_given)
    return [p for p in P.PASSES if p in want and not done(bench, p, settings)]
