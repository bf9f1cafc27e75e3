"""Imports go one way: each module imports only from its own layer or the layers below
(README "Layout"). Every import counts, at module level or inside a function.

  0 base       configlib, paths, host_tf, images, batch, masking, timing
  1 model      models/, losses, inference
  2 pretrained pretrained/, loss_nets
  3 run        run/ (checkpoints, workdir, progress, multihost), trained, exported
  4 work       train/, eval/, data_pipelines/ (data_pipelines never imports train/ or eval/;
               train/ and eval/ never import each other)
  5 commands   __main__ and the commands (recover, trace, export, convert, bench, sweep, ...)
               and configs/: only this layer reads configs.
"""

import ast
import os

import pytest

from dfrec_jax import configlib

PACKAGES = ("dfrec_jax", "configs", "data_pipelines")
LAYERS = {  # module prefix -> layer; the longest prefix wins
    "dfrec_jax": 0,
    "dfrec_jax.configlib": 0,
    "dfrec_jax.paths": 0,
    "dfrec_jax.host_tf": 0,
    "dfrec_jax.images": 0,
    "dfrec_jax.batch": 0,
    "dfrec_jax.masking": 0,
    "dfrec_jax.timing": 0,
    "dfrec_jax.models": 1,
    "dfrec_jax.losses": 1,
    "dfrec_jax.inference": 1,
    "dfrec_jax.pretrained": 2,
    "dfrec_jax.loss_nets": 2,
    "dfrec_jax.run": 3,
    "dfrec_jax.trained": 3,
    "dfrec_jax.exported": 3,
    "dfrec_jax.train": 4,
    "dfrec_jax.eval": 4,
    "data_pipelines": 4,
    "dfrec_jax.__main__": 5,
    "dfrec_jax.recover": 5,
    "dfrec_jax.trace": 5,
    "dfrec_jax.export": 5,
    "dfrec_jax.convert": 5,
    "dfrec_jax.bench": 5,
    "dfrec_jax.step_profile": 5,
    "dfrec_jax.conv_profile": 5,
    "dfrec_jax.eval_profile": 5,
    "dfrec_jax.step_memory": 5,
    "dfrec_jax.learning": 5,
    "dfrec_jax.forward": 5,
    "dfrec_jax.sweep": 5,
    "dfrec_jax.video": 5,
    "dfrec_jax.html_report": 5,
    "configs": 5,
}
# Inside layer 4, the parts that must not import one another (importer, imported).
APART = {("data_pipelines", "dfrec_jax.train"), ("data_pipelines", "dfrec_jax.eval"),
         ("dfrec_jax.train", "dfrec_jax.eval"), ("dfrec_jax.eval", "dfrec_jax.train")}  # fmt: skip


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise KeyError(f"{module} is in no layer: add it to LAYERS")


def _is_within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every project module `source` imports, at any depth of the file; `from a import b`
    counts as a.b when b is a submodule name and as a otherwise (both resolve by layer)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(package + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def violations(edges) -> list[str]:
    """Each (importer, imported) pair that goes up a layer or crosses APART, as a line."""
    bad = []
    for importer, imported in sorted(edges):
        if layer(imported) > layer(importer):
            bad.append(f"{importer} (layer {layer(importer)}) imports {imported} "
                       f"(layer {layer(imported)})")  # fmt: skip
        for a, b in APART:
            if _is_within(importer, a) and _is_within(imported, b):
                bad.append(f"{importer} imports {imported}: {a} must not import {b}")
    return bad


def project_edges() -> set[tuple[str, str]]:
    edges = set()
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(configlib.REPO_ROOT, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                relative = os.path.relpath(path, configlib.REPO_ROOT)[: -len(".py")]
                is_package = name == "__init__.py"
                module = relative.replace(os.sep, ".").removesuffix(".__init__")
                with open(path, encoding="utf-8") as f:
                    for imported in imports_of(f.read(), module, is_package):
                        edges.add((module, imported))
    return edges


def test_every_import_goes_down_the_layers():
    edges = project_edges()
    assert len(edges) > 150  # the whole project was read
    assert violations(edges) == []


@pytest.mark.parametrize(
    "importer, imported",
    [
        ("dfrec_jax.eval.runner", "dfrec_jax.train.workdir"),  # work layer parts apart
        ("dfrec_jax.trained", "dfrec_jax.train.checkpoints"),  # run -> train: up
        ("dfrec_jax.pretrained.convert_released", "configs.official"),  # below commands
        ("data_pipelines.datasets", "dfrec_jax.train.trainer"),  # data -> training code
        ("dfrec_jax.models.dfrec", "dfrec_jax.recover"),  # a command from below
    ],
)
def test_an_upward_import_is_caught(importer, imported):
    assert violations({(importer, imported)}), (importer, imported)


def test_imports_inside_functions_and_relative_ones_count():
    source = "def f():\n    from configs import default\nfrom . import losses\n"
    assert imports_of(source, "dfrec_jax.masking") == {"configs.default", "dfrec_jax.losses"}
    assert imports_of("from . import step", "dfrec_jax.train", is_package=True) == {
        "dfrec_jax.train.step"
    }
