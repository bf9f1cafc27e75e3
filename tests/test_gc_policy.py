"""dfrec_jax/run/gc_policy.py: what is alive is frozen, the oldest generation is collected less
often, and young garbage cycles are still freed without an explicit gc.collect()."""

import subprocess
import sys

from dfrec_jax import configlib

_PROBE = """
import gc, weakref
from dfrec_jax.run import gc_policy

kept = [object() for _ in range(1000)]
before = gc.get_threshold()
gc_policy.collect_less()
assert gc.get_freeze_count() >= len(kept), gc.get_freeze_count()
young, middle, oldest = gc.get_threshold()
assert (young, middle) == before[:2] and oldest == gc_policy.OLDEST_GENERATION_EVERY > before[2]


class Node:
    pass


a, b = Node(), Node()
a.other, b.other = b, a  # a cycle: reference counting alone never frees it
alive = weakref.ref(a)
del a, b
churn = [[i] for i in range(50 * young)]  # allocations that trigger young collections
assert alive() is None, "a young cycle survived"
print("ok")
"""


def test_collect_less_freezes_the_heap_and_still_frees_young_cycles():
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=configlib.REPO_ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_test_session_runs_under_the_policy():
    import gc

    from dfrec_jax.run import gc_policy

    assert gc.get_threshold()[2] == gc_policy.OLDEST_GENERATION_EVERY  # tests/conftest.py
    assert gc.get_freeze_count() > 0
