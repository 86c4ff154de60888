"""The layout rules that keep the projections pure (DESIGN §2): nothing in
`projections/`, and nothing in `events/` but the log and its disk, imports a clock,
randomness, processes, the OS, Ray or libvirt, at the top of a module or inside a
function."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"os", "subprocess", "multiprocessing", "time", "random", "ray", "libvirt"}
IO_OWNERS = {"events/log.py", "events/disk.py"}


def forbidden_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import of a FORBIDDEN module (or one under it), and of
    every `__import__`/`import_module` call naming one."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and \
                isinstance(node.args[0], ast.Constant) and \
                isinstance(node.args[0].value, str) and \
                getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                    "__import__", "import_module"):
            names = [node.args[0].value]
        found += [(node.lineno, n) for n in names if n.split(".")[0] in FORBIDDEN]
    return found


def pure_modules() -> list[str]:
    files = sorted(ROOT.glob("projections/*.py")) + sorted(ROOT.glob("events/*.py"))
    return [str(f.relative_to(ROOT)) for f in files
            if str(f.relative_to(ROOT)) not in IO_OWNERS]


def test_the_pure_packages_are_there():
    modules = pure_modules()
    assert "projections/fold.py" in modules and "projections/audit.py" in modules
    assert "events/schema.py" in modules and "events/log.py" not in modules


@pytest.mark.parametrize("module", pure_modules())
def test_a_pure_module_imports_no_clock_randomness_process_or_os(module):
    found = forbidden_imports((ROOT / module).read_text())
    assert found == [], f"{module} imports " + ", ".join(
        f"{name} (line {line})" for line, name in found)


@pytest.mark.parametrize("source, name", [
    ("import os", "os"),
    ("import os.path as p", "os.path"),
    ("from subprocess import Popen", "subprocess"),
    ("from multiprocessing.connection import Connection", "multiprocessing.connection"),
    ("def f():\n    import time\n    return time.time()", "time"),
    ("import importlib\nrandom = importlib.import_module('random')", "random"),
    ("ray = __import__('ray')", "ray"),
    ("from libvirt import open", "libvirt"),
])
def test_the_check_finds_every_form_of_import(source, name):
    assert [n for _, n in forbidden_imports(source)] == [name]


def test_the_check_leaves_lookalikes_alone():
    source = ("import msgspec\nfrom vmresize.events import schema\n"
              "from .time import x\nimport timeit_like_name_os\n")
    assert forbidden_imports(source) == []
