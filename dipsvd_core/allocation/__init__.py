"""Layer 5, allocation: the parameter budget and ranks (budget), global importance (importance), the
allocators (allocators), Bayesian optimisation (bayes), the search after refinement (refined_search) and the
registry of allocations (strategies). May import the layers below: common, model, engine, lowrank, refine.
"""
