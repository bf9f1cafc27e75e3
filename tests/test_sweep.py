"""Config sweeps (dfrec_jax/sweep.py, configs/sweeps/): points, names, checks, commands."""

import io
import os
import shlex
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import default, demo
from dfrec_jax import configlib, sweep
from dfrec_jax.models import DFREC

SWEEP_FILE = "configs/sweeps/mask_ratio_and_weights.py"


@pytest.fixture(autouse=True)
def repo_root(monkeypatch):
    monkeypatch.chdir(configlib.REPO_ROOT)  # config / sweep paths are relative to the repo


def test_sweep_file_is_the_documented_grid():
    points = sweep.load_sweep(SWEEP_FILE)
    grid = {(p["model.mask_ratio"], p["loss.weights.identity"]) for p in points}
    assert len(points) == 6
    assert grid == {(r, w) for r in (0.25, 0.5, 0.75) for w in (0.5, 1.0)}


@pytest.mark.parametrize("config", [demo.get_config(), default.get_config()])
def test_identity_tokens_follow_the_mask_ratio(config):
    # 196 patches (112/8 and 224/16): 49, 98, 147 masked; the model derives its identity rows.
    points = sweep.load_sweep(SWEEP_FILE)
    built = {
        p["model.mask_ratio"]: DFREC.from_config(sweep.apply_overrides(config, p).model)
        for p in points
    }
    assert {r: m.sirm.identity_tokens for r, m in built.items()} == {0.25: 147, 0.5: 98, 0.75: 49}
    assert config.model.mask_ratio == 0.5 and config.model.sirm.identity_tokens == 0  # a copy


def test_sequence_fusion_keeps_its_identity_tokens():
    config = demo.get_config("fusion=sequence")
    points = sweep.load_sweep(SWEEP_FILE)
    models = [DFREC.from_config(sweep.apply_overrides(config, p).model) for p in points]
    assert {m.sirm.identity_tokens for m in models} == {16}


def test_every_sweep_point_builds_a_model():
    config = demo.get_config()
    points = sweep.load_sweep(SWEEP_FILE)
    sweep.check_models([sweep.apply_overrides(config, p) for p in points])  # raises if not
    # An explicit identity row count that the mask ratio does not leave: the check sees it.
    wrong = {"model.mask_ratio": 0.25, "model.sirm.identity_tokens": 98}
    with pytest.raises(ValueError, match="sweep point 0: .*one identity row per visible patch"):
        sweep.check_models([sweep.apply_overrides(config, wrong)])


def test_overrides_apply_to_a_locked_copy_and_name_bad_keys():
    config = demo.get_config()
    applied = sweep.apply_overrides(config, {"train.steps": 7, "loss.weights.identity": 1})
    assert applied.train.steps == 7 and applied.loss.weights.identity == 1.0
    assert isinstance(applied.loss.weights.identity, float)
    assert config.train.steps == demo.get_config().train.steps  # the original is untouched
    with pytest.raises(ValueError, match=r"unknown config key 'train.stepz'.*did you mean 'steps'"):
        sweep.apply_overrides(config, {"train.stepz": 3})
    with pytest.raises(ValueError, match=r"unknown config key 'modl'.*did you mean 'model'"):
        sweep.apply_overrides(config, {"modl.mask_ratio": 0.25})
    with pytest.raises(ValueError, match="config key 'seed' holds a int, not a group"):
        sweep.apply_overrides(config, {"seed.x": 1})
    with pytest.raises(ValueError, match="config key 'train.steps' holds a int, got 'many'"):
        sweep.apply_overrides(config, {"train.steps": "many"})
    with pytest.raises(ValueError, match="'model.sirm' is a group"):
        sweep.apply_overrides(config, {"model.sirm": 3})


