"""`convert --released FILE --output W`: the authors' checkpoint as a workdir the inference
commands take like a trained run, with the file's sha256 in every record made with it.

On the small random released-layout checkpoint of tests/test_convert_released.py (MAE without
a learned threshold, as the released eval script builds it), converted with the small config at
exact=released (the command's own default is the full configs/official.py:exact=released).
"""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import official
from dfrec_jax import configlib, convert, recover, trace
from dfrec_jax import trained as trained_lib
from dfrec_jax.eval import identity
from dfrec_jax.pretrained import convert_released as cr
from dfrec_jax.pretrained.checkpoint import ConversionError
from tests import lfw, tiny
from tests.test_convert_released import SIZE, released, small_config  # noqa: F401 (fixture)


def _config(learned=False):
    config = small_config()
    official.released_behaviour(config.model, learned_threshold=learned)
    return config


@pytest.fixture(scope="module")
def converted(released, tmp_path_factory):  # noqa: F811
    path, _, _ = released
    workdir = tmp_path_factory.mktemp("converted") / "run"
    provenance = convert.run(path, str(workdir), config=_config())
    return path, str(workdir), provenance


def test_workdir_holds_the_conversion_and_its_provenance(converted):
    path, workdir, provenance = converted
    for name in ("config.json", "config_hash.txt", "versions.json", trained_lib.PROVENANCE):
        assert os.path.isfile(os.path.join(workdir, name)), name
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert provenance["sha256"] == sha and provenance["bytes"] == os.path.getsize(path)
    assert provenance["not_in_the_release"] == list(cr.EXPECTED_MISSING)

    model = trained_lib.load(workdir=workdir)  # as eval / recover / export / bench read it
    assert model.provenance == provenance and model.step == 0
    assert model.config.model.tirm.token_indexing == "released"
    want, _ = cr.convert_released_checkpoint(path, _config())
    assert model.params_sha256 == trained_lib.params_sha256(want)
    assert model.checkpoint_record()["converted_from"]["sha256"] == sha


def test_recover_records_name_the_released_file(converted, tmp_path):
    path, workdir, provenance = converted
    face = (lfw.real_faces(1, SIZE)[0] * 255).round().astype(np.uint8)
    Image.fromarray(face).save(tmp_path / "face.png")
    module = tiny.TinyIdentity()
    variables = module.init(jax.random.key(1), jnp.zeros((1, SIZE, SIZE, 3)))
    embed = lambda x: module.apply(variables, x)[1]  # noqa: E731
    nets = identity.IdentityNets(facenet=embed, dlib=embed)
    out = tmp_path / "out"
    assert recover.run([str(tmp_path / "face.png")], str(out), workdir=workdir, nets=nets) == 0
    record = json.loads((out / "face.json").read_text())
    assert record["checkpoint"]["converted_from"] == provenance
    assert record["checkpoint"]["step"] == 0
    # trace ranks a gallery for those faces and carries the file's sha256 along.
    gallery = tmp_path / "gallery" / "someone"
    gallery.mkdir(parents=True)
    for i, other in enumerate(lfw.real_faces(3, SIZE)[1:]):
        Image.fromarray((other * 255).round().astype(np.uint8)).save(gallery / f"{i}.png")
    report = tmp_path / "trace.json"
    assert trace.run(str(tmp_path / "gallery"), str(out), output=str(report), nets=nets) == 0
    traced = json.loads(report.read_text())
    assert provenance["sha256"] in json.dumps(traced)


def test_refusals(released, converted, tmp_path):  # noqa: F811
    path, workdir, _ = converted
    with pytest.raises(FileExistsError, match="already holds a run"):
        convert.run(path, workdir, config=_config())
    # A learned-threshold config needs MAE(para=True)'s key: the first one missing is named.
    with pytest.raises(ConversionError, match="recover2_state_dict:threshold"):
        convert.run(path, str(tmp_path / "learned"), config=_config(learned=True))
    assert not os.path.exists(tmp_path / "learned" / "config.json")


def test_cli_names_the_first_unexpected_key(released, tmp_path):  # noqa: F811
    """Another layout (here: an extra key) is refused in one line by the command itself."""
    import torch

    _, ckpt, _ = released
    state = dict(ckpt["state_dict"], **{"decoder.extra.weight": torch.ones(1)})
    bad = tmp_path / "other.pth"
    torch.save(dict(ckpt, state_dict=state), bad)
    config = tmp_path / "small_released.py"  # the small widths at exact=released
    config.write_text(
        "from configs import official\n"
        "from tests.test_convert_released import small_config\n\n\n"
        "def get_config():\n"
        "    config = small_config()\n"
        "    official.released_behaviour(config.model)\n"
        "    return config\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "dfrec_jax", "convert", "--released", str(bad), "--output",
         str(tmp_path / "w"), "--config", str(config)],  # fmt: skip
        cwd=configlib.REPO_ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, done.stderr[-2000:]
    assert "unexpected key state_dict:decoder.extra.weight" in lines[0], lines
    assert not os.path.exists(tmp_path / "w" / "config.json")


def test_safetensors_converts_to_the_same_weights(released, converted, tmp_path):  # noqa: F811
    from safetensors.numpy import save_file

    _, ckpt, _ = released
    _, workdir, _ = converted
    flat = {f"{group}.{name}": value.numpy() for group in cr.GROUPS
            for name, value in ckpt[group].items()}  # fmt: skip
    save_file(flat, str(tmp_path / "released.safetensors"))
    convert.run(str(tmp_path / "released.safetensors"), str(tmp_path / "run"), config=_config())
    got = trained_lib.load(workdir=str(tmp_path / "run"))
    assert got.params_sha256 == trained_lib.load(workdir=workdir).params_sha256
    assert got.provenance["file"] == "released.safetensors"


@pytest.mark.slow  # a 64 px lfw_swap build, the eval, export and bench compiles: ~30 s
def test_eval_export_and_bench_take_the_converted_workdir(converted, tmp_path, capsys):
    from dfrec_jax import bench, export
    from dfrec_jax.eval import runner
    from tests import tiny_eval

    path, workdir, provenance = converted
    lfw_dir = tiny.write_lfw_tree(tmp_path / "lfw", people_per_split=(1, 1, 2))
    config = _config()
    config.data.update(lfw_dir=lfw_dir, data_dir=str(tmp_path / "tfds"), image_size=SIZE)
    config.eval.batch_size = 4
    nets = tiny_eval.eval_nets(tiny_eval.landmark_template(config))
    metrics = runner.run(config, workdir=workdir, nets=nets)
    assert metrics["checkpoint"]["converted_from"] == provenance
    assert metrics["num_examples"]["total"] == 8

    manifest = export.run(str(tmp_path / "export"), workdir=workdir, platforms=("cpu",))
    written = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert written["checkpoint"]["converted_from"]["sha256"] == provenance["sha256"]
    assert manifest["params_sha256"] == trained_lib.load(workdir=workdir).params_sha256
    assert provenance["sha256"] in (tmp_path / "export" / "README.md").read_text()

    capsys.readouterr()
    bench.run("recover", config, batch_sizes=[1], repeats=1, workdir=workdir, nets=nets.identity)
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["bench"] == "recover" and provenance["sha256"] in record["weights"]
