"""olss_fast as users install it: no repository folder shadows an installed package, the wheel holds every module,
and every module imports from wherever the package was installed.

The first two tests need the source tree (they are skipped when the tests run from a copy outside it, as CI's
installed-wheel stage does); the import test runs against whatever ``olss_fast`` is importable, which in that stage is
the installed wheel.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import olss_fast

REPO = Path(__file__).resolve().parents[1]
IN_SOURCE_TREE = (REPO / "pyproject.toml").is_file() and (REPO / "olss_fast").is_dir()
needs_source = pytest.mark.skipif(not IN_SOURCE_TREE, reason="needs the source tree (tests run from a copy)")


def _package_modules(root: Path, package: str = "olss_fast") -> list[str]:
    """Every module under ``root`` (an installed or source ``olss_fast`` folder), links followed, as dotted names."""
    names = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        rel = Path(folder).relative_to(root)
        prefix = ".".join((package, *rel.parts))
        for f in sorted(files):
            if f.endswith(".py"):
                names.append(prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}")
    return names


@needs_source
def test_no_repository_folder_can_shadow_an_installed_package(tmp_path):
    """``python -m pytest`` / ``python -m olss_fast.cli`` put the repository root first on ``sys.path``. A folder there
    with an ``__init__.py`` is a regular package and wins over any installed package of the same name (transformers 5
    requires Hugging Face's ``kernels``, which ``kernels/`` shadowed). Only ``olss_fast`` may be a package at the root;
    every other folder is at most a namespace portion, which loses to an installed regular package."""
    regular = sorted(p.name for p in REPO.iterdir()
                     if p.is_dir() and (p / "__init__.py").exists() and p.name != "olss_fast")
    assert regular == [], f"top-level folders that are regular packages and can shadow installed ones: {regular}"
    modules = sorted(p.name for p in REPO.iterdir() if p.suffix == ".py")
    assert modules == [], f"top-level modules that can shadow installed ones: {modules}"

    # and concretely: every installed top-level package whose name is a repository folder resolves to the installed
    # copy when imported from the repository root (kernels: a dependency of transformers >= 5)
    installed = set(importlib.metadata.packages_distributions())
    clashes = sorted(p.name for p in REPO.iterdir() if p.is_dir() and p.name in installed and p.name != "olss_fast")
    for name in clashes:
        code = f"import importlib.util as u; s = u.find_spec({name!r}); print(s.origin or list(s.submodule_search_locations))"
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
        assert str(REPO) not in out.stdout, f"`import {name}` from the repository root finds {out.stdout.strip()}"


@needs_source
def test_the_card_folders_are_linked_into_the_package():
    """Every module of the top-level ``kernels/`` and ``export/`` is reached as ``olss_fast.kernels.*`` /
    ``olss_fast.export.*`` through a link in ``olss_fast/`` (and every link points at one): a module added to the
    folder without its link would be missing from the wheel and from the import names."""
    for folder in ("kernels", "export"):
        modules = {p.name for p in (REPO / folder).glob("*.py")}
        package = REPO / "olss_fast" / folder
        links = {p.name for p in package.glob("*.py") if p.is_symlink()}
        assert modules == links, f"{folder}/ modules without a link in olss_fast/{folder}/: {sorted(modules - links)}; " \
                                 f"links without a module: {sorted(links - modules)}"
        for name in links:
            assert (package / name).resolve() == (REPO / folder / name).resolve()
        assert (package / "__init__.py").is_file() and not (package / "__init__.py").is_symlink()
        assert not (REPO / folder / "__init__.py").exists()


@needs_source
def test_wheel_holds_every_module_of_the_source_tree(tmp_path):
    """A wheel built from the source tree holds every module of ``olss_fast/`` (with ``kernels/`` and ``export/``
    under ``olss_fast/``) and the bundled model files: package discovery, not a hand-kept list."""
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info into the tree it builds
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "demo_out"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(src)], capture_output=True, text=True, cwd=tmp_path,
    )
    if out.returncode != 0 and "No module named" in out.stderr and "setuptools" in out.stderr:
        pytest.skip("setuptools is not installed in this environment (pip install -e '.[test]' installs it)")
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("olss_fast-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    in_wheel = {n[:-3].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")}
    in_source = set(_package_modules(REPO / "olss_fast"))
    assert in_source - in_wheel == set(), f"modules missing from the wheel: {sorted(in_source - in_wheel)}"
    assert in_wheel - in_source == set(), f"wheel modules that are not in the source tree: {sorted(in_wheel - in_source)}"
    data = {str(p.relative_to(REPO)) for p in (REPO / "olss_fast" / "models" / "digits").rglob("*") if p.is_file()}
    assert data and data <= names, f"bundled model files missing from the wheel: {sorted(data - names)}"
    assert not any(n.startswith(("kernels/", "export/", "tests/", "benchmarks/")) for n in names)


def test_every_module_imports_from_the_installed_package():
    """Every module of the importable ``olss_fast`` (the editable checkout, or the installed wheel in CI's second
    stage) imports; ``olss_fast.kernels`` and ``olss_fast.export`` are the top-level folders' modules."""
    root = Path(olss_fast.__file__).resolve().parent
    names = [n for n in _package_modules(root) if not n.endswith("__main__")]
    assert {"olss_fast.kernels.fused_step", "olss_fast.export.onnx_export", "olss_fast.pipelines.flux"} <= set(names)
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\nprint('ok', len(sys.argv) - 1)"
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=Path.home())
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", str(len(names))]
