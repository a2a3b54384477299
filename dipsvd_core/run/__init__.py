"""Layer 9, a run: the Workbench that ties the passes together (pipeline), its parts (calibration: windows,
statistics and Fisher; factor_cache; probes; memo), the passes as objects (steps), and opening a model from any
source (loading) and the session steps both front ends share (session). May import the layers below.
"""
