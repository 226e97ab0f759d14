"""The house rules of the package layout (DESIGN.md): each room imports only what it may, no
import cycles (lazy imports included), and no function or module that has outgrown its room."""

import ast
from pathlib import Path

import pytest

PDM = Path(__file__).resolve().parent.parent / "pdm"
MAX_FUNCTION_LINES = 60  # code lines, docstring excluded
MAX_MODULE_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PDM.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PDM.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The pdm module an imported dotted name lives in (a package means its __init__)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _pdm_edges() -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        targets = {_resolve(i) for i in _imports(path) if i.startswith("pdm")}
        edges[name] = {t for t in targets if t and t != name}
    return edges


def test_no_import_cycles_anywhere_in_pdm():
    edges = _pdm_edges()
    # a package importing its own submodules is how packages work; a submodule importing its
    # package (or anything that leads back) is a cycle
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


FORBIDDEN = {  # DESIGN.md's layer table, "knows nothing of"
    "pdm.schedule": ("pdm.", "lightning", "torchvision"),
    "pdm.patching": ("pdm.", "lightning"),
    "pdm.nn": ("pdm.schedule", "pdm.objectives", "pdm.sampling", "pdm.training", "pdm.data", "lightning"),
    "pdm.objectives": ("pdm.nn", "pdm.sampling", "pdm.training", "lightning"),
    "pdm.sampling": ("pdm.nn", "pdm.training", "pdm.data", "pdm.checkpoints", "lightning"),
    "pdm.data": ("pdm.nn", "pdm.sampling", "pdm.training", "pdm.checkpoints"),
    "pdm.metrics": ("pdm.training", "pdm.sampling", "pdm.checkpoints", "lightning"),
    "pdm.training": ("jsonargparse", "lightning.pytorch.cli"),
    "pdm.launch": ("pdm.", "lightning.pytorch"),  # which process this is: torch.distributed and the cluster only
}


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_each_room_imports_only_what_its_layer_may(room):
    allowed_self = room + "."
    bad = []
    for name, path in MODULES.items():
        if name != room and not name.startswith(allowed_self):
            continue
        for imported in _imports(path):
            for prefix in FORBIDDEN[room]:
                if imported.startswith(prefix) and not imported.startswith(allowed_self) and imported != room:
                    if prefix == "pdm." and imported.startswith(("pdm.atomic",)):
                        continue
                    bad.append(f"{name} imports {imported}")
    assert not bad, bad


def _code_lines(fn: ast.AST) -> int:
    lines = set(range(fn.lineno, fn.end_lineno + 1))
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        lines -= set(range(body[0].lineno, body[0].end_lineno + 1))
    return len(lines)


def test_no_function_outgrows_its_room():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > MAX_FUNCTION_LINES:
                long.append(f"{name}.{node.name}: {_code_lines(node)} lines")
    assert not long, long


def test_no_module_outgrows_its_room():
    big = [f"{name}: {len(p.read_text().splitlines())}" for name, p in MODULES.items()
           if len(p.read_text().splitlines()) > MAX_MODULE_LINES]
    assert not big, big
