"""Evaluation of quality: pairwise accuracy against the length baseline, per-attribute correlations, plots."""
