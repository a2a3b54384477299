"""Layer 8, the plan: predicted memory, disk and time of each phase before a run, and the offload placement
from the memory budgets (plan). May import the layers below.
"""
