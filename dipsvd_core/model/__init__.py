"""Layer 1, the model: loading a causal LM from any source, finding its decoder blocks and compression
targets, offload and device placement (models). May import: common.
"""
