"""Build work on a second core: an ordered map over a small thread pool.

The builders' per-item work (decoding images and videos, resizing, masks, PNG encoding) is
OpenCV, PIL and TensorFlow C code that releases the GIL, so threads overlap it with the main
thread, which writes the examples. Threads rather than processes: the items share caches of
decoded originals, and the results (a few arrays) need no pickling.
"""

import collections
import concurrent.futures


def ordered_map(fn, items, workers: int = 2, ahead: int | None = None):
    """(item, fn(item)) for each of `items`, in their order; fn runs on `workers` threads
    with at most `ahead` items (default 2 x workers) in flight, started while the caller
    consumes earlier ones. An exception from fn is raised at its item's turn."""
    ahead = max(1, ahead or 2 * workers)
    items = iter(items)
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="build") as pool:
        pending = collections.deque()

        def submit_next() -> None:
            for item in items:
                pending.append((item, pool.submit(fn, item)))
                return

        for _ in range(ahead):
            submit_next()
        while pending:
            item, future = pending.popleft()
            result = future.result()
            submit_next()
            yield item, result
