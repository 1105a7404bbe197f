"""Which edgemml modules a module imports, read from the source with `ast` (nothing is imported).

Two users: the runner fingerprints a stage by the source of every edgemml module its module reaches
through imports (so the fingerprint follows the code that really makes an artifact, not a hand-kept
list), and tests/unit/test_layout.py checks the layering (no cycles, no library importing a stage).
Imports inside functions count: edgemml imports heavy libraries lazily, but they are still code the
stage runs. Importing a package as a whole (`from edgemml import runtimes`) counts every module in
it, because packages such as the runtime registry load their modules by name.
"""

from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path

ROOT = "edgemml"


#: the folder of the edgemml package (its modules are found there, on disk)
_ROOT_DIR = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def module_file(name: str) -> Path | None:
    """The source file of an edgemml module (a package's __init__.py), found on disk without
    importing anything: importlib's find_spec("edgemml.data.files") would import edgemml.data, and
    a cached run would pay for torch just to hash its own code. A module outside edgemml: its file
when it is already imported (a plugin stage's), else None."""
    parts = name.split(".")
    if parts[0] != ROOT:  # a plugin stage's module: already imported (its class is registered)
        origin = getattr(sys.modules.get(name), "__file__", None)
        return Path(origin) if origin and origin.endswith(".py") else None
    if not all(p.isidentifier() for p in parts):
        return None
    base = _ROOT_DIR.joinpath(*parts[1:])
    for path in (base / "__init__.py", base.with_suffix(".py") if len(parts) > 1 else None):
        if path is not None and path.is_file():
            return path
    return None


def is_package(name: str) -> bool:
    path = module_file(name)
    return path is not None and path.name == "__init__.py"


def package_modules(name: str) -> list[str]:
    """Every module of a package, the package itself included."""
    path = module_file(name)
    if path is None or path.name != "__init__.py":
        return [name] if path is not None else []
    out = []
    for p in sorted(path.parent.rglob("*.py")):
        rel = p.relative_to(path.parent).with_suffix("").parts
        parts = rel[:-1] if rel[-1] == "__init__" else rel
        out.append(".".join((name, *parts)))
    return out


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` blocks (never executed)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
                (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
                or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


@lru_cache(maxsize=None)
def imports_of(name: str, explicit: bool = False, typing: bool = True) -> frozenset[str]:
    """The edgemml modules `name` imports directly (anywhere in its source).

    By default what running the import executes: the parent packages' __init__ modules too, and
    every module of a package imported whole. explicit=True gives only the modules the import
    statements name (the edges of the layering check: a child importing its package is implicit).
    typing=False leaves out imports under `if TYPE_CHECKING:`, which never run (the edges of the
    cycle check: a stage's helper may name the stage's Config type in its annotations).
    """
    path = module_file(name)
    if path is None:
        return frozenset()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    skip = set() if typing else _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [(a.name, True) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base != ROOT and not base.startswith(ROOT + "."):
                continue  # find_spec("lib.sub.name") would import lib.sub: never touch others
            targets = [(base, False)]
            # `from pkg import sub`: sub is a module of its own when it has a file
            targets += [(f"{base}.{a.name}", True) for a in node.names
                        if module_file(f"{base}.{a.name}") is not None]
        else:
            continue
        for target, whole in targets:
            if target != ROOT and not target.startswith(ROOT + "."):
                continue
            if module_file(target) is None:
                continue
            if explicit:
                found.add(target)
                continue
            found.update(p for p in _parents(target) if p != ROOT)
            found.update(package_modules(target) if whole and is_package(target) else [target])
    found.discard(name)
    return frozenset(found)


def closure(name: str) -> list[str]:
    """`name` and every edgemml module it reaches through imports, sorted."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(imports_of(current) - seen)
    return sorted(seen)
