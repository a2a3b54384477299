"""User-facing errors. Every step of the flow raises DipSVDError for a problem the user can fix.

The message names the problem and the fix in one line; the CLI prints it and exits non-zero, the
app shows it in an error box. Anything else escaping the core is a bug.
"""


class DipSVDError(Exception):
    """A problem with the user's input or environment, with its fix in the message."""


# What the plan advises when a device runs out of memory (plan.check_fits tries the same options in this order).
DEVICE_OOM_ADVICE = ("a smaller --device-memory (the plan then keeps more of the card free), --offload, or fewer "
                     "--calib-windows; `python -m dipsvd_core plan` shows each phase's predicted peak")


def device_out_of_memory(message: str, phase: str | None) -> DipSVDError:
    """The one-line answer to a device out-of-memory error (torch.OutOfMemoryError, raised by CUDA) in `phase`:
    what ran out (with the allocation that failed, when the message says), where, and the plan's advice."""
    import re

    tried = re.search(r"[Tt]ried to allocate ([0-9.]+ [KMGT]?i?B)", message)
    what = "device memory" + (f" (tried to allocate {tried.group(1)})" if tried else "")
    where = f"in the {phase} phase" if phase else "outside the compression phases"
    return DipSVDError(f"out of {what} {where}; use {DEVICE_OOM_ADVICE}")
