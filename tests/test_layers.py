"""The package's layers (docs/ARCHITECTURE.md), checked on the source with ``ast``.

- ``import nvlm.config`` (and the other settings modules, and the package itself) loads no torch;
- the module-level imports (those under ``if TYPE_CHECKING:`` included: a type is an arrow too) form no
  cycle, and each module imports only from its own layer or below, in the order ``LAYERS`` declares and the
  architecture page's table shows;
- no import sits inside a function, except of an optional extra (or of a module of ours that needs one at
  its top), so that the package works without the extra until that function runs.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nvlm"

# Lowest first. An entry is a file of nvlm/ or a folder ("models/": every module under it).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "settings",
        (
            "config.py",
            "presets.py",
            "hf_config.py",
            "arch.py",
            "options.py",
            "template.py",
            "sampling.py",
            "devices.py",
            "logs.py",
        ),
    ),
    ("inputs", ("tokenizer.py", "image.py", "processor.py")),
    ("model", ("models/",)),
    ("generation", ("engine.py", "generation.py")),
    ("files", ("checkpoint.py", "quant.py", "mcore/", "pretrained.py")),
    ("applications", ("chat.py", "data/", "train/", "eval/", "serve/", "demo_report.py", "demo.py", "cli.py")),
    ("package", ("__init__.py",)),
]

# Optional extras (pyproject.toml's server / train / eval / quant / dev extras, and what they bring): a function
# may import these, or a module of ours that imports one of them at its top.
EXTRAS = {
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic",
    "yaml",
    "tqdm",
    "torchao",
    "pyarrow",
    "transformers",
    "matplotlib",
    "pycocoevalcap",
    "anls",
    "torch.utils.tensorboard",
}

NO_TORCH = ("nvlm", "nvlm.config", "nvlm.presets", "nvlm.hf_config")


def _modules() -> dict[str, Path]:
    out = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = file.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return out


MODULES = _modules()


def _imports(file: Path) -> tuple[list[str], list[tuple[int, str]]]:
    """(the module-level imports' targets, (line, target) of each import inside a function)."""
    top: list[str] = []
    nested: list[tuple[int, str]] = []

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:  # relative: from the module's own package
            pkg = _name(file).split(".")
            pkg = pkg if file.name == "__init__.py" else pkg[:-1]
            base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
        return [base] + [f"{base}.{a.name}" for a in node.names]

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                if in_function:
                    nested.extend((child.lineno, t) for t in targets(child)[:1])
                else:
                    top.extend(targets(child))
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(file.read_text()), False)
    return top, nested


def _name(file: Path) -> str:
    return next(m for m, f in MODULES.items() if f == file)


def _graph() -> dict[str, set[str]]:
    """Module -> the modules of ours that importing it runs first (a package's ``__init__`` included)."""
    graph: dict[str, set[str]] = {}
    for mod, file in MODULES.items():
        deps: set[str] = set()
        for target in _imports(file)[0]:
            if target not in MODULES:
                continue  # another package's, or ``from m import name`` where name is no module
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then a.b.c
                step = ".".join(parts[:i])
                if step in MODULES and step != mod and not mod.startswith(step + "."):
                    deps.add(step)
        graph[mod] = deps
    return graph


def _layer_of(mod: str) -> int:
    rel = MODULES[mod].relative_to(PACKAGE).as_posix()
    found = [
        i
        for i, (_, entries) in enumerate(LAYERS)
        for e in entries
        if rel == e or (e.endswith("/") and rel.startswith(e))
    ]
    assert len(found) == 1, f"nvlm/{rel} is in {len(found)} layers of LAYERS, not one"
    return found[0]


@pytest.mark.parametrize("module", NO_TORCH)
def test_settings_import_no_torch(module: str) -> None:
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch was imported'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr.strip().splitlines()[-1]


def test_every_module_is_in_one_layer() -> None:
    for mod in MODULES:
        _layer_of(mod)


def test_no_import_cycle() -> None:
    graph, state, cycles = _graph(), {}, []

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = "open"
        for dep in sorted(graph[mod]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*path[path.index(dep) :], mod, dep]))
            elif dep not in state:
                visit(dep, [*path, mod])
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_go_down_the_layers() -> None:
    upward = [
        f"{mod} ({LAYERS[_layer_of(mod)][0]}) imports {dep} ({LAYERS[_layer_of(dep)][0]})"
        for mod, deps in _graph().items()
        for dep in sorted(deps)
        if _layer_of(dep) > _layer_of(mod)
    ]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_layers_match_the_architecture_page() -> None:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    rows = re.findall(r"^\| (\d+)\. ([\w ]+) \| ([^|]+) \|", text, flags=re.M)
    documented = [(name.strip(), tuple(re.findall(r"`([^`]+)`", mods))) for _, name, mods in rows]
    assert documented == LAYERS
    assert [int(n) for n, _, _ in rows] == list(range(len(LAYERS)))


def test_function_level_imports_only_of_extras() -> None:
    def is_extra(target: str) -> bool:
        return any(target == e or target.startswith(e + ".") for e in EXTRAS)

    gated = {m for m, f in MODULES.items() if any(is_extra(t) for t in _imports(f)[0])}  # ours that need an extra
    found = [
        f"{file.relative_to(ROOT)}:{line}: {target}"
        for mod, file in MODULES.items()
        for line, target in _imports(file)[1]
        if not is_extra(target) and target not in gated
    ]
    assert not found, f"{len(found)} imports inside functions:\n" + "\n".join(found)


def test_architectures_are_told_apart_only_in_arch_py() -> None:
    """No comparison with "D", "X" or "H" and no table keyed by them outside ``nvlm/arch.py``: the rest of the
    package reads the per-architecture object (``config.architecture``). ``nvlm/eval/paper.py`` is exempt: its
    table holds the paper's numbers per model, no behaviour."""
    names = {"D", "X", "H"}
    found = []
    for mod, file in MODULES.items():
        if mod in ("nvlm.arch", "nvlm.eval.paper"):
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                values = [s.value for s in sides if isinstance(s, ast.Constant)]
                values += [
                    e.value
                    for s in sides
                    if isinstance(s, (ast.Tuple, ast.List, ast.Set))
                    for e in s.elts
                    if isinstance(e, ast.Constant)
                ]
                hit = names & set(values)
            elif isinstance(node, ast.Dict):
                hit = names & {k.value for k in node.keys if isinstance(k, ast.Constant)}
            else:
                continue
            if len(hit) > (0 if isinstance(node, ast.Compare) else 1):
                found.append(f"{file.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not found, "architecture tests outside nvlm/arch.py:\n" + "\n".join(found)


def test_the_package_names_resolve() -> None:
    import nvlm

    for name in nvlm.__all__:
        assert getattr(nvlm, name) is not None
    assert set(nvlm.__all__) <= set(dir(nvlm))
    with pytest.raises(AttributeError, match="no_such_name"):
        nvlm.no_such_name  # noqa: B018
