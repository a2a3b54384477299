"""DipSVD Studio's core library: SVD compression of causal LMs with dual-importance protection.

The flow (DESIGN.md section 7), one module per step:
models (load, find targets) -> data (text, windows) -> stream (one block at a time) -> stats (Grams,
alpha) -> factors (whitening, SVD once, on disk) -> allocation (ratios, budget) -> surgery
(LowRankLinear) -> evaluate -> compressed (I/O).
`pipeline.Workbench` ties them together; `cli` is the command line. No Streamlit import here.
"""
from .errors import DipSVDError

__all__ = ["DipSVDError"]
