"""memwatch: the measured peak of each phase (the report's memory.phases)."""
import numpy as np

from dipsvd_core.engine.memwatch import PhaseMemory, _host_peak


def test_a_phase_peak_is_its_own_and_includes_the_phases_inside_it():
    """A 400 MB array made and freed before a phase does not count in it; a 240 MB one inside an inner phase
    counts in the inner and the outer phase; a later phase starts from the baseline again."""
    w = PhaseMemory()
    big = np.ones(50_000_000)
    big[:] = 2.0
    del big
    base = _host_peak()
    with w.phase("outer"):
        small = np.ones(10_000_000)  # 80 MB
        del small
        with w.phase("inner"):
            mid = np.ones(30_000_000)  # 240 MB
            del mid
    with w.phase("later"):
        pass
    mb = {n: p["host_peak_bytes"] / 2**20 for n, p in w.phases.items()}
    if w.phases["later"].get("since_start"):  # no /proc/self/clear_refs: lifetime peaks only
        assert mb["outer"] >= mb["inner"]
        return
    assert mb["outer"] >= mb["inner"] >= mb["later"] + 200, mb  # the inner 240 MB are the outer's peak too
    assert mb["later"] < base / 2**20 - 300, mb  # reset: the 400 MB freed before (in base) are not counted
    assert set(w.report()) == {"outer", "inner", "later"}


def test_a_phase_run_twice_keeps_its_highest_peak_and_sums_its_seconds():
    w = PhaseMemory()
    with w.phase("eval"):
        a = np.ones(20_000_000)
        del a
    first = w.phases["eval"]["host_peak_bytes"]
    with w.phase("eval"):
        pass
    assert w.phases["eval"]["host_peak_bytes"] == first
    assert w.phases["eval"]["seconds"] > 0
