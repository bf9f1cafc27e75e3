"""Sweep files: `get_sweep(arg=None) -> list[dict]` of config overrides (see dfrec_jax/sweep.py)."""
