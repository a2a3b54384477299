"""What one browser session has built so far, kept across page switches.

The Studio object lives in st.session_state["studio"]; background jobs write their results into
it directly. Defaults come from environment variables so that tests and demos can start small.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from dipsvd_core.engine.data import DEFAULT_CALIB, DEFAULT_SEQLEN, DEFAULT_WINDOWS
from dipsvd_core.methods.settings import Settings, settings_dict
from dipsvd_core.model.models import DEFAULT_MODEL
from dipsvd_core.run.pipeline import Result, Workbench

from .jobs import Job


def _env(name: str, default, kind=str):
    raw = os.environ.get(f"DIPSVD_STUDIO_{name}")
    return kind(raw) if raw not in (None, "") else default


def defaults() -> dict:
    """Start-up values of the Model and data page (and a few evaluation sizes)."""
    return {"model": _env("DEFAULT_MODEL", DEFAULT_MODEL), "calib": _env("CALIB", DEFAULT_CALIB),
            "calib_windows": _env("CALIB_WINDOWS", DEFAULT_WINDOWS, int), "seqlen": _env("SEQLEN", DEFAULT_SEQLEN, int),
            "eval": [x.strip() for x in _env("EVAL", "wiki,news").split(",") if x.strip()],
            "eval_tokens": _env("EVAL_TOKENS", 4096, int), "new_tokens": _env("NEW_TOKENS", 48, int)}


@dataclass
class Studio:
    lm: object | None = None  # models.LoadedModel
    bench: Workbench | None = None
    settings: Settings = field(default_factory=Settings)
    fisher: object | None = None  # Workbench.fisher() result, once computed
    bo: dict | None = None  # last BO run: {"settings", "allocation", "values", "best", "cancelled"}
    result: Result | None = None  # the compressed model of `result.settings`
    ppl: dict = field(default_factory=dict)  # "original" / "compressed" -> {dataset: perplexity}
    params: dict | None = None  # allocation.param_report of `result`
    sweep: dict | None = None  # {"dataset", "original", "curves"}
    speed: dict | None = None  # {"original": {...}, "compressed": {...}}
    lm_eval: dict | None = None  # {"original": {task: {"acc", "acc_stderr", "n"}}, "compressed": {...}}
    generations: dict | None = None  # {"prompts": [...], "columns": {label: [generate() rows]}}
    saved_to: str | None = None
    job: Job | None = None
    settings_version: int = 0  # bumped when a model loads, so pages reseed their setting widgets

    def forget_model(self) -> None:
        """Everything downstream of the model and calibration data."""
        self.lm = self.bench = self.fisher = self.bo = None
        self.forget_result()
        self.sweep = None

    def forget_result(self) -> None:
        self.result = self.params = self.speed = self.lm_eval = self.generations = self.saved_to = None
        self.ppl = {k: v for k, v in self.ppl.items() if k in ("original", "config")}

    def bo_allocation(self, settings: Settings):
        """The BO allocation when it was run for exactly these settings, else None."""
        if self.bo is not None and self.bo["settings"] == settings_dict(settings):
            return self.bo["allocation"]
        return None

    @property
    def result_is_current(self) -> bool:
        return self.result is not None and settings_dict(self.result.settings) == settings_dict(self.settings)
