"""The packages are layered one way: ``traces`` at the bottom, ``cwsim`` on it, ``replay`` and
``recorder`` on top. Every ``import`` statement of a package's .py files counts, at module level
or inside a function (read with ``ast``, nothing is imported).

One known exception: ``cwsim/cli.py``, the ``cwsim`` command line, runs ``cwsim record`` through
``recorder`` (an import inside the command's function)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: package -> the packages it must not import
FORBIDDEN = {
    "traces": {"cwsim", "replay", "recorder"},
    "cwsim": {"replay", "recorder"},
}
#: (file, imported package) pairs allowed despite FORBIDDEN
ALLOWED = {("cwsim/cli.py", "recorder")}


#: functions whose first argument, when a string literal, names a module that is imported
DYNAMIC_IMPORTS = {"import_module", "__import__"}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level package)`` of every absolute import in the file at ``path``.

    ``import a.b``, ``from a.b import c`` and ``importlib.import_module("a.b")`` /
    ``__import__("a.b")`` with a literal name give ``a``; relative imports stay in the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if func in DYNAMIC_IMPORTS:
                found.append((node.lineno, node.args[0].value.split(".")[0]))
    return sorted(found)


def violations(package: str) -> list[str]:
    """``file:line imports pkg`` for each forbidden import in ``package``'s .py files."""
    out = []
    for path in sorted((REPO / package).rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for line, imported in imported_packages(path):
            if imported in FORBIDDEN[package] and (rel, imported) not in ALLOWED:
                out.append(f"{rel}:{line} imports {imported}")
    return out


def test_the_reader_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from cwsim.runner import simulate\n    import replay.oracle as o\n"
                     "    from . import sibling\n    importlib.import_module('recorder.server')\n")
    assert imported_packages(probe) == [(1, "os"), (4, "cwsim"), (5, "replay"), (7, "recorder")]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_lower_layers(package):
    assert list((REPO / package).rglob("*.py")), f"no .py files in {package}/"
    bad = violations(package)
    assert not bad, f"{package} must not import {sorted(FORBIDDEN[package])}:\n" + "\n".join(bad)


def test_allowed_exceptions_are_still_needed():
    """An exception that no longer happens is dropped from ALLOWED."""
    for rel, imported in sorted(ALLOWED):
        assert imported in {p for _, p in imported_packages(REPO / rel)}, f"{rel} no longer imports {imported}"
