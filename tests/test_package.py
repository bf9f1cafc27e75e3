"""The project installs as a package (pyproject.toml): `dfrec-jax` and its three packages work
from any directory, editable (what ./run.sh installs) or as a plain `pip install .`."""

import json
import os
import shutil
import subprocess
import sys

from dfrec_jax import configlib

PACKAGES = ("dfrec_jax", "configs", "data_pipelines")


def _run(argv, cwd, **env):
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, **env})  # fmt: skip


def test_console_script_runs_from_another_directory(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "dfrec-jax")
    assert os.path.isfile(script), "run ./run.sh once: it installs the project (pip install -e .)"
    demo = os.path.join(configlib.REPO_ROOT, "configs", "demo.py")
    # A config that imports `configs.default` parses away from the repository: the packages
    # are installed, not found through the working directory.
    run = _run([script, "train", "--config", demo, "--config.train.stepz=1",
                f"--workdir={tmp_path / 'w'}"], cwd=tmp_path, PYTHONPATH="")  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert "unknown config key 'train.stepz'" in run.stderr
    assert not (tmp_path / "w").exists()


def test_plain_install_has_the_three_packages_and_uses_the_working_directory(tmp_path):
    # From a copy: setuptools builds in the source tree (build/), which must stay clean.
    source = tmp_path / "source"
    for name in PACKAGES:
        shutil.copytree(os.path.join(configlib.REPO_ROOT, name), source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(os.path.join(configlib.REPO_ROOT, name), source / name)
    target = tmp_path / "site"
    install = _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(source)],
                   cwd=tmp_path)  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]
    assert set(PACKAGES) <= set(os.listdir(target))
    assert not (target / "tests").exists()  # tests stay in the repository
    probe = (
        "import json; from dfrec_jax import configlib; from configs import demo; "
        "print(json.dumps([configlib.__file__, configlib.REPO_ROOT, "
        "demo.get_config().model.image_size]))"
    )
    work = tmp_path / "work"
    work.mkdir()
    run = _run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); "
                + probe], cwd=work)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    module, root, size = json.loads(run.stdout.splitlines()[-1])
    assert module.startswith(str(target)) and root == str(work) and size == 112
