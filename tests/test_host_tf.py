"""TensorFlow is kept off the accelerators by one module (dfrec_jax/host_tf.py), which every
project module that uses TensorFlow or TFDS imports; and out of the processes that read no data
by one rule: imports sit at module level, except an import that brings TensorFlow into a module
that works without it (a JAX-only machine has no TensorFlow), or a dependency that is
optional (`OPTIONAL`)."""

import ast
import os
import re
import subprocess
import sys
import textwrap
import types

import pytest

from dfrec_jax import configlib, host_tf

TENSORFLOW = ("tensorflow", "tensorflow_datasets", "dfrec_jax.host_tf")
# Dependencies imported where used: absent on a JAX-only machine, or (mtcnn) seconds of Keras
# import that only face detection needs.
OPTIONAL = {
    "mtcnn": "face detection only; loads Keras (seconds)",
    "safetensors": "weight converters only",
    "tests.torch_peer": "PyTorch: a test dependency, bench --what peer_torch only",
}

_TF_IMPORT = re.compile(r"^\s*(import tensorflow|from tensorflow)", re.MULTILINE)
# `from dfrec_jax.host_tf import tf`, or host_tf among `from dfrec_jax import ...` (one line or
# a parenthesised block).
_HOST_TF = re.compile(
    r"^\s*from dfrec_jax(\.host_tf import tf\b| import (\([^)]*|[^\n(]*)\bhost_tf\b)", re.MULTILINE
)


def _library_files():
    for package in ("dfrec_jax", "data_pipelines", "configs"):
        for folder, _, files in os.walk(os.path.join(configlib.REPO_ROOT, package)):
            yield from (os.path.join(folder, f) for f in files if f.endswith(".py"))


def test_every_tensorflow_user_goes_through_host_tf():
    users, missing = [], []
    for path in _library_files():
        if path.endswith(os.path.join("dfrec_jax", "host_tf.py")):
            continue
        text = open(path).read()
        if _TF_IMPORT.search(text):
            users.append(path)
            if not _HOST_TF.search(text):
                missing.append(os.path.relpath(path, configlib.REPO_ROOT))
    assert len(users) >= 8  # the scan sees the pipeline, the builders and the workdir code
    assert not missing, f"import TensorFlow through dfrec_jax.host_tf in: {missing}"


class _FakeConfig:
    def __init__(self, error=None):
        self.calls, self.error = [], error

    def set_visible_devices(self, devices, device_type):
        self.calls.append((devices, device_type))
        if self.error:
            raise self.error


def test_hide_accelerators_hides_gpu_and_tpu_and_warns_when_too_late(caplog):
    config = _FakeConfig()
    host_tf.hide_accelerators(types.SimpleNamespace(config=config))
    assert config.calls == [([], "GPU"), ([], "TPU")]
    late = _FakeConfig(RuntimeError("Visible devices cannot be modified after being initialized"))
    with caplog.at_level("WARNING"):
        host_tf.hide_accelerators(types.SimpleNamespace(config=late))
    assert "already initialised" in caplog.text
    with pytest.raises(TypeError):  # anything else is not swallowed
        host_tf.hide_accelerators(types.SimpleNamespace(config=_FakeConfig(TypeError("x"))))
    # This process: TensorFlow sees no accelerator.
    assert host_tf.tf.config.get_visible_devices("GPU") == []


def _modules():
    """{module name: (module-level imports, function-level imports (line, name))} of the
    project. Module level includes a module-level try/if (an import guarded there)."""
    found = {}
    for path in _library_files():
        relative = os.path.relpath(path, configlib.REPO_ROOT)[: -len(".py")]
        module = relative.replace(os.sep, ".").removesuffix(".__init__")
        tree = ast.parse(open(path).read())
        top, inner = set(), []
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                names = [f"{node.module}.{a.name}" for a in node.names] if node.module else []
            in_function = any(
                isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node in ast.walk(outer)
                for outer in ast.walk(tree)
            )
            if in_function:
                inner += [(node.lineno, n) for n in names]
            else:
                top |= set(names)
        found[module] = (top, inner)
    return found


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def tensorflow_side(modules) -> set[str]:
    """Modules that import TensorFlow when imported: directly, through host_tf, or through
    another such module (all of data_pipelines, the trainer, the eval runner, ...)."""
    side = {m for m in modules if _within(m, TENSORFLOW)}
    while True:
        brings = side | set(TENSORFLOW)
        more = {m for m, (top, _) in modules.items()
                if m not in side and any(_within(n, brings) for n in top)}  # fmt: skip
        if not more:
            return side
        side |= more


def test_function_level_imports_only_keep_tensorflow_or_optional_deps_out():
    modules = _modules()
    side = tensorflow_side(modules)
    assert {"data_pipelines.datasets", "dfrec_jax.train.trainer", "dfrec_jax.eval.runner"} <= side
    assert not side & {"dfrec_jax.recover", "dfrec_jax.bench", "dfrec_jax.trained",
                       "dfrec_jax.train.step", "dfrec_jax.__main__"}  # fmt: skip
    allowed, bad = 0, []
    for module, (_, inner) in sorted(modules.items()):
        for line, name in inner:
            brings_tf = module not in side and _within(name, side | set(TENSORFLOW))
            if brings_tf or _within(name, OPTIONAL):
                allowed += 1
            else:
                bad.append(f"{module}:{line} imports {name} inside a function: import it at "
                           "module level")  # fmt: skip
    assert allowed >= 5  # the scan sees the lazy TensorFlow imports
    assert bad == []


def test_the_rule_catches_a_function_level_import():
    source = "import os\ndef f():\n    from dfrec_jax import losses\n"
    tree = ast.parse(source)
    assert [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]  # parsed as written
    modules = {"dfrec_jax.x": ({"os"}, [(3, "dfrec_jax.losses")]), "dfrec_jax.losses": (set(), [])}
    assert tensorflow_side(modules) == set()
    with_tf = dict(modules, **{"data_pipelines.y": ({"tensorflow_datasets"}, [])})
    assert tensorflow_side(with_tf) == {"data_pipelines.y"}


def test_every_module_but_the_tensorflow_side_imports_without_tensorflow():
    """What a JAX-only machine (the GPU hosts here have no TensorFlow) can run: every module
    outside the TensorFlow side imports with TensorFlow and TFDS made unimportable."""
    modules = _modules()
    jax_only = sorted(set(modules) - tensorflow_side(modules))
    assert "dfrec_jax.bench" in jax_only and "dfrec_jax.recover" in jax_only
    script = textwrap.dedent(f"""
        import importlib, sys
        for name in ("tensorflow", "tensorflow_datasets"):
            sys.modules[name] = None  # `import tensorflow` now raises ImportError
        for module in {jax_only!r}:
            importlib.import_module(module)
        assert "tensorflow" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("imported", len({jax_only!r}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=configlib.REPO_ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"imported {len(jax_only)}"
