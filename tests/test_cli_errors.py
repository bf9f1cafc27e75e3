"""The CLI's error boundary: each user mistake (paths, permissions, config files, damaged
runs) is one `error:` line and a non-zero exit, checked before any model is built where it
can be. All cases run through the real flag parser and `main` in one child process (one
interpreter start for the table)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from dfrec_jax import configlib

_DRIVER = r"""
import contextlib, io, json, sys
from absl import flags
from dfrec_jax import __main__ as cli

results = []
for argv in json.loads(sys.argv[1]):
    flags.FLAGS.unparse_flags()
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            args = cli.parse_flags(["dfrec_jax", *argv])
            code = cli.main(args)
        except SystemExit as e:
            code = e.code
        except Exception as e:  # a traceback escaped the boundary
            code = f"{type(e).__name__}: {e}"
    results.append({"code": code, "err": err.getvalue()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def paths(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "a_file.txt").write_text("not a folder\n")
    (root / "recovery").mkdir()
    (root / "gallery").mkdir()
    damaged = root / "damaged_run"
    shutil.copytree(tiny_run, damaged)
    for folder, _, files in os.walk(damaged / "checkpoints"):
        for name in files:
            if os.path.basename(folder) == "d":
                os.truncate(os.path.join(folder, name), 4)
    return {"root": root, "run": tiny_run, "damaged": damaged}


def _cases(p):
    root, run, file = p["root"], str(p["run"]), str(p["root"] / "a_file.txt")
    under_file = os.path.join(file, "sub")
    return [  # (argv, expected start of the error line)
        (["train", "--config", "nope.py", "--workdir", str(root / "w")],
         "error: --config: "),
        (["train", "--config", "configs/demo.py", "--workdir", file],
         f"error: --workdir {file} exists and is not a folder"),
        (["train", "--config", "configs/demo.py", "--workdir", under_file],
         f"error: --workdir {under_file}: cannot create the folder"),
        (["recover", "--workdir", run, "--input", file, "--output", file],
         f"error: --output {file} exists and is not a folder"),
        (["recover", "--workdir", str(root / "missing"), "--input", file, "--output",
          str(root / "o")], f"error: --workdir {root / 'missing'}: not found"),
        (["recover", "--checkpoint", file, "--input", file, "--output", str(root / "o")],
         f"error: --checkpoint {file}: not a folder"),
        (["recover", "--workdir", str(p["damaged"]), "--input", file, "--output",
          str(root / "o2")], "error: no intact checkpoint in "),
        (["export", "--workdir", run, "--output", file],
         f"error: --output {file} exists and is not a folder"),
        (["trace", "--gallery", str(root / "gallery"), "--input", str(root / "recovery"),
          "--output", str(root)], f"error: --output {root} is a folder"),
        (["trace", "--gallery", str(root / "gallery"), "--input", str(root / "recovery"),
          "--output", str(root / "none" / "t.json")], f"error: --output {root / 'none' / 't.json'}: folder"),
        (["eval", "--config", "configs/demo.py", "--workdir", str(root / "missing")],
         f"error: --workdir {root / 'missing'}: not found"),
        (["forward", "--config", "configs/demo.py", "--output", file],
         f"error: --output {file} exists and is not a folder"),
    ]  # fmt: skip


def test_user_errors_are_one_line_before_any_model(paths):
    cases = _cases(paths)
    run = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps([argv for argv, _ in cases])],
        cwd=configlib.REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for (argv, expected), got in zip(cases, results):
        lines = [line for line in got["err"].splitlines() if line.startswith("error:")]
        assert isinstance(got["code"], int) and got["code"] != 0, (argv, got)
        assert len(lines) == 1 and lines[0].startswith(expected), (argv, got["err"][-2000:])
        assert "Traceback" not in got["err"], (argv, got["err"][-2000:])
    assert not (paths["root"] / "o").exists()  # nothing created for a command that failed
