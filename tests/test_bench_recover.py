"""`bench --what recover`: it times `recover`'s own batch function with the right model,
weights and nets, and prints one consistent JSON record per batch size (no timing limits:
timings are benchmarks)."""

import json

import jax
import jax.numpy as jnp
import pytest

from dfrec_jax import bench, inference, recover, trained
from dfrec_jax.eval import identity
from dfrec_jax.run import workdir as workdir_lib
from tests import tiny

SIZE = tiny.IMAGE_SIZE


@pytest.fixture(scope="module")
def nets():
    module = tiny.TinyIdentity()
    variables = module.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    embed = jax.jit(lambda x: module.apply(variables, x)[1])
    return identity.IdentityNets(facenet=embed, dlib=embed)


@pytest.fixture
def timed(monkeypatch):
    """Records the arguments `recover.make_recover_fn` is built with (and still builds it)."""
    calls = []
    real = recover.make_recover_fn

    def spy(model, nets, seed):
        calls.append({"model": model, "nets": nets, "seed": seed})
        return real(model, nets, seed)

    monkeypatch.setattr(recover, "make_recover_fn", spy)
    return calls


def _records(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


def _check_record(record: dict, batch: int, repeats: int) -> None:
    assert record["bench"] == "recover" and record["batch"] == batch
    assert record["image_size"] == SIZE and record["repeats"] == repeats
    assert record["ms_per_batch"] > 0 and record["compile_s"] > 0
    assert record["ms_per_image"] == pytest.approx(record["ms_per_batch"] / batch, rel=1e-3)
    assert record["images_per_s"] == pytest.approx(1e3 * batch / record["ms_per_batch"], rel=1e-2)
    assert record["device"].startswith("cpu")


def test_random_init_one_record_per_batch(nets, timed, capsys):
    config = tiny.tiny_config()
    config.seed = 4
    bench.run("recover", config, batch_sizes=[1, 2], repeats=2, nets=nets)
    records = _records(capsys)
    assert [r["batch"] for r in records] == [1, 2]
    for record, batch in zip(records, (1, 2)):
        _check_record(record, batch, repeats=2)
        assert record["weights"] == "random init (seed 4)"
        assert record["config"] == workdir_lib.config_hash(config)
    (call,) = timed
    assert call["nets"] is nets and call["seed"] == 4
    assert call["model"] == inference.build_model(config)


@pytest.mark.slow  # a second compile of the recovery function (~12 s on 2 cores)
def test_workdir_weights_are_the_checkpoint(nets, timed, capsys, monkeypatch):
    """With --workdir the run's model, seed and weights are timed and named in the record (the
    checkpoint reading itself is `trained.load`'s, replaced here by its result)."""
    config = tiny.tiny_config()
    model = inference.build_model(config)
    variables = inference.init_variables(model, jax.random.key(1))
    run = trained.TrainedModel(config=config, model=model, variables=variables,
                               checkpoint_dir="/runs/x/checkpoints", step=5,
                               params_sha256="0" * 64, config_hash="feedc0ffee")  # fmt: skip
    monkeypatch.setattr(trained, "load", lambda workdir: run if workdir == "/runs/x" else None)
    other = tiny.tiny_config()
    other.seed = 3  # the bench's own --config: not what is timed, nor what the record names
    bench.run("recover", other, batch_sizes=[1], repeats=1, workdir="/runs/x", nets=nets)
    (record,) = _records(capsys)
    _check_record(record, 1, repeats=1)
    assert record["weights"] == "checkpoint /runs/x/checkpoints step 5"
    assert record["config"] == "feedc0ffee"
    (call,) = timed
    assert call["model"] is model and call["seed"] == config.seed == 0
