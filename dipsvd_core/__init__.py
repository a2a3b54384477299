"""DipSVD Studio's core library: SVD compression of causal LMs with dual-importance protection.

Packages by layer, lowest first (LAYERS); a module imports only from its own package and the layers below it,
and the command line (the cli package, __main__) sits on top. tests/test_layers.py checks it from the imports.

    common -> model -> engine -> lowrank -> refine -> allocation -> methods -> io -> plan -> run -> outputs -> cli

The flow: model.models (load, find targets) -> engine.data (text, windows) -> engine.stream (one block at a time)
-> engine.stats (Grams, alpha) -> lowrank.factors (whitening, SVD once, on disk) -> allocation (ratios, budget)
-> lowrank.surgery (LowRankLinear) -> refine -> engine.evaluate -> io.compressed (the saved folder).
`run.pipeline.Workbench` ties them together; `cli` is the command line. No Streamlit import here.
"""
from .common.errors import DipSVDError

# The packages by layer, lowest first: each may import only itself and those before it.
LAYERS = ("common", "model", "engine", "lowrank", "refine", "allocation", "methods", "io", "plan", "run", "outputs")

__all__ = ["DipSVDError", "LAYERS"]
