"""Widgets and wrappers every page shares: the session's Studio, the job panel, error boxes,
the cached model loader and number formatting."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time

import streamlit as st
from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx

from dipsvd_core.common.errors import DipSVDError
from dipsvd_core.common.knobs import knobs_in_order
from dipsvd_core.common.options import option_group
from dipsvd_core.outputs import figures
from dipsvd_core.run.loading import load_model

from .jobs import Job
from .state import Studio

log = logging.getLogger(__name__)


def studio() -> Studio:
    if "studio" not in st.session_state:
        st.session_state["studio"] = Studio()
    return st.session_state["studio"]


def busy() -> bool:
    job = studio().job
    return job is not None and job.running


@st.cache_resource(show_spinner=False, max_entries=2)
def load_lm(spec: str, device: str, dtype: str, trust_remote_code: bool, offload: bool = False,
            blocks: tuple | None = None, _progress=None):
    """One copy of each model per server, shared by sessions; compression never mutates it. `blocks`: an offloaded
    model's plan.Placement, as a tuple."""
    from dipsvd_core.plan import Placement

    return load_model(spec, device, dtype, trust_remote_code, _progress, offload=offload,
                      blocks=None if blocks is None else Placement(*blocks))


@st.cache_data(show_spinner=False, max_entries=32, ttl=600)
def plan_of(spec: str, device: str, run: dict, trust_remote_code: bool, bench: bool = False,
            budgets: dict | None = None) -> dict:
    """The plan (plan.make_plan) as a dict, or {"error": message}; memory only unless `bench`."""
    from dipsvd_core.plan import make_plan, run_of

    try:
        return make_plan(spec, device, run_of(**run), bench=bench, trust_remote_code=trust_remote_code,
                         budgets=budgets).to_dict()
    except DipSVDError as e:
        return {"error": str(e)}


def device_panel(device: str) -> None:
    """The compute device, its memory used and free, and the host's free memory."""
    import torch

    from dipsvd_core.plan import binary_size, free_host_bytes

    host = free_host_bytes()
    host_txt = f" · host memory free {binary_size(host)}" if host is not None else ""
    if torch.cuda.is_available() and device in ("auto", "cuda"):
        free, total = torch.cuda.mem_get_info()
        st.caption(f"Device: **{torch.cuda.get_device_name()}** · GPU memory used {binary_size(total - free)} of "
                   f"{binary_size(total)}, free {binary_size(free)}{host_txt}")
    else:
        why = "no CUDA GPU found" if not torch.cuda.is_available() else "chosen"
        st.caption(f"Device: **CPU** ({why}; {os.cpu_count()} cores){host_txt}")


def start(title: str, fn, cancellable: bool = False) -> None:
    """Run fn(job) in the background and rerun so that every page shows it as running."""
    if busy():
        st.warning("Another step is still running; wait for it or cancel it first.")
        return
    ctx = get_script_run_ctx()
    job = Job(title, fn, cancellable)
    job.on_done = rerun_when_done(ctx.session_id) if ctx else None
    studio().job = job.start(attach=(lambda t: add_script_run_ctx(t, ctx)) if ctx else None)
    st.rerun()


def rerun_when_done(session_id: str):
    """A callback, for a job's thread, that reruns this browser session's page as soon as the job has finished,
    as Streamlit's own "run on save" does (AppSession.request_rerun with the session's last client state, on the
    server's event loop): the result then shows at once, and the page need not poll fast near a job's end to
    see it (issue 9: every poll is a script run and a browser redraw that take CPU from the job). None where
    there is no server (AppTest) or this Streamlit lacks what it uses (streamlit is pinned; a test checks);
    the page then polls as before."""
    from streamlit import runtime as st_runtime

    if not st_runtime.exists():  # AppTest
        return None
    try:
        server = st_runtime.get_instance()
        session = server._session_mgr.get_active_session_info(session_id).session
        loop = server._get_async_objs().eventloop
        session._client_state  # noqa: B018 (fail here, not in the job's thread)
    except Exception as e:
        log.warning("no rerun at a job's end (%s: %s); the page polls for it", type(e).__name__, e)
        return None

    def rerun() -> None:
        loop.call_soon_threadsafe(lambda: session.request_rerun(session._client_state))
    return rerun


