"""Layer 2, the engine: the block walker every data pass runs on (stream), the pass vocabulary (passes),
statistics (stats), measured memory (memwatch), text sources and windows (data), perplexity and generation
(evaluate) and speed (speed). May import: common, model.
"""
