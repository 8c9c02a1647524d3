"""The layers point down: no import cycle among diffexp's modules (function-level imports
included), every module imports only its own layer and the layers below it (the order of the
README's Layout section), and the core (``diffusion/``) and ``metrics/`` import neither Hydra nor
Lightning. Checked by parsing every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffexp"
FRAMEWORKS = ("hydra", "omegaconf", "pytorch_lightning", "lightning", "lightning_fabric")
# a layer may import itself and what is listed here (of diffexp), nothing else of diffexp
BELOW = {"diffexp.diffusion": (), "diffexp.metrics": ("diffexp.diffusion",)}
# the layers, bottom up; a module may import its own layer and those with a lower number. The
# top-level modules other than cli are the entry points.
LAYERS = {
    "diffexp.cli": 0,
    "diffexp.diffusion": 1,
    "diffexp.data": 2,
    "diffexp.metrics": 2,
    "diffexp.networks": 3,
    "diffexp.training": 4,
    "diffexp.build": 5,
}
ENTRY_POINTS = 6


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(name: str, path: Path) -> set[str]:
    """Every module name an import statement anywhere in the file names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def _diffexp_deps(name: str) -> set[str]:
    """The diffexp modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    deps = set()
    for imported in _imported(name, MODULES[name]):
        while imported and imported not in MODULES:
            imported = imported.rpartition(".")[0]
        if imported and imported != name:
            deps.add(imported)
    return deps


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_diffexps_modules():
    graph = {name: _diffexp_deps(name) for name in MODULES}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("layer", sorted(BELOW))
def test_the_core_and_metrics_import_no_framework_and_nothing_above_them(layer):
    for name in (n for n in MODULES if n == layer or n.startswith(layer + ".")):
        roots = {m.split(".")[0] for m in _imported(name, MODULES[name])}
        assert not roots & set(FRAMEWORKS), (name, roots & set(FRAMEWORKS))
        allowed = (layer, *BELOW[layer])
        above = [d for d in _diffexp_deps(name) if not d.startswith(allowed)]
        assert not above, (name, above)


def _layer(name: str) -> int:
    for prefix, layer in LAYERS.items():
        if name == prefix or name.startswith(prefix + "."):
            return layer
    assert name.count(".") <= 1, f"{name} is in no layer: add its package to LAYERS and the README"
    return ENTRY_POINTS


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports_only_its_layer_and_those_below(name):
    layer = _layer(name)
    upward = [d for d in _diffexp_deps(name) if _layer(d) > layer]
    assert not upward, f"{name} (layer {layer}) imports {upward} from above it"


CONFIG_FRAMEWORKS = ("hydra", "omegaconf")


@pytest.mark.parametrize("layer", ["diffexp.data", "diffexp.networks"])
def test_data_and_networks_import_no_config_framework(layer):
    """Data modules and networks are built from their constructor arguments (Hydra calls them);
    they never read a config themselves."""
    for name in (n for n in MODULES if n == layer or n.startswith(layer + ".")):
        roots = {m.split(".")[0] for m in _imported(name, MODULES[name])}
        assert not roots & set(CONFIG_FRAMEWORKS), (name, roots & set(CONFIG_FRAMEWORKS))
