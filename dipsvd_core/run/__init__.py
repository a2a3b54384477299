"""Layer 9, a run: the Workbench that ties the passes together (pipeline) and opening a model from any source
(loading). May import the layers below.
"""
