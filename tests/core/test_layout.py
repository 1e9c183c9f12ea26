"""The layers' import direction, checked in a fresh interpreter (what a user's import loads)."""

from __future__ import annotations

import subprocess
import sys

import pytest

TRAINING_STACK = ("accelerate", "deepspeed", "torch.distributed.checkpoint", "bayesalign.training")


def loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("statement", [
    "from bayesalign.inference import Importance",
    "from bayesalign.inference import Rejection, QRS, BestOfN, Exact",
    "import bayesalign as ba; ba.target; ba.Posterior; ba.evaluate",
])
def test_sampling_engines_and_the_core_load_no_training_stack(statement):
    modules = loaded_after(statement)
    loaded = sorted(m for m in modules if m.startswith(TRAINING_STACK))
    assert not loaded, f"{statement!r} loaded {loaded[:5]}"


def test_a_learned_engine_does_load_the_training_loop():
    # The check above could pass by never importing anything: this one shows it can fail.
    assert "bayesalign.training.trainer" in loaded_after("from bayesalign.inference import DPG")


ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
# Layer -> the bayesalign packages it may not import (inference -> models -> core, one way).
FORBIDDEN = {
    "bayesalign": ("bayesalign.inference", "bayesalign.models", "bayesalign.app",
                   "bayesalign.training"),
    "bayesalign/training": ("bayesalign.inference", "bayesalign.models", "bayesalign.app"),
    "models": ("bayesalign.inference", "bayesalign.app"),
    "inference": ("bayesalign.app",),
    # Tests are grouped by what they depend on: tests/core needs the core only.
    "tests/core": ("bayesalign.inference", "bayesalign.models", "bayesalign.app",
                   "bayesalign.training", "conftest"),
}


def imported_names(path) -> list[str]:
    import ast

    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_point_one_way(layer):
    folder = ROOT / layer
    files = folder.glob("*.py") if layer == "bayesalign" else folder.rglob("*.py")
    wrong = [(path.relative_to(ROOT).as_posix(), name) for path in files
             for name in imported_names(path) if name.startswith(FORBIDDEN[layer])]
    assert not wrong, f"{layer} imports a layer above it: {wrong}"
