"""Layering, read from the source with ast: models reach kernels only through jaxlab.ops, and
kernels_pallas imports only jax, numpy and the standard library."""

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def imported_modules(path):
    """Absolute names of the modules a file imports (relative imports resolved from its path)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parents = parts[: len(parts) - node.level + 1]
                base = ".".join(parents + ([base] if base else []))
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def files_under(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}"
    return files


@pytest.mark.parametrize("path", files_under("jaxlab/models"), ids=lambda p: p.name)
def test_models_do_not_import_kernels_pallas(path):
    bad = [m for m in imported_modules(path) if m.split(".")[0] == "kernels_pallas"]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; go through jaxlab.ops"


@pytest.mark.parametrize("path", files_under("kernels_pallas"), ids=lambda p: p.name)
def test_kernels_import_only_jax_numpy_and_the_standard_library(path):
    allowed = {"jax", "numpy", "kernels_pallas"} | set(sys.stdlib_module_names)
    bad = [m for m in imported_modules(path) if m.split(".")[0] not in allowed]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_check_sees_a_kernels_import(tmp_path, monkeypatch):
    """The parser catches both import forms (so the tests above can fail)."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "x.py"
    path.write_text("import kernels_pallas.ssd\nfrom kernels_pallas import sparse_attention\n")
    assert imported_modules(path)[:2] == ["kernels_pallas.ssd", "kernels_pallas"]
