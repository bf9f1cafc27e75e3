"""Python's cyclic garbage collector, tuned for processes that trace JAX programs.

Tracing and lowering a model make millions of short-lived Python objects, so the collector
runs often, and each pass over its oldest generation walks every object alive: JAX,
TensorFlow, torch and every module they import. Measured on 2 Xeon cores (gc.callbacks), before
-> after `collect_less`: a tiny training start (tests/tiny_training.py) 2.4 -> 1.1 s of ~22 s, a
pytest worker running tests/test_recover.py 5.6 -> 1.6 s of ~60 s, `bench --what train_step
--config configs/demo.py` 4.1 -> 1.6 s of ~2.5 min (its compile time unchanged within noise).
"""

import gc

OLDEST_GENERATION_EVERY = 100  # middle-generation passes per oldest-generation pass (Python: 10)


def collect_less() -> None:
    """Freezes what is alive now (imported modules and the like: kept for the process's life,
    never walked again) and collects the oldest generation 10x less often. Young garbage is
    collected as before, so memory held by short-lived cycles is freed as soon as ever.
    Call once, after the imports."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, OLDEST_GENERATION_EVERY)
