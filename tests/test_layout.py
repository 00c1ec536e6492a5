"""The house's rules that import-linter's contracts (pyproject.toml, run by `make test`) do not
cover: small modules, and the file systems of pyarrow used by the I/O layer alone."""

from __future__ import annotations

import ast
from pathlib import Path

import rayinfer

ROOT = Path(rayinfer.__file__).parent
MODULES = sorted(p for p in ROOT.rglob("*.py"))
MAX_LINES = 400
LONGER = {"models/nezha.py"}  # the port of NEZHA's modelling code, kept whole


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_module_is_over_400_lines_but_the_nezha_port():
    long = {str(p.relative_to(ROOT)): n for p in MODULES
            if (n := len(p.read_text().splitlines())) > MAX_LINES and str(p.relative_to(ROOT)) not in LONGER}
    assert not long


def test_only_the_io_layer_opens_file_systems():
    users = {str(p.relative_to(ROOT)) for p in MODULES if any(m.startswith("pyarrow.fs") for m in imported(p))}
    assert users and all(u.startswith("io/") for u in users), users
