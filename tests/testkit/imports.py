"""The import graph of the `strokes` package, read from the source with ast (never from sys.modules,
which only shows what one run happened to import).

Every import statement counts, those inside functions (lazy imports) and under `if TYPE_CHECKING:`
included, unless `at_import=True`: then only what runs when the module is imported (module and
class bodies; not functions, not TYPE_CHECKING blocks). `from a.b import c` is an import of the
module a.b.c when that is a module of ours, else of a.b; importing a module imports its parent
packages too. Relative imports are refused (the project uses absolute ones), so a rule cannot be
dodged by one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from testkit.paths import ROOT

# The repository's folders that are the package's subpackages (pyproject's package-dir).
FOLDERS = {"strokes.model": ROOT / "model", "strokes.service": ROOT / "service"}

# Third-party modules that load torch when imported.
TORCH = ("torch", "torchvision", "transformers", "accelerate", "safetensors.torch")


def module_file(name: str) -> Path | None:
    """The source file of one of our modules (a package's __init__.py), or None."""
    for package, folder in FOLDERS.items():
        if name == package:
            return folder / "__init__.py"
        if name.startswith(package + "."):
            path = folder.joinpath(*name[len(package) + 1 :].split("."))
            if path.with_suffix(".py").is_file():
                return path.with_suffix(".py")
            if (path / "__init__.py").is_file():
                return path / "__init__.py"
    return None


def modules_in(package: str) -> list[str]:
    """Every module of one of our packages, the package itself included."""
    folder = module_file(package).parent
    names = []
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join((package, *parts)))
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(tree: ast.AST, at_import: bool) -> Iterable[ast.Import | ast.ImportFrom]:
    """The import statements of a module (at_import: only those run by importing it)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if at_import and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if at_import and isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def _ours(name: str) -> str | None:
    """The longest prefix of a dotted name that is one of our modules."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if module_file(candidate) is not None:
            return candidate
    return None


def _with_parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:n]) for n in range(1, len(parts) + 1)}


@cache
def imports_of(module: str, at_import: bool = False) -> frozenset[str]:
    """The dotted names a module imports: our modules (with their parent packages) and the
    third-party modules, as written (`torch.nn`, `numpy`)."""
    path = module_file(module)
    assert path is not None, f"{module} is not a module of strokes"
    names: set[str] = set()
    for node in _statements(ast.parse(path.read_text(), str(path)), at_import):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: a relative import (from {'.' * node.level}{node.module or ''})")
        written = (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        )
        for name in written:
            ours = _ours(name)
            if ours is not None:
                names |= {n for n in _with_parents(ours) if module_file(n) is not None}
            elif not name.startswith("strokes"):
                names.add(name)
    return frozenset(names - {module})


def closure(modules: Iterable[str], at_import: bool = False) -> dict[str, str]:
    """Everything importing `modules` may import, each with the chain that reaches it
    ("a -> b -> torch"), following our modules' imports transitively."""
    reached: dict[str, str] = {}
    todo = [(m, m) for m in modules]
    while todo:
        module, chain = todo.pop()
        if module in reached:
            continue
        reached[module] = chain
        if module_file(module) is None:
            continue  # third-party: not followed
        for name in sorted(imports_of(module, at_import)):
            if name not in reached:
                todo.append((name, f"{chain} -> {name}"))
    return reached


def matches(name: str, prefixes: Iterable[str]) -> bool:
    """Whether a dotted name is one of `prefixes` or inside one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)
