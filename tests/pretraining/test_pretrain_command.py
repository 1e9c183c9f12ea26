"""Prior pretraining (``bayesalign pretrain``: `Pretraining` with objective mle on a Corpus
training split): a tiny run on a slice of the stdlib loads, samples and reports; resume is
bit-identical; checkpoints of the earlier pretrain are refused; held-out files are split by
file; corpora without text fail clearly."""

import ast
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bayesalign.app.cli import main
from bayesalign.errors import ConfigError
from bayesalign.inference.pretraining_run import pretrain
from bayesalign.models import CausalLM, scorers
from bayesalign.models.corpus_source import documents, split_files
from bayesalign.models.pretraining import Blocks, copy_stdlib_slice, find_corpus, python_segments
from bayesalign.models.pretraining.card import parses_to_code, reads_as_python
from bayesalign.training.checkpoints import write_manifest

STEPS = 300  # a few hundred tiny steps: ~15 s on one loaded core
SLICE_BYTES = 600_000


@pytest.fixture(scope="module")
def stdlib_slice(tmp_path_factory) -> Path:
    """About 600 kB of standard-library modules (a seeded choice), copied into one folder."""
    return copy_stdlib_slice(tmp_path_factory.mktemp("stdlib_slice"), SLICE_BYTES)


def settings(corpus: Path, output: Path, **changes) -> dict:
    base = {"corpus": corpus, "output": output, "preset": "tiny", "steps": STEPS,
            "heldout_fraction": 0.1, "eval_every": 50, "checkpoint_every": 100,
            "eval_samples": 16, "max_new_tokens": 48, "progress": False}
    return {**base, **changes}


@pytest.fixture(scope="module")
def tiny_run(stdlib_slice, tmp_path_factory) -> Path:
    """``bayesalign pretrain`` (the CLI) for STEPS tiny steps on the stdlib slice."""
    output = tmp_path_factory.mktemp("tiny_run")
    status = main(["pretrain", "--corpus", str(stdlib_slice), "--output", str(output),
                   "--max-steps", str(STEPS), "--heldout-fraction", "0.1", "--eval-every", "50",
                   "--num-samples", "16"])
    assert status == 0
    return output


def test_the_output_loads_as_a_causal_lm_and_samples(tiny_run):
    prior = CausalLM.from_pretrained(tiny_run, max_new_tokens=16)
    torch.manual_seed(0)
    samples = prior.sample_batch(8)
    assert len(samples.text) == 8 and all(isinstance(t, str) for t in samples.text)
    assert torch.isfinite(prior.log_prob(samples)).all()
    assert prior.tokenizer.eos_token == "<|endoftext|>"


def test_the_card_reports_corpus_split_tokens_loss_parse_rate_time_and_command(tiny_run,
                                                                              stdlib_slice):
    card = json.loads((tiny_run / "card.json").read_text())
    assert card["split"]["unit"] == "file"
    assert card["split"]["train"] > 0 and card["split"]["heldout"] > 0
    assert card["tokens_seen"] == STEPS * 16 * 128  # the tiny preset's batch × block
    assert card["heldout_perplexity"] == pytest.approx(2.718281828 ** card["heldout_loss"])
    assert 0 <= card["parse_fraction"] <= 1 and card["num_samples"] == 16
    assert card["training_wall_time_s"] > 0
    assert "pretrain" in card["command"] and card["corpus"] == str(stdlib_slice.resolve())
    assert card["model"]["safetensors_bytes"] == (tiny_run / "model.safetensors").stat().st_size
    whole = card["whole_samples"]
    assert whole["num_samples"] == 256 and whole["sample_tokens"] == 64
    assert 0 <= whole["parse_fraction"] <= 1 - whole["empty_fraction"]  # blank does not count
    assert all(ast.parse(t).body for t in whole["parsing_samples"])
    text = (tiny_run / "MODEL_CARD.md").read_text()
    assert "held-out perplexity" in text and card["command"] in text
    assert "whole samples (≤ 64 tokens) that parse / read as Python" in text