def run_here(title: str, fn) -> None:
    """Run fn(job) in this script run, for a step known to take well under a second of work (a build that only
    slices cached factors): a background job would add a rerun to start it and a poll to see it end, which
    cost more than the work (issue 9). The job is recorded as the session's last, so the panel reports an error
    again on later runs."""
    if busy():
        st.warning("Another step is still running; wait for it or cancel it first.")
        return
    job = Job(title, fn)
    with st.spinner(f"{title}..."):
        job._run(fn)
    studio().job = job
    if job.error:
        st.error(job.error, icon=":material/error:")
    job.announced = True  # no toast: the result shows below in this very run, and a toast's first render delayed it


def header(title: str, caption: str) -> None:
    """Page title, one line on what the page is for, and the state of the current job."""
    st.title(title)
    st.caption(caption)
    job_panel()


FAST_POLL_S, SLOW_POLL_S, FAST_FOR_S = 0.5, 3.0, 3.0


def job_panel() -> None:
    job = studio().job
    if job is None:
        return
    if job.running:
        # The progress is polled every 3 s, since every poll is a script run and a browser redraw that take the
        # GIL and a core share from the job (issue 9: Fisher took 13.2 s in the app without polls, 15.5 s polled
        # at 0.5 / 2 s; a trivial Streamlit fragment costs about 0.1 s of server and browser CPU a poll here).
        # The job's end reruns the page itself (rerun_when_done); where it cannot, the first and last seconds
        # are polled every half second instead, so that the result still shows at once.
        pushed = job.on_done is not None
        (_live_job_fast if not pushed and _near_ends(job) else _live_job_slow)()
    elif job.error:
        st.error(job.error, icon=":material/error:")
    elif job.cancelled:
        st.warning(f"{job.title}: cancelled after {job.seconds:.1f} s; kept what was finished.")
    elif not getattr(job, "announced", False):
        job.announced = True
        st.toast(f"{job.title}: done in {job.seconds:.1f} s")


def _near_ends(job: Job, end_margin: float = 1.0) -> bool:
    """Within FAST_FOR_S of the job's start, or within end_margin x FAST_FOR_S of its end as its progress
    fraction predicts it."""
    elapsed = time.perf_counter() - job.started
    left = elapsed * (1 - job.fraction) / job.fraction if job.fraction > 0 else float("inf")
    return elapsed < FAST_FOR_S or left < end_margin * FAST_FOR_S


@st.fragment(run_every=FAST_POLL_S)
def _live_job_fast() -> None:
    job = studio().job
    if job is not None and job.running and not _near_ends(job, end_margin=2.0):  # a margin against flapping
        st.rerun()  # the page reruns once and switches to the slow poll
    _live_job()


@st.fragment(run_every=SLOW_POLL_S)
def _live_job_slow() -> None:
    job = studio().job
    if job is not None and job.running and job.on_done is None and _near_ends(job):
        st.rerun()  # the end is near: back to the fast poll
    _live_job()


def _live_job() -> None:
    job = studio().job
    if job is None or not job.running:
        st.rerun()
    elapsed = time.perf_counter() - job.started
    with st.container(border=True):
        st.progress(job.fraction, text=f"**{job.title}** · {job.message} · {elapsed:.0f} s")
        if job.records:
            st.plotly_chart(figures.dobi_training(job.records), key="dobi_live")
        if job.values:
            st.plotly_chart(figures.convergence(job.values, job.best, studio().settings.bo_objective),
                            key="bo_live")
        if job.cancellable:
            st.button("Cancel", key="cancel_job", on_click=job.cancel.set, disabled=job.cancelled)


