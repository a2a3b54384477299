"""DipSVD Studio's app helpers: session state, background jobs and shared widgets.

Kept out of `pages/` so that Streamlit never mistakes them for pages. Pages lay out widgets with
these helpers and call `dipsvd_core` for everything else.
"""
