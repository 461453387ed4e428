"""The layering of ``pretrain/``: each module imports only modules of the layers below its own.

Every import is read from the source with ``ast`` (module level, function level and under
``TYPE_CHECKING``), so an import placed inside a function to dodge a cycle is still an edge. A
module of ``pretrain.data`` or ``pretrain.serve`` belongs to its package's layer; ``kernels`` is
the project's other package. The tests fail on an edge that goes up the order, on an edge between
peers (modules of one layer that must not know each other), on a cycle, on a module that has no
layer yet, and on a function-level import of the project that is not an exception listed with
its reason. Only a module's program entry, the block under ``if __name__ == "__main__":``, may
import from above (``torchrun -m pretrain.train`` enters the command line there): it runs when
the file is the program, never when the module is imported.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module may import modules of its own layer unless the layer is a peer layer,
# and any module of the layers below. "pretrain" is the package's own __init__.
LAYERS: list[tuple[tuple[str, ...], bool]] = [  # (modules, peers)
    (("pretrain", "errors", "config"), False),  # the one user error, the config schema
    (("tokenizer", "text", "devices", "sampling"), False),  # leaf helpers: tokens, text, devices
    (("chat",), False),  # the chat template (tokens and roles of the tokenizer)
    (("kernels",), False),  # fused ops, Triton on CUDA and PyTorch elsewhere
    (("model",), False),  # the transformer, single-device PyTorch
    (("data", "optim", "parallel", "initialize"), True),  # data; optimizers; FSDP; init shards
    (("checkpoint",), False),  # DCP checkpoints: save, resume, read weights
    (("lora",), False),  # LoRA adapters on the model; their checkpoints, merge and PEFT files
    (("hf",), False),  # the Hugging Face layout: names, config.json
    (("export",), False),  # export directories: write, verify, load
    (("inference",), False),  # an export loaded for generation and serving
    (("metrics", "plot", "sft", "plan"), False),  # run logs and plots; SFT data; the scale plan
    (("train",), False),  # the training loop
    (("finetune", "generate", "serve", "evaluate"), True),  # the commands on training, inference
    (("cli", "launch"), False),  # the command line and the torchrun launcher
]

# Function-level imports of the project, each with why it cannot be at module level.
ALLOWED_FUNCTION_LEVEL: dict[tuple[str, str], str] = {
    ("pretrain/serve/server.py", "pretrain.inference"): (
        "the server binds its port and answers /health before torch is imported"
    ),
    ("pretrain/serve/state.py", "pretrain.inference"): (
        "the export is loaded on a thread after the port is bound; torch loads then"
    ),
    ("pretrain/serve/state.py", "pretrain.serve.engine"): (
        "the engine imports torch, which the server loads only after binding its port"
    ),
    ("pretrain/serve/openai.py", "pretrain.serve.engine"): (
        "the engine imports torch, which the server loads only after binding its port"
    ),
}


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository, e.g. "pretrain/serve/state.py"
    line: int
    source: str  # the importing module, e.g. "pretrain.serve.state"
    target: str  # the imported module, e.g. "pretrain.inference"
    in_function: bool

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.source} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files() -> list[Path]:
    return sorted((ROOT / "pretrain").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))


MODULES = {module_name(p) for p in project_files()}


def is_project(name: str) -> bool:
    return name.split(".")[0] in ("pretrain", "kernels")


def resolve(name: str) -> str:
    """The longest known module that ``name`` (a module or ``module.attribute``) starts with."""
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts) or name


def imported_modules(node: ast.Import | ast.ImportFrom, source: str, is_package: bool) -> list[str]:
    """The project modules an import statement loads (``from pkg import sub`` loads ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        return [resolve(a.name) for a in node.names if is_project(a.name)]
    base = node.module or ""
    if node.level:
        package = source.split(".") if is_package else source.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    if not is_project(base):
        return []
    return sorted({resolve(f"{base}.{a.name}") for a in node.names})


def _function_scopes(tree: ast.AST) -> set[int]:
    """ids of the import nodes that sit inside a function body."""
    inside: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return inside


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``"""
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and len(test.comparators) == 1
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value == "__main__"
    )


def _program_entry(tree: ast.Module) -> set[int]:
    """ids of the import nodes under a module-level ``if __name__ == "__main__":``."""
    return {
        id(n)
        for guard in tree.body
        if _is_main_guard(guard)
        for n in ast.walk(guard)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    }


def read_imports(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    source = module_name(path)
    in_function = _function_scopes(tree)
    entry = _program_entry(tree)
    file = path.relative_to(ROOT).as_posix()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in entry:
            for target in imported_modules(node, source, path.name == "__init__.py"):
                found.append(Import(file, node.lineno, source, target, id(node) in in_function))
    return sorted(found, key=lambda i: (i.file, i.line, i.target))


ALL_IMPORTS = [i for p in project_files() for i in read_imports(p)]


def group(module: str) -> str:
    """The layering unit of a module: its package for ``data``, ``serve`` and ``kernels``."""
    parts = module.split(".")
    if parts[0] == "kernels" or module == "pretrain":
        return parts[0]
    return parts[1]


LAYER_OF = {name: i for i, (names, _) in enumerate(LAYERS) for name in names}
PEERS = {i for i, (_, peers) in enumerate(LAYERS) if peers}


def test_every_module_has_a_layer():
    missing = sorted({group(m) for m in MODULES} - set(LAYER_OF))
    assert not missing, f"place these modules in LAYERS (tests/test_layering.py): {missing}"


def test_no_import_goes_up_the_order_or_between_peers():
    bad = []
    for imp in ALL_IMPORTS:
        src, dst = group(imp.source), group(imp.target)
        if src == dst or src not in LAYER_OF or dst not in LAYER_OF:
            continue
        if LAYER_OF[dst] > LAYER_OF[src]:
            bad.append(f"{imp} (up: {src} is below {dst})")
        elif LAYER_OF[dst] == LAYER_OF[src] and LAYER_OF[src] in PEERS:
            bad.append(f"{imp} (sideways: {src} and {dst} are peers)")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for imp in ALL_IMPORTS:
        if imp.target != imp.source and imp.target != "pretrain":
            graph.setdefault(imp.source, set()).add(imp.target)
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [node, nxt]))
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_function_level_import_of_the_project():
    bad = [
        str(imp)
        for imp in ALL_IMPORTS
        if imp.in_function
        and imp.file.startswith("pretrain/")
        and (imp.file, imp.target) not in ALLOWED_FUNCTION_LEVEL
    ]
    assert not bad, "imports inside functions (move them to the top of the module):\n" + "\n".join(
        bad
    )


def test_the_allowed_exceptions_are_still_needed():
    used = {(i.file, i.target) for i in ALL_IMPORTS if i.in_function}
    stale = sorted(set(ALLOWED_FUNCTION_LEVEL) - used)
    assert not stale, f"remove these from ALLOWED_FUNCTION_LEVEL: {stale}"


@pytest.mark.parametrize(
    "code, target, in_function",
    [
        ("from pretrain.export import load_model", "pretrain.export", False),
        ("def f():\n    from pretrain import checkpoint", "pretrain.checkpoint", True),
        ("import pretrain.data.loader", "pretrain.data.loader", False),
        ("from . import api", "pretrain.serve.api", False),
        ("from .state import X", "pretrain.serve.state", False),
    ],
)
def test_the_reader_sees_every_form_of_import(code, target, in_function):
    path = ROOT / "pretrain" / "serve" / "_layering_probe.py"
    tree = ast.parse(code)
    inside = _function_scopes(tree)
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    (node,) = nodes
    assert imported_modules(node, module_name(path), False) == [target]
    assert (id(node) in inside) == in_function


def test_the_program_entry_is_not_an_edge():
    tree = ast.parse(
        'import sys\nif __name__ == "__main__":\n    from pretrain.cli import main\n'
        "    sys.exit(main())\n"
    )
    (guard,) = [n for n in tree.body if _is_main_guard(n)]
    (node,) = [n for n in ast.walk(guard) if isinstance(n, ast.ImportFrom)]
    assert _program_entry(tree) == {id(node)}


def test_kernels_import_nothing_of_pretrain():
    bad = [
        str(i)
        for i in ALL_IMPORTS
        if i.file.startswith("kernels/") and group(i.target) != "kernels"
    ]
    assert not bad, "kernels/ stands beside pretrain/ and imports none of it:\n" + "\n".join(bad)
