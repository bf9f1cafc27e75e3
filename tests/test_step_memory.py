"""`bench --what memory` (dfrec_jax/step_memory.py): per-device bytes of the compiled train
step on 8 emulated devices, and the FSDP rule's 1/fsdp split of parameters and moments."""

import jax
import numpy as np
import pytest

from dfrec_jax import step_memory
from tests import tiny


def _measure(batches, fsdp_sizes):
    config = tiny.tiny_config()
    config.mesh.fsdp_min_size = 64  # the tiny model's kernels are small: shard most of them
    return step_memory.measure(config, batches, fsdp_sizes, loss_nets=tiny.tiny_loss_nets())


@pytest.fixture(scope="module")
def records():
    return _measure([8], [1, 8])  # two compiles


def _by(records, fsdp, batch=8):
    (record,) = [r for r in records if r["mesh"]["fsdp"] == fsdp and r["batch"] == batch]
    return record


def test_parameters_and_moments_split_by_fsdp(records):
    assert jax.device_count() == 8
    whole, split8 = _by(records, 1), _by(records, 8)
    assert whole["params_bytes"] == whole["params_bytes_unsharded"]
    assert whole["replicated_params"]["elements"] * 4 == whole["params_bytes"]  # fp32 params
    kept = split8["replicated_params"]["elements"] * 4  # bytes every device still holds whole
    assert 0 < kept < whole["params_bytes"] / 4  # most bytes are in split leaves
    assert split8["params_bytes"] == kept + (whole["params_bytes"] - kept) // 8
    for r in (whole, split8):  # AdamW's two moments follow their parameters (+ a few scalars)
        assert abs(r["opt_state_bytes"] - 2 * r["params_bytes"]) < 64


def test_data_parallel_step_moves_no_batch_rows(records):
    """The tiny real DFREC's step on 8 data-parallel devices (fsdp 1) compiles with
    all-reduces only: no all-gather (the token scatters keep the batch axis sharded,
    masking.scatter_tokens) and no all-to-all or collective-permute (the loss networks see each
    example's recovered faces interleaved, on the example's device, losses._interleave)."""
    record = _by(records, 1)
    assert record["mesh"] == {"data": 8, "fsdp": 1}
    assert set(record["collectives"]) == {"all-reduce"}, record["collectives"]
    # FSDP gathers its parameters for the forward pass: the count sees it.
    assert _by(records, 8)["collectives"].get("all-gather", 0) > 0


def test_collective_counts_of_a_sharded_program():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    x = jax.device_put(np.arange(16.0, dtype=np.float32), split)
    summed = jax.jit(lambda v: v.sum()).lower(x).compile().as_text()
    assert step_memory.collective_counts(summed) == {"all-reduce": 1}
    gathered = jax.jit(lambda v: v * 2, out_shardings=whole).lower(x).compile().as_text()
    assert step_memory.collective_counts(gathered) == {"all-gather": 1}
    local = jax.jit(lambda v: v * 2).lower(x).compile().as_text()
    assert step_memory.collective_counts(local) == {}


def test_compiled_memory_is_reported(records):
    for r in records:
        assert r["argument_bytes"] >= r["params_bytes"] + r["opt_state_bytes"]
        assert r["argument_bytes"] >= r["frozen_nets_bytes"]  # the weights are arguments
        assert r["temp_bytes"] > 0
        assert r["peak_bytes"] == (
            r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
        )
    # Sharding the state over more devices lowers what each device keeps as arguments.
    assert _by(records, 8)["argument_bytes"] < _by(records, 1)["argument_bytes"]


@pytest.mark.slow  # two more compiles
def test_temporary_memory_grows_with_the_batch():
    small, large = _measure([8, 16], [2])
    assert large["temp_bytes"] > small["temp_bytes"]
    assert step_memory.fitting_batch([small, large], 1000) >= 16


def test_fitting_batch_follows_the_line_through_two_batches():
    gib = step_memory.GIB
    mesh = {"data": 8, "fsdp": 1}
    records = [
        {"mesh": mesh, "batch": 8, "peak_bytes": 10 * gib},
        {"mesh": mesh, "batch": 16, "peak_bytes": 12 * gib},  # 0.25 GiB per example
    ]
    assert step_memory.fitting_batch(records, 24) == 64  # fixed 8 GiB: (24 - 8) / 0.25
    assert step_memory.fitting_batch(records, 10) == 8  # (10 - 8) / 0.25, a multiple of 8
    assert step_memory.fitting_batch(records, 7) is None  # the fixed 8 GiB do not fit
