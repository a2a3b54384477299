"""Long steps (loading, statistics, factoring, BO, evaluation) run in one background thread per
session, so that the page stays live: it shows progress, can cancel, and survives page switches.

A Job calls `fn(job)`; `fn` reports through `job.progress(fraction, message)`, may append BO values
to `job.values`/`job.best`, checks `job.cancel`, and stores its results itself (into the session's
Studio object, never into st.session_state, which a thread cannot touch).
"""
from __future__ import annotations

import gc
import logging
import threading
import time

from dipsvd_core.common import cores
from dipsvd_core.common.errors import DipSVDError

log = logging.getLogger(__name__)


def settle_heap() -> None:
    """Move every object alive now into the garbage collector's permanent generation (gc.freeze), after a
    full collection, so that no garbage is frozen with them.

    The app holds about half a million tracked objects once a model is loaded (torch, transformers,
    Streamlit, plotly, the model's modules). Python's full collections walk all of them: 14 of them cost 3.3 s
    of the app's 23 s load job, and one that lands in a 0.3 s build would nearly double it (issue 9).
    Frozen objects are never walked again; reference counting still frees them. The app calls this once
    at start-up and after each model load; each call unfreezes first, so that a replaced model's reference
    cycles are still collected."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


_started = False


def settle_heap_at_start() -> None:
    """settle_heap(), once per server process (app.py calls it on every run)."""
    global _started
    if not _started:
        _started = True
        settle_heap()


class Job:
    def __init__(self, title: str, fn, cancellable: bool = False):
        self.title, self.cancellable = title, cancellable
        self.fraction, self.message = 0.0, "starting"
        self.values: list[float] = []  # BO: objective of every call
        self.best: list[float] = []  # BO: best so far
        self.records: list[dict] = []  # Dobi-SVD training: one {step, loss, task, ratio} per step
        self.cancel = threading.Event()
        self.error: str | None = None
        self.result = None
        self.started = time.perf_counter()
        self.seconds: float | None = None
        self.finished = threading.Event()
        self.on_done = None  # called from the job's thread once it has finished (ui.start: rerun the page)
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True, name=f"studio-job-{title}")

    def start(self, attach=None) -> "Job":
        if attach:
            attach(self.thread)
        self.thread.start()
        return self

    @property
    def running(self) -> bool:
        return self.thread.is_alive() and not self.finished.is_set()  # on_done runs while the thread is alive

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def progress(self, fraction: float, message: str = "") -> None:
        self.fraction = min(1.0, max(0.0, float(fraction)))
        self.message = message

    def wait(self, timeout: float | None = None) -> "Job":
        if self.thread.ident is not None:  # a job run in the page's own run (ui.run_here) never started its thread
            self.thread.join(timeout)
        return self

    def _run(self, fn) -> None:
        try:
            with cores.job():  # its share of the cores beside the machine's other compute jobs
                self.result = fn(self)
        except DipSVDError as e:
            self.error = str(e)
        except (MemoryError, RuntimeError) as e:
            if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
                self.error = ("out of memory; use fewer calibration windows, a shorter sequence length, "
                              "fewer evaluation tokens, or a smaller model")
            else:
                self.error = _unexpected(self.title, e)
        except Exception as e:  # a bug, but the user gets one line and the log gets the traceback
            self.error = _unexpected(self.title, e)
        finally:
            self.seconds = time.perf_counter() - self.started
            self.finished.set()
            if self.on_done is not None:
                try:
                    self.on_done()
                except Exception:
                    log.exception("%s: the callback after the job failed", self.title)


def _unexpected(title: str, e: Exception) -> str:
    log.exception("job %s failed", title)
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return (f"{title} failed unexpectedly ({type(e).__name__}: {first}). Try smaller settings or reload the "
            "model; the server log has the details")
