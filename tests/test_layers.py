"""The package's layers import one way: a module imports only from its own layer or below, and no cycle.

Layers, lowest first, as docs/architecture.md draws them. Every import counts, at the top of a
module, inside a function or under ``TYPE_CHECKING``: an import hidden in a function still ties
the two modules together, and is how a cycle hides.
"""

from __future__ import annotations

import ast
from pathlib import Path

import smart_proxy

PACKAGE = Path(smart_proxy.__file__).parent

#: Each module (dotted, without ``smart_proxy.``; a package's name stands for its modules) by layer.
LAYERS: list[set[str]] = [
    {"errors", "config", "logs", "jsonbody", "lifecycle", "auth", "binary", "modelinfo", "memory", "lifeline", "eventbus",
     "placement", "breaker", "routing", "queueing"},
    {"download", "catalog", "process", "pool", "metrics"},  # models and servers
    {"upstream"},  # talking to llama-servers and Ollama servers, relaying their answers
    {"dialects"},  # the APIs clients speak, no I/O
    {"agents"},
    {"handlers"},  # one function per route
    {"web"},  # the edge, the model routes on raw ASGI, the Quart-Trio app
    {"server", "http1"},  # the root nursery, and HTTP/1.1 for its Hypercorn
    {"doctor", "cli", "control", "workers", "demo", "__init__", "__main__"},
]


def modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__") or "__init__": path
        for path in PACKAGE.rglob("*.py")
    }


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for index, layer in enumerate(LAYERS):
        if module in layer or top in layer:
            return index
    raise AssertionError(f"smart_proxy.{module} is in no layer: add it to LAYERS (and docs/architecture.md)")


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``module`` imports, anywhere in it."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    if module == "__init__":
        package = []
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif node.module and node.module.startswith("smart_proxy"):
                base, node_module = [], node.module.removeprefix("smart_proxy").lstrip(".")
                node = ast.ImportFrom(module=node_module or None, names=node.names, level=1)
            else:
                continue
            target = [*base, *(node.module.split(".") if node.module else [])]
            for alias in node.names:
                candidate = ".".join([*target, alias.name])
                found.add(candidate if candidate in known else ".".join(target) or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("smart_proxy."):
                    found.add(alias.name.removeprefix("smart_proxy."))
    return {name for name in found if name in known and name != module}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {module: imports(module, path, known) for module, path in found.items()}


def test_every_module_is_in_a_layer() -> None:
    for module in modules():
        layer_of(module)


def test_imports_go_down_the_layers_only() -> None:
    backward = [
        f"smart_proxy.{module} (layer {layer_of(module)}) imports smart_proxy.{target} (layer {layer_of(target)})"
        for module, targets in graph().items()
        for target in targets
        if layer_of(target) > layer_of(module) and not module.endswith("__init__")
    ]
    assert backward == []


def test_no_import_cycle() -> None:
    edges = {module: {t for t in targets if not t.endswith("__init__")} for module, targets in graph().items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append([*trail[trail.index(target):], target] if target in trail else [module, target])
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_graph_sees_imports_inside_functions() -> None:
    """The checks above could pass on a graph that misses imports; this one knows a few that exist."""
    edges = graph()
    assert "handlers.reply" in edges["web.asgi"]
    assert "upstream.relay" in edges["dialects.openai"]
    assert "pool" in edges["upstream.relay"]  # under TYPE_CHECKING
    assert "server" in edges["cli"]


def test_the_web_frameworks_stay_at_the_top() -> None:
    """Quart is imported only by web/, Hypercorn only by server.py and http1.py: the layers below know no framework."""
    allowed = {"quart": ("web",), "quart_trio": ("web",), "werkzeug": ("web",), "hypercorn": ("server", "http1")}
    found = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in allowed and module.split(".")[0] not in allowed[top]:
                    found.append(f"smart_proxy.{module} imports {name}")
    assert found == []
