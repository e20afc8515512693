"""rewardsvc: a multi-objective, interpretable reward model (ArmoRM method) served to RLHF trainers."""

__version__ = "0.1.0"
