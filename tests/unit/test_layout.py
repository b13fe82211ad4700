"""The package layout: packages by stage, imports one way down, no private name across modules.

Read from the source with `ast` (every import at any depth, lazy ones inside functions included),
so a rule broken anywhere in `src/softprompt` fails here before anyone has to find it by reading.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "src" / "softprompt"

STAGES = {
    "softprompt.errors": 0,
    "softprompt.options": 0,
    "softprompt.atomic": 0,
    "softprompt.data": 1,
    "softprompt.model": 2,
    "softprompt.bank": 3,
    "softprompt.prompting": 4,
    "softprompt.training": 5,
    "softprompt.serving": 6,
    "softprompt.api": 7,
    "softprompt.cli": 8,
    "softprompt.__main__": 8,
    "softprompt": 8,  # the package's own __init__: re-exports the public names of the stages
}
"""Each stage (a foundation module or a package) and its rank: a module imports only from its own
stage or lower ones. The data flow, low to high: data -> model -> bank -> prompting -> training ->
serving -> api (HTTP) -> cli."""

TOP_LEVEL = {
    "softprompt",
    "softprompt.__main__",
    "softprompt.errors",
    "softprompt.options",
    "softprompt.atomic",
}
"""The only modules allowed directly in `softprompt/` besides the stage packages."""


@dataclass(frozen=True)
class Import:
    """One name (or module) a module imports from a softprompt module."""

    source: str
    """The importing module."""
    target: str
    """The softprompt module imported from (a module imported by name is its own target)."""
    name: str | None
    """The name imported from `target` (None when the module itself is the import)."""
    line: int


def modules(package_dir: Path = PACKAGE_DIR) -> dict[str, tuple[Path, bool]]:
    """Every module under `package_dir`: dotted name -> (file, whether it is a package __init__)."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _absolute(source: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(package_dir: Path = PACKAGE_DIR) -> Iterator[Import]:
    """Every import of a softprompt module by a softprompt module, at any depth of the file."""
    known = modules(package_dir)
    root = package_dir.name
    for source, (path, is_package) in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == root:
                        yield Import(source, alias.name, None, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                target = _absolute(source, is_package, node)
                if target.split(".")[0] != root:
                    continue
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    if submodule in known:
                        yield Import(source, submodule, None, node.lineno)
                    else:
                        yield Import(source, target, alias.name, node.lineno)


def stage_of(module: str) -> int | None:
    """The rank of the stage `module` belongs to (its longest prefix in STAGES), None outside."""
    if module == "softprompt":
        return STAGES[module]
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        prefix = ".".join(parts[:end])
        if prefix in STAGES:
            return STAGES[prefix]
    return None


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module -> the softprompt modules it imports (itself excluded)."""
    graph: dict[str, set[str]] = {name: set() for name in modules(package_dir)}
    for imp in imports(package_dir):
        if imp.target != imp.source:
            graph[imp.source].add(imp.target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan): each holds a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def upward_imports(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Imports from a module to a module of a higher stage (modules outside a stage: see below)."""
    found = []
    for imp in imports(package_dir):
        source, target = stage_of(imp.source), stage_of(imp.target)
        if source is not None and target is not None and target > source:
            found.append(f"{imp.source}:{imp.line} imports {imp.target} ({target} > {source})")
    return found


def private_imports(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Underscore names imported from another module (dunder names such as __version__ aside)."""
    return [
        f"{imp.source}:{imp.line} imports {imp.name} from {imp.target}"
        for imp in imports(package_dir)
        if imp.name and imp.name.startswith("_") and not imp.name.startswith("__")
    ]


def stray_modules(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Modules outside the stage packages, other than the foundation ones and the package's own."""
    stray = []
    for name in modules(package_dir):
        package = ".".join(name.split(".")[:2])
        in_stage_package = package in STAGES and package not in TOP_LEVEL
        if name not in TOP_LEVEL and not in_stage_package:
            stray.append(name)
    return stray


def test_the_layout_is_read_from_the_source():
    found = modules()
    assert "softprompt.serving.engine" in found and "softprompt.api.app" in found
    edges = import_graph()
    assert "softprompt.prompting.soft" in edges["softprompt.prompting.prompted"]
    # lazy imports inside functions count as much as those at the top of a file
    assert "softprompt.training.trainer" in edges["softprompt.cli.main"]


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_every_import_goes_to_the_same_or_a_lower_stage():
    assert upward_imports() == []


def test_no_private_name_is_imported_from_another_module():
    assert private_imports() == []


def test_every_module_sits_in_a_stage_package():
    assert stray_modules() == []


def test_every_module_has_a_stage():
    assert [name for name in modules() if stage_of(name) is None] == []


def test_the_checks_catch_what_they_look_for(tmp_path):
    """Each check on a made-up package that breaks its rule: it names the import that does."""
    files = {
        "__init__.py": "",
        "errors.py": "",
        "engine.py": "",  # a top-level module outside the stages
        "data/__init__.py": "",
        "data/a.py": "from softprompt.data.b import thing\n",
        "data/b.py": "def f():\n    from . import a  # lazy, still an import\n",
        "model/__init__.py": "",
        "model/loading.py": "from softprompt.data.a import _private, public\n",
        "bank/__init__.py": "",
        "bank/store.py": "import softprompt.serving.engine\n",  # upward: bank (3) -> serving (6)
        "serving/__init__.py": "",
        "serving/engine.py": "from softprompt import __version__\n",  # dunder: not private
    }
    package = tmp_path / "softprompt"
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)

    assert circles(import_graph(package)) == [["softprompt.data.a", "softprompt.data.b"]]
    assert upward_imports(package) == [
        "softprompt.bank.store:1 imports softprompt.serving.engine (6 > 3)",
        "softprompt.serving.engine:1 imports softprompt (8 > 6)",  # the package re-exports: top
    ]
    assert private_imports(package) == [
        "softprompt.model.loading:1 imports _private from softprompt.data.a"
    ]
    assert stray_modules(package) == ["softprompt.engine"]
    assert stage_of("softprompt.serving.vllm.backend") > stage_of("softprompt.prompting.inject")
    assert stage_of("softprompt.engine") is None


TESTS_DIR = Path(__file__).resolve().parents[1]


def cross_test_imports(tests_dir: Path = TESTS_DIR) -> list[str]:
    """Test files that import from another test file (`test_*.py`): shared helpers belong in a
    fixtures module (e.g. tests/unit/serving_fixtures.py) or conftest.py."""
    found = []
    for path in sorted(tests_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                # `from .test_a import x`, and `from . import test_a` (a module named as a name)
                module = "." * node.level + (node.module or "")
                modules = [module] if node.module else []
                prefix = module if module.endswith(".") else module + "."
                modules += [prefix + alias.name for alias in node.names]
                modules = [m for m in modules if m.rsplit(".", 1)[-1].startswith("test_")][:1]
            elif isinstance(node, ast.Import):
                modules = [
                    a.name for a in node.names if a.name.rsplit(".", 1)[-1].startswith("test_")
                ]
            else:
                continue
            found += [f"{path.relative_to(tests_dir)}:{node.lineno} imports {m}" for m in modules]
    return found


def test_no_test_file_imports_from_another_test_file(tmp_path):
    assert cross_test_imports() == []
    (tmp_path / "test_a.py").write_text("def helper():\n    pass\n")
    (tmp_path / "test_b.py").write_text("def t():\n    from .test_a import helper\n")
    (tmp_path / "fixtures.py").write_text("from .conftest import thing\n")
    (tmp_path / "test_c.py").write_text("from . import test_a\nimport tests.unit.test_a\n")
    assert cross_test_imports(tmp_path) == [
        "test_b.py:2 imports .test_a",
        "test_c.py:1 imports .test_a",
        "test_c.py:2 imports tests.unit.test_a",
    ]
