"""Layer 1, the model: loading a causal LM from any source (models), its decoder blocks and compression targets
(blocks), and offload in one module: placement, the device map, the hooks, a block's weights on its device
(offload). May import: common.
"""
