"""dfrec_jax/compile_cache.py: where the CLI's persistent compilation cache lives, that a
second process reads what the first compiled, and that a bad folder does not stop a command."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from dfrec_jax import compile_cache, configlib


def test_folder_from_the_environment(tmp_path):
    chosen = str(tmp_path / "cc")
    assert compile_cache.directory({compile_cache.ENV: chosen}) == chosen
    assert compile_cache.directory({compile_cache.ENV: "gs://b/cc"}) == "gs://b/cc"
    assert compile_cache.directory({"XDG_CACHE_HOME": "/x"}) == "/x/dfrec_jax/xla"
    assert compile_cache.directory({}) == os.path.expanduser("~/.cache/dfrec_jax/xla")
    for off in ("off", "OFF", "0", "none"):
        assert compile_cache.directory({compile_cache.ENV: off}) is None


@pytest.fixture
def no_jax_cache_folder():
    """JAX without a cache folder (the tests' conftest gives it one), restored after."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_a_folder_jax_already_has_is_kept(tmp_path):
    assert jax.config.jax_compilation_cache_dir  # the tests' session cache (conftest)
    kept = jax.config.jax_compilation_cache_dir
    assert compile_cache.enable({compile_cache.ENV: str(tmp_path)}) == kept
    assert jax.config.jax_compilation_cache_dir == kept


def test_enable_sets_the_folder(tmp_path, no_jax_cache_folder):
    path = compile_cache.enable({compile_cache.ENV: str(tmp_path / "cc")})
    assert path == str(tmp_path / "cc")
    assert os.path.isdir(path) and jax.config.jax_compilation_cache_dir == path


def test_off_and_unusable_folders_leave_it_off(tmp_path, capsys, no_jax_cache_folder):
    assert compile_cache.enable({compile_cache.ENV: "off"}) is None
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert compile_cache.enable({compile_cache.ENV: str(a_file / "cc")}) is None
    assert jax.config.jax_compilation_cache_dir is None
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("warning: no compilation cache") and "\n" not in warning


def _bench_forward(config_file, environ):
    run = subprocess.run(
        [sys.executable, "-m", "dfrec_jax", "bench", "--what", "forward", "--config",
         str(config_file), "--batch", "1", "--repeats", "1"],
        cwd=configlib.REPO_ROOT, env=environ, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_second_process_reads_what_the_first_compiled(tmp_path):
    """The CLI turns the cache on by itself: the first `bench` writes entries into the
    folder, the second reads them, all but one damaged on purpose (a full disk,
    a killed writer), which it compiles again."""
    config_file = tmp_path / "tiny_config.py"
    config_file.write_text(
        textwrap.dedent("""
            from tests import tiny

            def get_config(arg=None):
                return tiny.tiny_config()
        """)
    )
    environ = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    environ[compile_cache.ENV] = str(tmp_path / "cc")
    environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # cache the tiny programs too
    first = _bench_forward(config_file, environ)
    folder = tmp_path / "cc"
    entries = sorted(folder.glob("*-cache"), key=lambda p: p.stat().st_size)
    assert first["compile_cache_hits"] == 0 and len(entries) >= 2
    entries[-1].write_bytes(b"not an executable")  # the largest: the model's forward
    second = _bench_forward(config_file, environ)
    assert 1 <= second["compile_cache_hits"] <= len(entries) - 1
