"""Layer 3, low rank: the scaling S of each method (scalings), the SVD of W S once and its truncations
(factors), and the compressed model built from ranks (surgery). May import: common, model, engine.
"""
