"""Layer 10, outputs: the HTML report (html_report), plotly figures (figures), plain data for the Studio's
pages (inspection), sweeps (sweep) and lm-evaluation-harness tasks (lm_tasks). May import the layers below.
"""
