"""Training of the heads: data sets, embedding store, stage 1, debiasing, stage 2, the pipeline, the model card.

See docs/TRAINING.md and docs/DATA.md.
"""
