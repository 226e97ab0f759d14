"""The house rules of the package layout (ARCHITECTURE.md): the rooms stand in one order and each
imports only from rooms above it, each imports nothing it must not know, there are no import
cycles (lazy imports included), ARCHITECTURE.md lists every room, and no function or module has
outgrown its room."""

import ast
from pathlib import Path

import pytest

PDM = Path(__file__).resolve().parent.parent / "pdm"
ARCHITECTURE = PDM.parent / "ARCHITECTURE.md"
# ARCHITECTURE.md's table, top to bottom: a room imports only from rooms above it
ROOMS = (
    "pdm.startup",
    "pdm.atomic",
    "pdm.locks",
    "pdm.cli",
    "pdm.launch",
    "pdm.images",
    "pdm.schedule",
    "pdm.patching",
    "pdm.nn",
    "pdm.objectives",
    "pdm.testing",
    "pdm.sampling",
    "pdm.calibration",
    "pdm.checkpoints",
    "pdm.data",
    "pdm.metrics",
    "pdm.outputs",
    "pdm.training",
    "pdm.ablation",
)
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


# earlier names kept importable from their old room by a lazy module __getattr__ (never at import)
ALIASES = {("pdm.sampling", "pdm.calibration")}


def _pdm_edges() -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        targets = {_resolve(i) for i in _imports(path) if i.startswith("pdm")}
        edges[name] = {t for t in targets if t and t != name and (name, t) not in ALIASES}
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
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def _room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_every_import_runs_from_a_lower_room_to_a_higher_one():
    rooms = {_room(m) for m in MODULES if m != "pdm"}
    assert rooms == set(ROOMS), (
        f"rooms not placed in ROOMS / ARCHITECTURE.md: {sorted(rooms ^ set(ROOMS))}"
    )
    upward = [
        f"{a} imports {b}"
        for a, targets in _pdm_edges().items()
        if a != "pdm"
        for b in targets
        if b != "pdm" and _room(a) != _room(b) and ROOMS.index(_room(b)) > ROOMS.index(_room(a))
    ]
    assert not upward, upward


def test_architecture_lists_every_room_and_module():
    text = ARCHITECTURE.read_text()
    files = sorted(
        str(p.relative_to(PDM.parent)) for p in PDM.rglob("*.py") if p.name not in ("__init__.py",)
    )
    missing = [
        f
        for f in files
        if f"`{f}`" not in text
        and f"({Path(f).name})" not in text
        and f"`{Path(f).name}`" not in text
    ]
    assert not missing, f"ARCHITECTURE.md does not mention {missing}"
    order = [text.index(f"`{room.replace('.', '/')}") for room in ROOMS]
    assert order == sorted(order), "ARCHITECTURE.md's table must list the rooms in ROOMS' order"


FORBIDDEN = {  # ARCHITECTURE.md's table, "knows nothing of"
    "pdm.startup": ("pdm.", "torch", "lightning", "numpy"),  # it runs before the heavy imports
    "pdm.schedule": ("pdm.", "lightning", "torchvision"),
    "pdm.patching": ("pdm.", "lightning"),
    "pdm.nn": (
        "pdm.schedule",
        "pdm.objectives",
        "pdm.sampling",
        "pdm.training",
        "pdm.data",
        "lightning",
    ),
    "pdm.objectives": ("pdm.nn", "pdm.sampling", "pdm.training", "lightning"),
    "pdm.sampling": (
        "pdm.nn",
        "pdm.training",
        "pdm.data",
        "pdm.checkpoints",
        "pdm.calibration",
        "lightning",
    ),
    "pdm.calibration": (
        "pdm.nn",
        "pdm.training",
        "pdm.data",
        "pdm.checkpoints",
        "lightning",
        "argparse",
    ),
    "pdm.data": ("pdm.nn", "pdm.sampling", "pdm.training", "pdm.checkpoints"),
    "pdm.metrics": ("pdm.training", "pdm.sampling", "pdm.checkpoints", "lightning"),
    "pdm.training": ("jsonargparse", "lightning.pytorch.cli"),
    "pdm.launch": (
        "pdm.",
        "lightning.pytorch",
    ),  # which process this is: torch.distributed and the cluster only
    "pdm.cli": ("pdm.", "lightning"),  # what every command line shares: argparse and torch only
    "pdm.checkpoints": ("pdm.training", "pdm.data", "pdm.metrics", "pdm.outputs", "jsonargparse"),
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
                if (
                    imported.startswith(prefix)
                    and not imported.startswith(allowed_self)
                    and imported != room
                ):
                    if prefix == "pdm." and imported.startswith(("pdm.atomic",)):
                        continue
                    if (name, imported) in ALIASES:
                        continue
                    bad.append(f"{name} imports {imported}")
    assert not bad, bad


def _code_lines(fn: ast.AST) -> int:
    """The lines of a function's body, its docstring left out (the signature is the formatter's
    business: one parameter a line when they do not fit on one)."""
    body = fn.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(getattr(body[0], "value", None), ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]
    return 0 if not body else body[-1].end_lineno - body[0].lineno + 1


def test_no_function_outgrows_its_room():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and _code_lines(node) > MAX_FUNCTION_LINES
            ):
                long.append(f"{name}.{node.name}: {_code_lines(node)} lines")
    assert not long, long


def test_no_module_outgrows_its_room():
    big = [
        f"{name}: {len(p.read_text().splitlines())}"
        for name, p in MODULES.items()
        if len(p.read_text().splitlines()) > MAX_MODULE_LINES
    ]
    assert not big, big


# lines (as ruff formats them): the sampler, its settings, the solvers and their table, skipping,
# guidance, and the replay of a learned schedule with its file format; research lives in calibration
SAMPLING_FLOOR = 3_100


def test_the_sampling_room_holds_sampling_and_calibration_has_its_own():
    sampling = sum(len(p.read_text().splitlines()) for p in (PDM / "sampling").glob("*.py"))
    assert sampling <= SAMPLING_FLOOR, (
        f"pdm/sampling has {sampling} lines; move research out (pdm/calibration)"
    )
    assert (PDM / "calibration" / "__init__.py").exists()
    for name in (
        "budgets",
        "time_search",
        "teleport_fit",
        "screening",
        "calibration",
        "coefficients",
    ):
        assert not (PDM / "sampling" / f"{name}.py").exists(), (
            f"pdm/sampling/{name}.py belongs in pdm/calibration"
        )


def test_sample_takes_a_handful_of_arguments():
    import inspect

    from pdm.sampling import sample

    assert len(inspect.signature(sample).parameters) <= 8
