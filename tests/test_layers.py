"""The architecture holds (docs/design.md, "Layers"): import-linter's contracts from pyproject.toml (layers, no cycles,
no diffusers in the core), nothing imports the package root, no private name imported across modules, no library
module over 600 lines."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
needs_source = pytest.mark.skipif(not (REPO / "pyproject.toml").is_file(), reason="needs the source tree")


def _library_files() -> list[Path]:
    out = []
    for folder, dirs, files in os.walk(REPO / "olss_fast", followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        out += [Path(folder) / f for f in files if f.endswith(".py")]
    return sorted(out)


@needs_source
def test_import_linter_contracts_hold(tmp_path):
    """``lint-imports`` with the contracts of pyproject.toml: layers point down, no import cycles, the core imports no
    diffusers/transformers. (A violation makes this test fail with the report.)"""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]' installs it)")
    out = subprocess.run([exe, "--no-cache", "--config", str(REPO / "pyproject.toml")], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "broken" not in out.stdout.split("Contracts:")[-1].replace("0 broken", "")


@needs_source
def test_no_private_name_crosses_a_module_boundary():
    """Modules import each other's public names only (``from olss_fast.x import _y`` is refused)."""
    bad = []
    for path in _library_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("olss_fast"):
                bad += [f"{path.relative_to(REPO)}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and a.name != "__version__"]
    assert bad == []


@needs_source
def test_nothing_imports_the_package_root():
    """The package root imports every layer, so a module importing it (``from olss_fast import x``, ``import
    olss_fast``) would depend on the layers above it. (Checked here: import-linter's forbidden contract cannot name
    the root package of its own sources.)"""
    bad = []
    for path in _library_files():
        if path.name == "__init__.py" and path.parent == REPO / "olss_fast":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "olss_fast" and node.level == 0:
                bad.append(f"{path.relative_to(REPO)}: from olss_fast import {', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Import):
                bad += [f"{path.relative_to(REPO)}: import olss_fast" for a in node.names if a.name == "olss_fast"]
    assert bad == []


@needs_source
def test_no_library_module_is_over_600_lines():
    long = {str(p.relative_to(REPO)): n for p in _library_files() if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