@contextlib.contextmanager
def guard(what: str):
    """Show a DipSVDError as its one-line message and anything else as a short note, never a traceback."""
    try:
        yield
    except DipSVDError as e:
        st.error(str(e), icon=":material/error:")
    except Exception as e:
        log.exception("%s failed", what)
        st.error(f"{what} failed unexpectedly ({type(e).__name__}). Check the settings and try again; "
                 "the server log has the details.", icon=":material/error:")


def need_model() -> Studio:
    """The session's Studio when a model and its statistics are ready; otherwise a pointer and stop."""
    s = studio()
    if s.lm is None or s.bench is None:  # the load job sets bench only once statistics exist
        st.info("Load a model and collect calibration statistics first.")
        st.page_link("pages/model_data.py", label="Go to Model and data", icon=":material/arrow_forward:")
        st.stop()
    if st.session_state.get("settings_version") != s.settings_version:
        # A new model: every per-model widget (all "k_" keys but the loader's) starts from its defaults.
        for key in [k for k in st.session_state if isinstance(k, str) and k.startswith("k_")
                    and not k.startswith("k_load_")]:
            del st.session_state[key]
        st.session_state["settings_version"] = s.settings_version
    return s


def seed(key: str, value) -> None:
    """Give a widget its starting value once; the value then lives under `key` in session state.
    Keys starting with "k_" are the widgets whose values survive page switches: each is made with
    persist_state="session". (Re-assigning them on every run, as before, pushed the value of the run's start back
    to the browser and undid the presses a user made while the page reran: a slider's arrow keys, issue 36.)"""
    if key not in st.session_state:
        st.session_state[key] = value


def _option_widget(f: dataclasses.Field, value, key: str, disabled: bool):
    """One knob's widget, as its Widget (common/knobs.py) says: a checkbox for a bool, a radio for a knob with
    choices, else a slider or a number box."""
    w, help = f.metadata["widget"], f.metadata.get("help") or None
    common = {"key": key, "persist_state": "session", "disabled": disabled, "help": help}
    if isinstance(value, bool):
        return st.checkbox(w.label, **common)
    if f.metadata.get("choices"):
        return st.radio(w.label, list(f.metadata["choices"]()), horizontal=True, **common)
    widget = st.slider if w.slider else st.number_input
    return widget(w.label, w.lo, w.hi, step=w.step, format=w.format, **common)


def options_box(name: str, current, prefix: str, disabled: bool, columns: int = 1):
    """The widgets of a method's own options (common/options.py), each drawn from its knob, in turn across
    `columns` columns; keys <prefix><name>_<field>. Returns the options they set (a field without a widget keeps
    its value)."""
    values = {}
    fields = [f for f in knobs_in_order(option_group(name).cls) if f.metadata.get("widget") is not None]
    places = st.columns(columns) if columns > 1 else [st.container()]
    for i, f in enumerate(fields):
        value = getattr(current, f.name)
        seed(f"{prefix}{name}_{f.name}", value)
        with places[i % len(places)]:
            values[f.name] = type(value)(_option_widget(f, value, f"{prefix}{name}_{f.name}", disabled))
    return dataclasses.replace(current, **values)


def follow_default(key: str, value) -> None:
    """Like `seed`, but the widget follows a default that changes (the sweep's ratios include the ratio built) for
    as long as the user has not changed it: its value is replaced while it is still the last default given."""
    last = f"_default_{key}"
    if key not in st.session_state or st.session_state[key] == st.session_state.get(last):
        st.session_state[key] = value
    st.session_state[last] = value


MARKDOWN_SPECIALS = "\\`*_{}[]<>()#+-.!|$~"


def verbatim(text: str) -> str:
    """A model's text as markdown that shows it as written: its line breaks kept (a poem's lines), and no character
    read as markup (a '#' line, a '$' pair that would be typeset as math)."""
    escaped = "".join("\\" + c if c in MARKDOWN_SPECIALS else c for c in text)
    return escaped.replace("\n", "  \n")


def fmt_params(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