def test_point_names_use_the_varying_keys_and_skip_ones_that_follow():
    points = [
        {"model.mask_ratio": r, "model.sirm.identity_tokens": t, "loss.weights.identity": w}
        for r, t in ((0.25, 147), (0.5, 98))
        for w in (0.5, 1.0)
    ]
    assert sweep.point_names(points) == [
        "mask_ratio=0.25,identity=0.5",
        "mask_ratio=0.25,identity=1.0",
        "mask_ratio=0.5,identity=0.5",
        "mask_ratio=0.5,identity=1.0",
    ]
    # Same last component: longer suffixes tell them apart; constant keys are left out.
    clash = [{"a.x": i, "b.x": j, "seed": 0} for i, j in ((0, 0), (0, 1), (1, 0))]
    assert sweep.point_names(clash) == ["a.x=0,b.x=0", "a.x=0,b.x=1", "a.x=1,b.x=0"]
    follows = [{"a.x": i, "b.x": 2 * i} for i in range(2)]  # b.x only follows a.x
    assert sweep.point_names(follows) == ["x=0", "x=1"]
    assert sweep.point_names([{"data.methods": ("FTM", "E4S")}]) == ["base"]
    with pytest.raises(ValueError, match="not all different"):
        sweep.point_names([{"seed": 1}, {"seed": 1}])


def _parse_like_the_cli(argv):
    """The config a `python -m dfrec_jax ...` argv gives, parsed by ml_collections itself."""
    values = flags.FlagValues()
    flag = config_flags.DEFINE_config_file("config", None, "c", flag_values=values, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "w", flag_values=values)
    values([argv[0], *argv[4:]])  # drop "-m dfrec_jax train"
    return flag.value


def test_dry_run_prints_commands_that_apply_cleanly(tmp_path):
    workdir = str(tmp_path / "sweep")
    run = subprocess.run(
        [sys.executable, "-m", "dfrec_jax", "sweep", "--config", "configs/demo.py",
         f"--sweep={SWEEP_FILE}", f"--workdir={workdir}", "--dry_run",
         "--config.train.steps=7"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    commands = [shlex.split(line) for line in run.stdout.splitlines()]
    assert len(commands) == 6 and not os.path.exists(workdir)  # printed, nothing ran
    base = demo.get_config()
    points = sweep.load_sweep(SWEEP_FILE)
    names = set()
    for argv, point in zip(commands, points):
        assert argv[1:5] == ["-m", "dfrec_jax", "train", "--config=configs/demo.py"]
        assert argv[5].startswith(f"--workdir={workdir}{os.sep}")
        names.add(argv[5])
        parsed = _parse_like_the_cli(argv)
        expected = sweep.apply_overrides(base, {"train.steps": 7, **point})
        assert parsed.to_dict() == expected.to_dict()
        assert parsed.train.steps == 7
        assert parsed.model.mask_ratio == point["model.mask_ratio"]
    assert len(names) == 6
    assert f"--workdir={workdir}/mask_ratio=0.75,identity=1.0" in [c[5] for c in commands]


def test_run_goes_on_after_a_failed_point(tmp_path):
    ran = []

    def runner(argv):
        ran.append(argv)
        return 3 if len(ran) == 2 else 0

    out = io.StringIO()
    config = demo.get_config()
    failed = sweep.run("configs/demo.py", config, SWEEP_FILE, str(tmp_path), out=out, runner=runner)
    assert failed == 1 and len(ran) == 6
    assert "sweep point mask_ratio=0.25,identity=1.0 failed (exit 3)" in out.getvalue()
    assert '"failed": ["mask_ratio=0.25,identity=1.0"]' in out.getvalue()


def test_bad_sweep_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="sweep file 'nope.py' not found"):
        sweep.load_sweep("nope.py")
    empty = tmp_path / "empty.py"
    empty.write_text("def get_sweep(arg=None):\n    return []\n")
    with pytest.raises(ValueError, match="non-empty list of dicts"):
        sweep.load_sweep(str(empty))
    typo = tmp_path / "typo.py"
    typo.write_text("def get_sweep(arg=None):\n    return [{'model.mask_ration': 0.3}]\n")
    with pytest.raises(ValueError, match="did you mean 'mask_ratio'"):
        sweep.run("configs/demo.py", demo.get_config(), str(typo), str(tmp_path), dry_run=True)
