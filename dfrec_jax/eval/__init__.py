"""Evaluation: metrics, baselines, head pose, the `eval` runner and its report tables."""