@pytest.mark.parametrize("text, expected", [
    ("def f(x):\n    return x\n", True),
    ("x = (1, 2", False),  # names, no keyword
    ("return", True),
    ("# def in a comment\nx = 1\n", False),
    ("s = 'import os'\n", False),
    ("", False),
    ("lmd_ince(aeof) if cap", True),  # 'if' as code, even in a text that does not parse
])
def test_reads_as_python_finds_a_keyword_outside_strings_and_comments(text, expected):
    assert reads_as_python(text) is expected


@pytest.mark.parametrize("text, expected", [
    ("x = 1\n", True), ('"""A docstring."""', True), ("", False), ("# only a comment\n", False),
    ("def f(:\n", False), ("a\x00b", False),
])
def test_a_sample_parses_to_code_when_it_holds_a_statement(text, expected):
    assert parses_to_code(text) is expected


def test_heldout_loss_decreased_from_step_zero(tiny_run):
    card = json.loads((tiny_run / "card.json").read_text())
    steps = [step for step, _ in card["heldout_curve"]]
    assert steps[0] == 0 and steps[-1] == STEPS
    assert card["heldout_loss_initial"] == pytest.approx(torch.log(torch.tensor(512.0)).item(),
                                                         abs=0.05)  # uniform at init
    assert card["heldout_loss"] < card["heldout_loss_initial"] - 1.0


def read_history(output: Path) -> list[dict[str, str]]:
    with (output / "training" / "history.csv").open() as f:
        return list(csv.DictReader(f))


def test_resume_is_bit_identical_to_an_uninterrupted_run(stdlib_slice, tmp_path):
    steps, stop = 40, 20
    reference = pretrain(**settings(stdlib_slice, tmp_path / "reference", steps=steps,
                                    eval_every=10, checkpoint_every=10))
    interrupted = tmp_path / "interrupted"
    pretrain(**settings(stdlib_slice, interrupted, steps=stop, eval_every=10,
                        checkpoint_every=10))
    first_part = read_history(interrupted)
    resumed = pretrain(**settings(stdlib_slice, interrupted, steps=steps, eval_every=10,
                                  checkpoint_every=10))
    history, expected = read_history(resumed), read_history(reference)
    # Steps before the interruption come from the checkpoint (their timings are not re-measured).
    assert history[:stop] == first_part
    for column in ("loss", "heldout_loss", "learning_rate"):
        assert [row[column] for row in history] == [row[column] for row in expected]
    weights, expected_weights = (load_file(str(out / "model.safetensors"))
                                 for out in (resumed, reference))
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[k], expected_weights[k]) for k in weights)

    with pytest.raises(ConfigError, match="block_size: 128 there, 64 here"):
        pretrain(**settings(stdlib_slice, interrupted, steps=steps, block_size=64))


def test_checkpoints_of_the_earlier_pretrain_are_refused_saying_why(stdlib_slice, tmp_path,
                                                                   capsys):
    # The layout the earlier `bayesalign pretrain` wrote: its record beside a complete checkpoint.
    work = tmp_path / "old" / "training"
    checkpoint = work / "checkpoints" / "checkpoint-00000100"
    checkpoint.mkdir(parents=True)
    (work / "pretrain.json").write_text(json.dumps({"preset": "tiny", "seed": 0}))
    (checkpoint / "trainer.json").write_text(json.dumps({"step": 100, "engine": "pretrain"}))
    write_manifest(checkpoint)
    argv = ["pretrain", "--corpus", str(stdlib_slice), "--output", str(tmp_path / "old"),
            "--max-steps", "2", "--no-progress"]
    assert main(argv) == 2
    assert re.search("written by an earlier bayesalign pretrain.*--no-resume",
                     capsys.readouterr().err)
    assert main([*argv, "--no-resume"]) == 0  # discarded: trained afresh
    assert len(read_history(tmp_path / "old")) == 2


