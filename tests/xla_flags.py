"""The XLA flags every test process compiles with: tests/conftest.py adds them for pytest and
the CLI subprocesses the tests start (through the environment), tests/tiny_training.py when it
is run on its own. Set before JAX initialises its backend.

The tests compile many small programs and run little compute, so XLA's CPU backend
optimisation is turned down: it cuts compile time about 3x on 2 cores and does not change what
the programs compute. XLA:CPU's MLIR fusion emitters are turned off too: the older elemental
emitter compiles the tiny train step in ~15 s instead of ~22 s (tests/tiny.py's model, 2 Xeon
cores), with the same results up to float rounding of fused elementwise code.
"""

import os

FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def add_to_environment() -> None:
    """Appends FLAGS missing from $XLA_FLAGS (a flag already there is not repeated)."""
    for flag in FLAGS:
        if flag not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
