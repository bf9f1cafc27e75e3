"""Starting JAX's multi-controller runtime when the job has several processes.

`config.mesh.distributed`: "auto" (default) starts it when the environment says this process is
one of several, "yes" always, "no" never. Forgetting a flag under SLURM would otherwise make
every task train its own copy into the same workdir. What counts as "several processes":

    launcher              variables read                          coordinator etc. from
    SLURM (srun)          SLURM_STEP_NUM_TASKS > 1                JAX's SLURM detection
    Open MPI (mpirun)     OMPI_COMM_WORLD_SIZE > 1                JAX's Open MPI detection
    TPU pod slice         TPU_WORKER_HOSTNAMES with > 1 hosts     JAX's TPU detection
    plain processes       DFREC_NUM_PROCESSES > 1, with           these variables
                          DFREC_PROCESS_ID, JAX_COORDINATOR_ADDRESS (host:port)

The SLURM rule reads the step's task count, not the job's: a batch script that runs
`python -m dfrec_jax train` itself (one process) must not wait for tasks that never start.
A Cloud TPU VM slice that sets none of these variables needs `distributed=yes`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax

log = logging.getLogger(__name__)

MODES = ("auto", "yes", "no")


def mode(value) -> str:
    """The config value as one of MODES (older configs hold a bool)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value).strip().lower()
    aliases = {"true": "yes", "false": "no", "on": "yes", "off": "no", "1": "yes", "0": "no"}
    text = aliases.get(text, text)
    if text not in MODES:
        raise ValueError(f"mesh.distributed={value!r}: use one of {', '.join(MODES)}")
    return text


def _count(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name, "0").split("(")[0])  # SLURM may write "4(x2)"
    except ValueError:
        return 0


def detect(environ: Mapping[str, str] = os.environ) -> tuple[str, int] | None:
    """(launcher, number of processes) when `environ` says this process is one of several."""
    if _count(environ, "DFREC_NUM_PROCESSES") > 1:
        return "DFREC_NUM_PROCESSES", _count(environ, "DFREC_NUM_PROCESSES")
    if _count(environ, "SLURM_STEP_NUM_TASKS") > 1:
        return "SLURM", _count(environ, "SLURM_STEP_NUM_TASKS")
    if _count(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI", _count(environ, "OMPI_COMM_WORLD_SIZE")
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return "TPU pod", len(hosts)
    return None


def _explicit_arguments(environ: Mapping[str, str]) -> dict:
    """jax.distributed.initialize arguments from the DFREC_* variables (JAX reads only the
    coordinator address itself); {} leaves everything to JAX's cluster detection."""
    if _count(environ, "DFREC_NUM_PROCESSES") <= 1:
        return {}
    missing = [v for v in ("DFREC_PROCESS_ID", "JAX_COORDINATOR_ADDRESS") if v not in environ]
    if missing:
        raise ValueError(f"DFREC_NUM_PROCESSES is set but {' and '.join(missing)} not")
    return {
        "coordinator_address": environ["JAX_COORDINATOR_ADDRESS"],
        "num_processes": int(environ["DFREC_NUM_PROCESSES"]),
        "process_id": int(environ["DFREC_PROCESS_ID"]),
    }


def initialize(value, environ: Mapping[str, str] = os.environ, start=None) -> str | None:
    """Starts the runtime per `mesh.distributed` = `value` (call before any other JAX use).
    Returns what started it (the launcher's name, "distributed=yes", or "already running"),
    None when the job stays one process. `start`: jax.distributed.initialize (tests)."""
    chosen = mode(value)
    if jax.distributed.is_initialized():
        return "already running"
    if chosen == "no":
        return None
    found = detect(environ)
    if chosen == "auto" and found is None:
        return None
    start = start or jax.distributed.initialize
    start(**_explicit_arguments(environ))
    what = found[0] if found else "distributed=yes"
    log.info(
        "multi-host: process %d of %d (%s), %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        what,
        jax.local_device_count(),
        jax.device_count(),
    )
    return what


__all__ = ["MODES", "detect", "initialize", "mode"]