@pytest.mark.parametrize("content", [None, b"\x00\x01\x02binary\x00" * 100])
def test_a_corpus_without_usable_text_is_a_config_error_naming_it(content, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if content is not None:
        (corpus / "blob.bin").write_bytes(content)
        (corpus / "fake.py").write_bytes(content)
    with pytest.raises(ConfigError, match=str(corpus)):
        pretrain(corpus=corpus, output=tmp_path / "out", progress=False)
    assert main(["pretrain", "--corpus", str(corpus), "--output", str(tmp_path / "out")]) == 2
    assert str(corpus) in capsys.readouterr().err


def test_default_corpus_is_the_stdlib_without_tests():
    corpus = find_corpus(None)
    assert len(corpus.files) > 300 and corpus.split_unit == "file"
    assert all(p.suffix == ".py" and not p.name.startswith("test_") for p in corpus.files)
    assert not any({"test", "tests", "site-packages"} & set(p.parts) for p in corpus.files)


def test_heldout_files_are_a_seeded_partition(stdlib_slice):
    files = find_corpus(stdlib_slice).files
    split = split_files(files, seed=0, heldout_fraction=0.1)
    assert split == split_files(list(reversed(files)), seed=0, heldout_fraction=0.1)
    assert sorted(split["train"] + split["heldout"]) == sorted(files)
    assert len(split["heldout"]) == round(0.1 * len(files))
    assert split["heldout"] != split_files(files, seed=1, heldout_fraction=0.1)["heldout"]


def test_python_segments_are_whole_top_level_definitions():
    source = ("import os\nX = 1\n\n\n# helper\n@decorator\ndef f(x):\n    return x\n\n"
              "class A:\n    pass\nprint(X)\n")
    segments = python_segments(source)
    assert segments == ["import os\nX = 1\n", "# helper\n@decorator\ndef f(x):\n    return x\n",
                        "class A:\n    pass\n", "print(X)\n"]
    assert bool(scorers.parses(segments).all())
    assert python_segments("def broken(:\n") == ["def broken(:\n"]


def test_json_lines_and_saved_datasets_split_by_record(tmp_path):
    import datasets

    rows = [{"text": f"x{i} = {i}\n"} for i in range(200)]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    for path in (jsonl, saved):
        corpus = find_corpus(path)
        assert corpus.split_unit == "record"
        parts = {part: list(documents(corpus, part, seed=0, heldout_fraction=0.2))
                 for part in ("train", "heldout")}
        assert sorted(parts["train"] + parts["heldout"]) == sorted(r["text"] for r in rows)
        assert 20 < len(parts["heldout"]) < 60


def test_block_order_depends_only_on_seed_and_position(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(1001, dtype=np.uint16).tofile(path)
    blocks = Blocks(path, np.dtype(np.uint16), block_size=10, seed=3)
    assert len(blocks) == 100
    epoch = blocks.batch(0, 100)
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 1000, 10))  # each block once
    assert torch.equal(epoch[:, 1:], epoch[:, :-1] + 1)  # windows of consecutive tokens
    fresh = Blocks(path, np.dtype(np.uint16), block_size=10, seed=3)
    assert torch.equal(fresh.batch(130, 7), blocks.batch(130, 7))
    assert not torch.equal(blocks.batch(100, 100), epoch)  # a new order each epoch


@pytest.mark.slow
def test_cli_pretrains_on_the_whole_default_stdlib_corpus(tmp_path):
    assert main(["pretrain", "--output", str(tmp_path), "--max-steps", "300"]) == 0
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["corpus"].startswith("Python") and card["split"]["train"] > 300
    assert card["heldout_loss"] < card["heldout_loss_initial"] - 1.0
    assert CausalLM.from_pretrained(tmp_path).sample_batch(4).tokens.shape[0] == 4
