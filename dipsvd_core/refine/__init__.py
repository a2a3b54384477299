"""Layer 4, refinement: sequential compensation, dense refits and block tuning against the original's
outputs (sequential). May import: common, model, engine, lowrank.
"""
