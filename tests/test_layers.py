"""The packages of dipsvd_core by layer (dipsvd_core.LAYERS): no import, at the top of a module or inside a
function, points up a layer. Read from the source, so a lazy import cannot hide."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dipsvd_core
from dipsvd_core import LAYERS

ROOT = Path(dipsvd_core.__file__).parent
TOP = len(LAYERS)  # the cli package, __main__ and __init__ sit above every package


def _layer(parts: tuple[str, ...]) -> int:
    return LAYERS.index(parts[0]) if parts and parts[0] in LAYERS else TOP


def _targets(path: Path, root: Path = ROOT) -> list[tuple[int, tuple[str, ...]]]:
    """(line, the dipsvd_core package path imported) of every import of dipsvd_core in this file."""
    here = path.relative_to(root).parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                mod = base + tuple(node.module.split(".")) if node.module else base
            elif node.module and node.module.split(".")[0] == "dipsvd_core":
                mod = tuple(node.module.split(".")[1:])
            else:
                continue
            names = [() if node.module else (a.name,) for a in node.names]
            found += [(node.lineno, mod + n) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, tuple(a.name.split(".")[1:])) for a in node.names
                      if a.name.split(".")[0] == "dipsvd_core"]
    return found


MODULES = sorted(p for p in ROOT.rglob("*.py"))


def test_every_module_sits_in_a_layer():
    loose = [p.name for p in MODULES if len(p.relative_to(ROOT).parts) == 1
             and p.name not in ("__init__.py", "__main__.py")]
    assert loose == [], "a module at the top of dipsvd_core belongs in a package of LAYERS (or the cli)"
    assert sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS + ("cli",))


def test_the_tests_mirror_the_packages():
    """tests/<package>/ holds the tests of dipsvd_core's <package> (cli included) and tests/app/ the app's; what runs
    the whole project (the end-to-end build, the device check, this file) stays at the top."""
    folders = sorted(p.name for p in (REPO / "tests").iterdir() if p.is_dir() and p.name not in ("artifacts",
                                                                                                  "__pycache__"))
    assert set(folders) <= set(LAYERS + ("cli", "app")), folders
    top = sorted(p.name for p in (REPO / "tests").glob("test_*.py"))
    assert top == ["test_e2e_smollm.py", "test_gpu_check.py", "test_layers.py"], top


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_points_up_a_layer(path):
    own = _layer(path.relative_to(ROOT).parts[:-1])
    up = [f"line {line}: {'.'.join(mod)}" for line, mod in _targets(path) if _layer(mod) > own]
    assert up == [], f"{path.relative_to(ROOT)} (layer {own}) imports from a higher layer"


def test_the_check_sees_an_upward_import(tmp_path):
    """The parser reads relative, absolute and function-level imports: planted in a copy, each is caught."""
    pkg = tmp_path / "engine"
    pkg.mkdir()
    bad = pkg / "x.py"
    bad.write_text("from ..run.pipeline import Workbench\ndef f():\n    from dipsvd_core.plan import plan\n"
                   "    from ..common import errors\n")
    assert [(line, _layer(m)) for line, m in _targets(bad, tmp_path)] == [(1, LAYERS.index("run")), (3, LAYERS.index("plan")),
                                                      (4, LAYERS.index("common"))]


REPO = ROOT.parent


def test_every_file_the_code_cites_is_in_the_repository():
    """A docstring that cites docs/DESIGN.md (a section too), bench/RESULTS.md or a script resolves in a clone."""
    import re

    design = (REPO / "docs" / "DESIGN.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", design, re.M))
    missing = []
    for path in [*ROOT.rglob("*.py"), *(REPO / "tests").rglob("*.py"), *(REPO / "pages").glob("*.py")]:
        if path.name == "test_layers.py":
            continue
        text = path.read_text()
        for cited in re.findall(r"\b((?:docs|bench|tests)/[\w./-]+\.(?:md|py|json|jsonl))", text):
            if not (REPO / cited).exists():
                missing.append(f"{path.relative_to(REPO)}: {cited}")
        for n in re.findall(r"DESIGN\.md,? sections? (\d+)", text):
            if n not in sections:
                missing.append(f"{path.relative_to(REPO)}: docs/DESIGN.md section {n}")
        if re.search(r"(?<!docs/)\bDESIGN\.md", text):
            missing.append(f"{path.relative_to(REPO)}: DESIGN.md without its folder")
    assert missing == []


def test_tests_and_benchmarks_share_only_devkit():
    """No bench script imports from tests/, and no test runs a bench script but through devkit.scripts."""
    import re

    bench = [p for p in (REPO / "bench").rglob("*.py")
             if re.search(r"^\s*(from tests\b|import tests\b|from conftest\b)", p.read_text(), re.M)]
    tests = [p for p in (REPO / "tests").rglob("*.py")
             if p.name != "test_layers.py" and re.search(r"\"bench\" /|bench/\w+\.py\"", p.read_text())]
    assert bench == [] and tests == []
