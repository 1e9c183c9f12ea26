"""The files of a training checkpoint: checksums, the manifest that makes a folder a complete
checkpoint, per-process RNG state, and the settings a resume must share with the writer."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Options that may change between a run and its resume (how long, where, how often, display).
RESUMABLE_CHANGES = ("steps", "checkpoint_dir", "checkpoint_every", "keep_checkpoints",
                     "progress", "policy", "proposal")


def config_identity(config: Any) -> dict:
    """The settings (of a dataclass config) a resumed run must share with the run that wrote
    the checkpoint."""
    identity = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    return json.loads(json.dumps(identity, default=repr))


def describe_differences(a: dict, b: dict) -> str:
    """``key: A there, B here`` for every setting that differs (for resume errors)."""
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in keys) or "engine"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Checksum every file under ``folder`` (DeepSpeed's per-rank files included)."""
    manifest = {str(f.relative_to(folder)): sha256(f)
                for f in sorted(folder.rglob("*")) if f.is_file()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def verify(checkpoint: Path) -> str | None:
    """What makes ``checkpoint`` unusable (missing or changed file), or None."""
    manifest_file = checkpoint / "manifest.json"
    if not manifest_file.exists():
        return "no manifest"
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError:
        return "corrupted manifest"
    for name, digest in manifest.items():
        path = checkpoint / name
        if not path.exists():
            return f"missing {name}"
        if sha256(path) != digest:
            return f"checksum mismatch in {name}"
    return None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "random": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
