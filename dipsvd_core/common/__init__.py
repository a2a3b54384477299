"""Layer 0, common: what every layer may use. User-facing errors (errors), a setting declared once (knobs), a
method's own options registered by name (options), the user cache folder (cache), the CPU cores shared by jobs
(cores). Imports nothing of dipsvd_core.
"""
