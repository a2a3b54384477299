"""What the CLI and the app both do around a build, written once: the plan checked before anything loads, and the
compressed model saved with its report. The front ends only ask and show; neither plans, checks or assembles what
is saved by itself."""
from __future__ import annotations

import os
from pathlib import Path

from ..common.errors import DipSVDError
from ..io.compressed import is_compressed_folder, save_compressed, save_dense
from ..plan import BudgetError, Plan, Run, check_fits, make_plan

# The report's fields a saved folder keeps in its config (io.compressed reads them back when it loads)
SAVED_FIELDS = ("model", "method", "allocation", "ratio_target", "ratio_realized", "settings")


def checked_plan(spec: str, device: str | None, run: Run, trust_remote_code: bool = False,
                 budgets: dict | None = None, check: bool = True, override: str = "pass --ignore-plan",
                 unreadable_to_loader: bool = False) -> Plan | None:
    """The plan of this run from the config alone, refused up front when it does not fit (plan.check_fits, whose
    message ends with `override`, the way to run anyway). None for a saved compressed folder (loaded, not planned).
    A config that cannot be read raises the plan's one-line error, or with `unreadable_to_loader` (the app, whose
    loading step says why in its own words) gives None; a memory budget below one block (BudgetError) is the user's
    own input and is always raised as it is."""
    path = Path(os.path.expanduser(spec))
    if path.is_dir() and is_compressed_folder(path):
        return None
    try:
        plan = make_plan(spec, device, run, bench=False, trust_remote_code=trust_remote_code, budgets=budgets)
    except BudgetError:
        raise
    except DipSVDError:
        if not unreadable_to_loader:
            raise
        return None
    if check:
        check_fits(plan, override)
    return plan


def saved_info(report: dict) -> dict:
    """What a saved folder records of its build (SAVED_FIELDS), with a Dobi-SVD model's int8 storage."""
    info = {k: report[k] for k in SAVED_FIELDS}
    if "storage" in report:
        info.update(remap=report["storage"]["remap"], storage=report["storage"])
    return info


def dense_folder(out: str) -> str:
    """Where a dense export goes: OUT-dense, beside OUT."""
    return str(Path(out).with_name(Path(out).name + "-dense"))


def save_run(model, folder: str, tokenizer, report: dict, force: bool = False, dense: bool = False) -> dict:
    """Save the compressed model (io.compressed.save_compressed) with its report; with `dense`, also the dense copy
    beside it, last, since that turns the model back into dense Linears. Returns where each went."""
    out = {"saved_to": str(save_compressed(model, folder, tokenizer, saved_info(report), force=force, report=report))}
    if dense:
        out["saved_dense_to"] = str(save_dense(model, dense_folder(folder), tokenizer, force=force))
    return out
