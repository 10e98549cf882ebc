"""sae.evaluation reads the training side only through checkpoints: no import of the model, trainer or configs."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import sae.evaluation

PACKAGE = Path(sae.evaluation.__file__).parent
ALLOWED = {"sae.checkpoint", "sae.pretrained", "sae.errors"}
"""The training side's modules that evaluation may use: what loads SAEs from disk, and the error type."""
MODULES = sorted(f"sae.evaluation.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def _imported(path: Path) -> set[str]:
    """Every module an import statement in `path` names, at module level or inside functions ("from sae import
    checkpoint" names sae.checkpoint)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names if node.module == "sae"}
    return names


def test_every_import_statement_stays_on_the_checkpoint_side():
    assert len(MODULES) >= 6  # the package was found
    for path in PACKAGE.glob("*.py"):
        training = {name for name in _imported(path) if name.startswith("sae.") and name != "sae"}
        training -= {name for name in training if name.startswith("sae.evaluation")}
        assert training <= ALLOWED, f"{path.name} imports {sorted(training - ALLOWED)} from the training side"


def test_importing_evaluation_loads_no_training_module():
    """Transitively too: in a fresh interpreter, importing every evaluation module loads only ALLOWED from sae/,
    and the package itself loads nothing (not even torch)."""
    code = (
        "import json, sys, importlib\n"
        "import sae.evaluation\n"
        "bare = sorted(m for m in sys.modules if m.startswith(('torch', 'sae.evaluation.')))\n"
        f"for m in {MODULES!r}: importlib.import_module(m)\n"
        "print(json.dumps([bare, sorted(m for m in sys.modules if m.startswith('sae.'))]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent.parent
    )
    bare, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert bare == []
    training = {m for m in loaded if not m.startswith("sae.evaluation")}
    assert training <= ALLOWED, f"importing sae.evaluation loads {sorted(training - ALLOWED)}"
    assert set(MODULES) <= set(loaded)
