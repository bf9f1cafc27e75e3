"""Face keypoints of video frames: detected on every core, kept on disk so a build resumes.

Face detection (MTCNN) is most of a FaceForensics++ build (about 150 ms per 640x360 frame on
one core of the 2-core Xeon, against ~3 ms for a mask and ~4 ms for 68 landmarks). A build
therefore detects every frame it will need first, one video per job on a pool of worker
processes, and writes each video's keypoints to a small json file as soon as they are known.
A build that crashes later (or is killed) detects nothing again on the next run: it reads
these files, and only the cheap steps (decode, warp, masks, landmarks, encoding) are redone.

Files: `<folder>/<video id>.json` = {"video": [size, mtime_ns], "frames": {index: [[x, y]
x 5] or a skip reason}}; a video whose size or modification time changed is detected again.
The folder is named by everything the keypoints depend on (the detector's settings), so
builds of other image sizes or mask settings share it.
"""

import concurrent.futures
import json
import logging
import multiprocessing
import os
import threading
import time

import numpy as np

log = logging.getLogger(__name__)

Keypoints = dict  # {frame index: float32 [5,2] array, or the reason there is none}


def _signature(path: str) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


class Store:
    """Per-video keypoints under `folder` (module docstring)."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def _file(self, video_id: str) -> str:
        return os.path.join(self.folder, f"{video_id}.json")

    def get(self, video_id: str, path: str) -> Keypoints:
        """The stored keypoints of the video at `path` ({} if none or the file changed)."""
        try:
            with open(self._file(video_id)) as f:
                stored = json.load(f)
            if stored["video"] != _signature(path):
                return {}
            frames = stored["frames"]
        except (OSError, ValueError, KeyError, TypeError):
            return {}  # absent, or half-written by a crash before the rename: detect again
        return {int(i): v if isinstance(v, str) else np.asarray(v, np.float32)
                for i, v in frames.items()}  # fmt: skip

    def put(self, video_id: str, path: str, found: Keypoints) -> None:
        """Adds `found` to the video's stored keypoints (atomically: write, then rename)."""
        merged = {**self.get(video_id, path), **found}
        frames = {str(i): v if isinstance(v, str) else np.asarray(v, np.float32).tolist()
                  for i, v in sorted(merged.items())}  # fmt: skip
        tmp = f"{self._file(video_id)}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "w") as f:
            json.dump({"video": _signature(path), "frames": frames}, f)
        os.replace(tmp, self._file(video_id))


# One detector per worker process (the model loads once there, on its first frame).
_worker_detect = None


def _start_worker(detect) -> None:
    global _worker_detect
    _worker_detect = detect


def _run_job(job):
    video_id, path, indices = job
    return video_id, path, _worker_detect(path, indices)


def detect_all(store: Store, jobs: dict, detect, workers: int) -> dict[str, int]:
    """Detects and stores what `store` lacks of `jobs` ({video id: (path, frame indices)}).

    `detect(path, indices) -> Keypoints` is picklable (it goes to the workers once, as their
    initializer's argument). `workers` > 1: that many spawned processes, one video per job;
    otherwise in this process. Returns {"videos": detected, "reused": already stored}.
    """
    todo = []
    for video_id, (path, indices) in sorted(jobs.items()):
        missing = sorted(set(indices) - set(store.get(video_id, path)))
        if missing:
            todo.append((video_id, path, missing))
    counts = {"videos": len(todo), "reused": len(jobs) - len(todo)}
    if not todo:
        return counts
    start = time.perf_counter()
    workers = min(workers, len(todo))
    log.info("detecting faces in %d videos (%d already stored) on %d process(es)",
             len(todo), counts["reused"], max(workers, 1))  # fmt: skip
    if workers > 1:
        # spawn: the parent holds TensorFlow and threads, which a fork would copy half-made.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_start_worker, initargs=(detect,)
        ) as pool:
            futures = [pool.submit(_run_job, job) for job in todo]
            error = None
            for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
                try:
                    video_id, path, found = future.result()
                except Exception as e:  # the other videos' faces are still stored
                    error = error or e
                    continue
                store.put(video_id, path, found)
                _progress(n, len(todo), start)
            if error is not None:
                raise error
    else:
        for n, (video_id, path, missing) in enumerate(todo, 1):
            store.put(video_id, path, detect(path, missing))
            _progress(n, len(todo), start)
    return counts


def _progress(n: int, total: int, start: float) -> None:
    if n == total or n % max(1, total // 20) == 0:
        log.info("faces detected in %d/%d videos (%.0f s)", n, total, time.perf_counter() - start)


def workers_for(requested: int) -> int:
    """`requested` worker processes; 0 = one per CPU core this process may use."""
    if requested > 0:
        return requested
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
