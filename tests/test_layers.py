"""The layers: the builder (`pipeline.obuilder`) stands alone, the build cluster
(`pipeline.cluster`) uses only the builder, the opam repository's parts (`pipeline.opam_repo`)
use no engine, and the engine knows nothing of the web UI, the primitives, the cluster or the
OCaml CI's and opam-repo-ci's parts.

Each import runs in a fresh interpreter, whose `sys.modules` then shows everything the import
pulled in; the sources are also read for imports inside functions, which an import alone would
not run.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline

PACKAGE = Path(pipeline.__file__).parent
UPPER_LAYERS = ("obuilder", "cluster", "web", "primitives", "ocaml", "opam_repo")
"""The subpackages of `pipeline` that are not the engine."""
COMMAND_LINE = ("cli", "__main__")
"""The command line: the top layer, which starts the engine, the web UI and the builder."""
ENGINE = sorted(f"pipeline.{module.name}" for module in pkgutil.iter_modules([str(PACKAGE)])
                if module.name not in UPPER_LAYERS + COMMAND_LINE)
OBUILDER = sorted(module.name for module in pkgutil.walk_packages(
    [str(PACKAGE / "obuilder")], prefix="pipeline.obuilder."))
CLUSTER = sorted(module.name for module in pkgutil.walk_packages(
    [str(PACKAGE / "cluster")], prefix="pipeline.cluster."))
OPAM_REPO = sorted(module.name for module in pkgutil.walk_packages(
    [str(PACKAGE / "opam_repo")], prefix="pipeline.opam_repo."))
CLUSTER_MAY_USE = ["pipeline.cluster", "pipeline.obuilder"]
"""The cluster's processes run builds with the builder, and know nothing of the engine."""


def loaded_by(module: str) -> list[str]:
    """The `pipeline` modules in `sys.modules` after `import module` in a fresh interpreter."""
    probe = (f"import json, sys, {module}; "
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'pipeline')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True, cwd=PACKAGE.parent)
    return json.loads(done.stdout)


def imported_names(path: Path) -> set[str]:
    """Every module that the source at `path` imports, at its top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def within(name: str, packages: list[str] | tuple[str, ...]) -> bool:
    return any(name == package or name.startswith(package + ".") for package in packages)


def test_the_layers_are_found() -> None:
    # A renamed package would otherwise make the checks below pass on nothing.
    assert {"pipeline.engine", "pipeline.nodes", "pipeline.term", "pipeline.usercode"} \
        <= set(ENGINE)
    assert not any(within(name, [f"pipeline.{layer}" for layer in UPPER_LAYERS])
                   for name in ENGINE)
    assert {"pipeline.obuilder.builder", "pipeline.obuilder.stores.overlayfs",
            "pipeline.obuilder.sandboxes.runc"} <= set(OBUILDER)


@pytest.mark.parametrize("module", OBUILDER)
def test_the_builder_imports_nothing_of_the_engine(module: str) -> None:
    loaded = loaded_by(module)
    outside = [name for name in loaded
               if name != "pipeline" and not within(name, ["pipeline.obuilder"])]
    assert outside == [], f"importing {module} loads {outside}"


@pytest.mark.parametrize(("layer", "allowed"), [
    ("obuilder", ["pipeline.obuilder"]),
    ("cluster", CLUSTER_MAY_USE),
])
def test_the_builders_and_the_clusters_sources_import_only_what_they_may(
        layer: str, allowed: list[str]) -> None:
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        names = imported_names(path)
        outside = sorted(name for name in names
                         if within(name, ["pipeline"]) and not within(name, allowed))
        assert outside == [], f"{path} imports {outside}"


@pytest.mark.parametrize("module", ENGINE)
def test_the_engine_imports_no_web_code_primitive_cluster_or_ci_part(module: str) -> None:
    forbidden = [f"pipeline.{layer}" for layer in UPPER_LAYERS if layer != "obuilder"]
    loaded = [name for name in loaded_by(module) if within(name, forbidden)]
    assert loaded == [], f"importing {module} loads {loaded}"
    path = PACKAGE / f"{module.removeprefix('pipeline.').replace('.', '/')}"
    sources = sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    for source in sources:
        imported = sorted(name for name in imported_names(source) if within(name, forbidden))
        assert imported == [], f"{source} imports {imported}"


@pytest.mark.parametrize("module", CLUSTER)
def test_the_cluster_imports_nothing_but_itself_and_the_builder(module: str) -> None:
    outside = [name for name in loaded_by(module)
               if name != "pipeline" and not within(name, CLUSTER_MAY_USE)]
    assert outside == [], f"importing {module} loads {outside}"
    source = PACKAGE / f"{module.removeprefix('pipeline.').replace('.', '/')}.py"
    imported = sorted(name for name in imported_names(source)
                      if within(name, ["pipeline"]) and not within(name, CLUSTER_MAY_USE))
    assert imported == [], f"{source} imports {imported}"


@pytest.mark.parametrize("module", OPAM_REPO)
def test_the_opam_repositorys_parts_load_no_engine(module: str) -> None:
    # Library code: the analysis runs in a thread of the pipeline, or alone (the benchmark).
    engine = [name for name in loaded_by(module) if name in ENGINE]
    assert engine == [], f"importing {module} loads {engine}"
