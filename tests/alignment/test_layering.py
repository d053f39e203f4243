"""alignment/ sits above train/, generate/ and evaluation/ and below cli.py only (ARCHITECTURE.md)."""
import ast
import pathlib

import peftkern.alignment


def test_alignment_imports_nothing_above_it():
    above = ("peftkern.cli", "peftkern.data")
    for path in pathlib.Path(peftkern.alignment.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                assert not name.startswith(above), f"{path.name}:{node.lineno} imports {name}"


def test_nothing_below_imports_alignment():
    root = pathlib.Path(peftkern.alignment.__file__).parent.parent
    for area in ("train", "generate", "evaluation", "tuners", "nn", "losses", "optim", "quant", "ops", "models"):
        for path in (root / area).rglob("*.py"):
            assert "peftkern.alignment" not in path.read_text(), f"{path} imports peftkern.alignment"
