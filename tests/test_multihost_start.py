"""Multi-host start (run/multihost.py) and the hosts' agreed stop (train/preemption.py).

The environment rules are unit-tested on dicts; the start and the stop vote run for real: two
processes on 127.0.0.1 with JAX's CPU collectives, started by `multihost.initialize("auto")`
from the DFREC_* variables alone, one of them interrupted.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from dfrec_jax.run import multihost

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, None),  # batch script
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "1"}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "8"}, ("SLURM", 8)),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, ("Open MPI", 4)),
        ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
        ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}, ("TPU pod", 4)),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
        ({"DFREC_NUM_PROCESSES": "2"}, ("DFREC_NUM_PROCESSES", 2)),
    ],
)
def test_detect(environ, expected):
    assert multihost.detect(environ) == expected


def test_mode_accepts_old_bools_and_rejects_typos():
    assert [multihost.mode(v) for v in (True, False, "auto", "YES", "off")] == [
        "yes", "no", "auto", "yes", "no"
    ]
    with pytest.raises(ValueError, match="auto, yes, no"):
        multihost.mode("sometimes")


def _recording_start():
    calls = []
    return calls, lambda **kwargs: calls.append(kwargs)


def test_initialize_follows_the_mode(monkeypatch):
    monkeypatch.setattr(multihost.jax.distributed, "is_initialized", lambda: False)
    slurm = {"SLURM_STEP_NUM_TASKS": "2"}
    calls, start = _recording_start()
    assert multihost.initialize("auto", {}, start) is None
    assert multihost.initialize("no", slurm, start) is None
    assert calls == []
    assert multihost.initialize("auto", slurm, start) == "SLURM"
    assert multihost.initialize("yes", {}, start) == "distributed=yes"
    assert calls == [{}, {}]  # JAX's own cluster detection fills in the coordinator etc.
    plain = {"DFREC_NUM_PROCESSES": "3", "DFREC_PROCESS_ID": "1",
             "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}  # fmt: skip
    multihost.initialize("auto", plain, start)
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 3,
                         "process_id": 1}  # fmt: skip
    with pytest.raises(ValueError, match="DFREC_PROCESS_ID"):
        multihost.initialize("auto", {"DFREC_NUM_PROCESSES": "2",
                                      "JAX_COORDINATOR_ADDRESS": "h:1"}, start)  # fmt: skip


_WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    import jax, jax.numpy as jnp, numpy as np
    from dfrec_jax.run import multihost
    from dfrec_jax.train import preemption
    started = multihost.initialize("auto")
    assert started == "DFREC_NUM_PROCESSES", started
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    total = jax.jit(lambda x: x.sum(), out_shardings=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    interrupted, signum = int(sys.argv[1]), getattr(signal, sys.argv[2])
    with preemption.PreemptionGuard(agree_every=5) as guard:
        for step in range(1, 600):
            time.sleep(0.01)  # the service needs a few ms to pick a common step
            local = np.full((2,), step, np.float32)
            x = jax.make_array_from_process_local_data(sharding, local, (4,))
            assert float(total(x)) == 4 * step  # a collective every step
            if jax.process_index() == interrupted and step == 7:
                os.kill(os.getpid(), signum)
            if guard.should_stop(step):
                break
    print(f"STOPPED {jax.process_index()} {step} {guard.signal_name}", flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("interrupted, signame", [(1, "SIGINT"), (0, "SIGTERM")])
def test_two_processes_start_from_the_environment_and_stop_together(
    tmp_path, interrupted, signame
):
    """Process `interrupted` gets the signal at step 7. Ctrl-C (which JAX's preemption service
    does not see): both stop after step 10, the next vote, the other naming the remote request.
    SIGTERM: the service picks the step, the same on both. Neither hangs in a collective."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}
    env.update(
        PYTHONPATH=REPO,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        DFREC_NUM_PROCESSES="2",
    )
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(interrupted), signame],
            env={**env, "DFREC_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=240)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
    lines = [next(l for l in out.splitlines() if l.startswith("STOPPED")) if "STOPPED" in out
             else pytest.fail(out[-3000:]) for out in outputs]  # fmt: skip
    assert [p.returncode for p in procs] == [0, 0], outputs
    steps = [int(line.split()[2]) for line in lines]
    other = 1 - interrupted
    if signame == "SIGINT":
        assert lines[interrupted] == f"STOPPED {interrupted} 10 SIGINT"
        assert lines[other] == f"STOPPED {other} 10 another host's stop request"
    else:
        assert steps[0] == steps[1] and 7 <= steps[0] < 599, lines
        assert all(line.endswith("preemption sync point") for line in lines), lines
