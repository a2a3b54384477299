"""Layer 8, the plan: predicted memory, disk and time of each phase before a run, and the offload placement from the
memory budgets. May import the layers below.

shapes (the config read without weights, the shapes, the Run planned, the units) -> memory (each phase's peak, the
placement of offloaded blocks, the runtime) and timing (the microbenchmark and each phase's seconds) -> plan
(make_plan, the checks against the budgets and the free memory). The names below are the package's API.
"""
from .memory import DRAW_BYTES, Placement, free_device_bytes, free_host_bytes, memory, place_blocks, run_overhead, runtime_bytes
from .plan import BudgetError, Plan, check_budgets, check_fits, make_plan, misfit, plan_json
from .shapes import (ALWAYS, DEVICE_HEADROOM, DEVICE_RUNTIME, GiB, Phase, Run, Shapes, binary_size, load_config,
                     memory_size, meta_model, phases_in_order, run_of, shapes_of)
from .timing import Rates, microbenchmark, timing

__all__ = ["ALWAYS", "DEVICE_HEADROOM", "DEVICE_RUNTIME", "DRAW_BYTES", "GiB", "BudgetError", "Phase", "Placement", "Plan",
           "Rates", "Run", "Shapes", "binary_size", "check_budgets", "check_fits", "free_device_bytes",
           "free_host_bytes", "load_config", "make_plan", "memory", "memory_size", "misfit", "meta_model", "microbenchmark", "phases_in_order",
           "place_blocks", "plan_json", "run_of", "run_overhead", "runtime_bytes", "shapes_of", "timing"]
