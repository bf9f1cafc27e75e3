"""Multi-host `eval` on real processes: two processes on 127.0.0.1 (JAX's CPU collectives,
started by mesh.distributed="auto" from the DFREC_* variables) each score their own half of a
tiny lfw_swap test split with tiny scoring nets (tests/tiny_eval.py); the gathered tables must
equal a one-process run's on the same examples, number for number, and be written once. Run
twice: on the whole split, and on its first example only (max_examples=1: process 1's part
is empty, it scores padding alone and contributes nothing).

The split has 12 examples and the eval batch is 8, so the processes' batches (6 real + 2
padding each) are not the one-process run's (8, then 4 + 4 padding): equality also shows that
no value depends on the other examples of its batch.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from dfrec_jax import configlib
from tests import tiny, tiny_eval
from tests.test_multihost_start import _free_port

TEST_PEOPLE = 3  # 12 test examples
LIMITS = (0, 1)  # config.eval.max_examples: the whole split, then its first example


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from data_pipelines import datasets

    root = tmp_path_factory.mktemp("mp_eval_data")
    lfw = tiny.write_lfw_tree(root / "lfw", people_per_split=(1, 1, TEST_PEOPLE))
    config = tiny_eval.config(lfw, root / "tfds")
    builder = datasets.prepare(config.data)  # built once here, opened by every process
    assert builder.info.splits["test"].num_examples == 4 * TEST_PEOPLE
    return {"lfw_dir": str(lfw), "data_dir": str(root / "tfds")}


def _command(data, workdir):
    return [
        sys.executable, "-m", "tests.tiny_eval", "--workdir", str(workdir),
        "--lfw_dir", data["lfw_dir"], "--data_dir", data["data_dir"], "--devices", "2",
        "--max_examples", ",".join(map(str, LIMITS)),
    ]  # fmt: skip


def _start(command, env):
    return subprocess.Popen(
        command,
        cwd=configlib.REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _same_up_to_rounding(got, want, rel=1e-6):
    """Equal structure, keys, strings, None and integers; floats to `rel` (float32 rounding)."""
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and got.keys() == want.keys()
            and all(_same_up_to_rounding(got[k], want[k], rel) for k in want)
        )
    if isinstance(want, list):
        return (
            isinstance(got, list)
            and len(got) == len(want)
            and all(_same_up_to_rounding(g, w, rel) for g, w in zip(got, want))
        )
    if isinstance(want, float) and isinstance(got, float):
        return got == pytest.approx(want, rel=rel, abs=1e-9)
    return type(got) is type(want) and got == want


def _outputs(workdir, limit):
    folder = os.path.join(workdir, "eval", f"max{limit}")
    metrics = json.load(open(os.path.join(folder, "metrics.json")))
    table = open(os.path.join(folder, "table.md")).read()
    path = metrics["checkpoint"].pop("path")  # the run's own folder: differs between runs
    del metrics["created_utc"]
    versions = metrics.pop("versions")  # the job's devices and processes differ, rightly
    return metrics, table.replace(path, "<checkpoints>"), versions


def test_two_processes_score_their_parts_and_write_the_one_process_tables(
    data, tiny_run, tmp_path
):
    single, multi = (shutil.copytree(tiny_run, tmp_path / name) for name in ("single", "multi"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "DFREC_"))}
    env.update(JAX_PLATFORMS="cpu")  # XLA_FLAGS: conftest's, inherited
    port = _free_port()
    pair = {**env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "DFREC_NUM_PROCESSES": "2"}
    procs = [_start(_command(data, single), env)] + [
        _start(_command(data, multi), {**pair, "DFREC_PROCESS_ID": str(i)}) for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=420) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    ran = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert ran == [{"process": 0, "processes": 1}, {"process": 0, "processes": 2},
                   {"process": 1, "processes": 2}]  # fmt: skip

    for limit, total in zip(LIMITS, (4 * TEST_PEOPLE, 1)):
        expected, expected_table, one = _outputs(single, limit)
        metrics, table, two = _outputs(multi, limit)
        assert (one["processes"], one["devices"]) == ("1", "2 x cpu (cpu)")
        assert (two["processes"], two["devices"]) == ("2", "4 x cpu (cpu)")
        assert metrics["num_examples"]["total"] == total  # each example scored once
        # The same examples and counts; float32 means may differ in the last bits, since two
        # processes (4 devices) reduce in another order than one (2 devices): XLA:CPU's
        # vectorised sums differ by CPU (equal on a 2-core Xeon, 5e-9 apart on an AMD EPYC).
        assert _same_up_to_rounding(metrics, expected), limit
        assert table == expected_table, limit
    # Process 0 printed the tables and paths; process 1 wrote and printed nothing.
    assert os.path.join(multi, "eval", "test", "metrics.json") in outs[1][0]
    assert "| DFREC" in outs[1][0]
    assert "metrics.json" not in outs[2][0] and "| DFREC" not in outs[2][0]
