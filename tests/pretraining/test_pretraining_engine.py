"""`Pretraining` on a Corpus target (SPEC §5): control tokens, thresholds, every objective end to
end on a tiny GPT-2, the score cache, SIGKILL then exact resume, and clear errors."""

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from conftest import kill_after_first_checkpoint

import bayesalign as ba
from bayesalign.errors import ConfigError, InvalidTargetError
from bayesalign.inference.pretraining import OBJECTIVES, Pretraining
from bayesalign.inference.pretraining_data import BAD_TOKEN, GOOD_TOKEN, prepare
from bayesalign.models import Corpus, scorers
from bayesalign.targets import NO_CONTEXT

TINY = {"steps": 6, "batch_size": 4, "block_size": 32, "progress": False, "eval_samples": 8,
        "max_new_tokens": 16}


def write_corpus(folder: Path) -> Path:
    """Three files of 'value = …' lines; file f marks every (3 + f)-th line 'bad'."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(3):
        (folder / f"p{f}.txt").write_text("".join(
            f"value = {f * 50 + i} * {i}{' bad' if i % (3 + f) == 0 else ''}\n" for i in range(50)))
    return folder


def clean_target(corpus: Corpus, calls: list | None = None) -> ba.Target:
    """Reward −1 for a 'bad' segment, 0 otherwise; ``calls`` counts the segments scored."""

    @ba.target
    def clean():
        y = pyro.sample("y", corpus)
        if calls is not None:
            calls.append(len(y))
        ba.reward("r", torch.tensor([-float("bad" in t) for t in y.text]))

    return clean


@pytest.fixture
def corpus(tmp_path) -> Corpus:
    return Corpus(write_corpus(tmp_path / "corpus"), segment="line")


def test_conditional_training_tags_each_segment_once_and_never_samples_a_tag(corpus, tmp_path):
    target = clean_target(corpus)
    engine = Pretraining(objective="conditional", drop_token_fraction=0.0,
                         data_dir=str(tmp_path / "data"), **TINY)
    data = prepare(engine, target, corpus, NO_CONTEXT, None)
    good, bad = data.tokenizer.convert_tokens_to_ids([GOOD_TOKEN, BAD_TOKEN])
    tokens = np.fromfile(data.folder / "tokens.bin", dtype=data.meta["dtype"]).tolist()
    tags = [t for t in tokens if t in (good, bad)]
    assert len(tags) == data.meta["segments"] == len(corpus.segments)  # exactly one each
    expected = [good if "bad" not in s else bad for s in corpus.segments]
    assert tags == expected  # threshold 0: a segment is good iff it holds no 'bad'
    after_tag = [tokens[i + 1] for i, t in enumerate(tokens) if t in (good, bad)]
    assert not set(after_tag) & {good, bad, data.tokenizer.eos_token_id}

    post = engine.fit(target)
    draws = post.sample(64)
    assert not torch.isin(draws.tokens, torch.tensor([good, bad])).any()
    assert draws.context[0] == data.tokenizer.eos_token + GOOD_TOKEN  # conditioned on <|good|>


def test_phf_decoding_lets_the_model_tag_segments_and_hides_the_tags(corpus, tmp_path):
    engine = Pretraining(objective="conditional", conditional_decoding="every_segment",
                         data_dir=str(tmp_path / "data"), **{**TINY, "steps": 30})
    post = engine.fit(clean_target(corpus))
    good, bad = post.policy.tokenizer.convert_tokens_to_ids([GOOD_TOKEN, BAD_TOKEN])
    draws = post.sample(64)
    assert not (draws.tokens == bad).any()  # "every segment good": <|bad|> is never written
    tagged = (draws.tokens == good).any(-1)
    assert tagged.any()  # trained with a tag before every line, it writes <|good|> itself
    assert not any(GOOD_TOKEN in t or BAD_TOKEN in t for t in draws.text)
    row = int(tagged.nonzero()[0])
    plain = post.policy.tokenizer.decode([t for t in draws.token_lists()[row] if t != good
                                          and t != post.policy.eos_token_id])
    assert draws.text[row] == plain
    assert post.config["conditional_decoding"] == "every_segment"
    with pytest.raises(ConfigError, match="conditional_decoding must be"):
        Pretraining(objective="conditional", conditional_decoding="always")


def test_control_token_strings_in_the_corpus_stay_text(tmp_path):
    folder = write_corpus(tmp_path / "corpus")
    (folder / "p0.txt").write_text('tags = "<|good|> <|bad|> <|endoftext|>"\nvalue = 1 bad\n')
    corpus = Corpus(folder, segment="line")
    engine = Pretraining(objective="conditional", drop_token_fraction=0.0,
                         data_dir=str(tmp_path / "data"), **TINY)
    data = prepare(engine, clean_target(corpus), corpus, NO_CONTEXT, None)
    special = data.tokenizer.convert_tokens_to_ids([GOOD_TOKEN, BAD_TOKEN])
    tokens = np.fromfile(data.folder / "tokens.bin", dtype=data.meta["dtype"]).tolist()
    assert sum(t in special for t in tokens) == data.meta["segments"]  # only the real tags
    # EOS d1 EOS d2 … EOS: the separators only, none from the text.
    assert tokens.count(data.tokenizer.eos_token_id) == len(list(corpus.documents())) + 1


def test_dropped_tags_follow_drop_token_fraction(corpus, tmp_path):
    engine = Pretraining(objective="conditional", drop_token_fraction=0.3,
                         data_dir=str(tmp_path / "data"), **TINY)
    data = prepare(engine, clean_target(corpus), corpus, NO_CONTEXT, None)
    dropped = 1 - data.meta["control_tokens"] / data.meta["segments"]
    assert abs(dropped - 0.3) < 0.12  # 150 segments: 3 standard errors


@pytest.mark.parametrize("quantile", [0.2, 0.5])
def test_thresholds_are_numpy_quantiles_and_recorded(corpus, tmp_path, quantile):
    @ba.target
    def short():  # many distinct scores: minus the length in characters over 10
        y = pyro.sample("y", corpus)
        ba.reward("r", torch.tensor([-len(t) / 10 for t in y.text]))

    target = short
    scores = target.log_potential(corpus.sequences(corpus.segments)).numpy()
    engine = Pretraining(objective="unlikelihood", threshold_quantile=quantile,
                         data_dir=str(tmp_path / "data"), **TINY)
    post = engine.fit(target)
    assert post.config["threshold"] == float(np.quantile(scores, quantile, method="lower"))
    assert post.config["fraction_good"] == pytest.approx(float(np.mean(scores >= post.config["threshold"])))
    assert post.config["threshold_quantile"] == quantile


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_trains_end_to_end(objective, corpus, tmp_path):
    post = Pretraining(objective=objective, data_dir=str(tmp_path / "data"),
                       **{**TINY, "steps": 8}).fit(clean_target(corpus))
    losses = [row["loss"] for row in post.history]
    assert len(losses) == 8 and np.isfinite(losses).all()
    nll = [row.get("nll", row["loss"]) for row in post.history]
    assert nll[-1] < nll[0]  # the corpus NLL falls under every objective
    assert post.history[-1]["tokens_per_s"] > 0 and post.history[-1]["eta_s"] == 0
    assert "r" in post.diagnostics.rewards


def test_a_rerun_reads_scores_from_the_cache(corpus, tmp_path):
    calls: list[int] = []
    target = clean_target(corpus, calls)
    cache = str(tmp_path / "scores.sqlite")
    first = prepare(Pretraining(objective="conditional", data_dir=str(tmp_path / "a"),
                                score_cache=cache, **TINY), target, corpus, NO_CONTEXT, None)
    scored = sum(calls)
    assert scored == first.meta["segments_scored_now"] == len(set(corpus.segments))
    again = prepare(Pretraining(objective="rwr", data_dir=str(tmp_path / "b"), score_cache=cache,
                                **TINY), target, corpus, NO_CONTEXT, None)
    assert sum(calls) == scored and again.meta["segments_scored_now"] == 0


def test_in_context_scores_are_cached_per_document_and_line(tmp_path):
    # The same def line clean in one file (two blank lines before it) and E302 in the other.
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "a.py").write_text("import os\n\n\ndef f():\n    return os\n")
    (folder / "b.py").write_text("import os\ndef f():\n    return os\n")
    corpus = Corpus(folder, segment="line", segment_context=True)

    @ba.target
    def clean_code():
        y = pyro.sample("y", corpus)
        ba.reward("pep8", scorers.pep8_in_document(y))

    cache = str(tmp_path / "scores.sqlite")
    engine = Pretraining(objective="rwr", data_dir=str(tmp_path / "a"), score_cache=cache, **TINY)
    data = prepare(engine, clean_code, corpus, NO_CONTEXT, None)
    # 3 segments per file (blank lines join the line before): 'def f():' and '    return os'
    # appear in both files and are scored apart, so all 6 are scored (isolated scoring: 4).
    assert data.meta["segments"] == data.meta["segments_scored_now"] == 6
    assert data.meta["score_min"] == pytest.approx(-1 / len("def f():\n"))
    again = prepare(Pretraining(objective="mle", data_dir=str(tmp_path / "b"), score_cache=cache,
                                **TINY), clean_code, corpus, NO_CONTEXT, None)
    assert again.meta["segments_scored_now"] == 0 and again.meta["score_min"] == data.meta["score_min"]


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    sys.path[:0] = [{here!r}, {tests!r}]
    from test_pretraining_engine import clean_target, kill_settings
    from bayesalign.inference.pretraining import Pretraining
    from bayesalign.models import Corpus, scorers
    Pretraining(**kill_settings({root!r})).fit(clean_target(Corpus({corpus!r})))
""")


def kill_settings(root: str, checkpoints: bool = True) -> dict:
    checkpointing = {"checkpoint_dir": f"{root}/ckpt", "checkpoint_every": 3} if checkpoints else {}
    return {**TINY, "objective": "conditional", "steps": 400, "data_dir": f"{root}/data",
            **checkpointing}


def test_sigkill_then_resume_matches_an_uninterrupted_run(corpus, tmp_path):
    script = KILL_SCRIPT.format(here=str(Path(__file__).parent), tests=str(Path(__file__).parents[1]),
                                root=str(tmp_path),
                                corpus=str(tmp_path / "corpus"))
    kill_after_first_checkpoint(script, tmp_path / "ckpt", steps=400, timeout=180)
    target = clean_target(Corpus(tmp_path / "corpus"))
    resumed = Pretraining(**kill_settings(str(tmp_path))).fit(target)
    reference = Pretraining(**kill_settings(str(tmp_path), checkpoints=False)).fit(target)
    for a, b in zip(resumed.policy.model.parameters(), reference.policy.model.parameters()):
        assert torch.equal(a, b)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in reference.history]


def test_resume_with_other_options_is_refused(corpus, tmp_path):
    settings = {**TINY, "data_dir": str(tmp_path / "data"), "checkpoint_dir": str(tmp_path / "c")}
    Pretraining(objective="rwr", **settings).fit(clean_target(corpus))
    with pytest.raises(ConfigError, match="awr_beta: 1.0 there, 2.0 here"):
        Pretraining(objective="rwr", awr_beta=2.0, **{**settings, "steps": 8}).fit(
            clean_target(corpus))
    with pytest.raises(ConfigError, match="batch_size: 4 there, 2 here"):
        Pretraining(objective="rwr", **{**settings, "steps": 8, "batch_size": 2}).fit(
            clean_target(corpus))


def test_bad_input_is_named(corpus, tmp_path):
    for quantile in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="threshold_quantile must be in"):
            Pretraining(threshold_quantile=quantile)

    @ba.target
    def flat():
        y = pyro.sample("y", corpus)
        ba.reward("r", torch.zeros(len(y)))

    with pytest.raises(ConfigError, match="every one of the 150 segments scores 0.0"):
        Pretraining(objective="conditional", data_dir=str(tmp_path / "d"), **TINY).fit(flat)
    assert not list((tmp_path / "d").glob(".tmp-*"))  # nothing half-prepared is left
    with pytest.raises(InvalidTargetError, match="prior site is a Corpus"):
        Pretraining(**TINY).fit(ba.target(lambda: pyro.sample("y", _toy_prior())))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no usable text"):
        Corpus(tmp_path / "empty")


def test_num_samples_is_the_old_name_of_eval_samples():
    with pytest.warns(DeprecationWarning, match="use eval_samples="):
        assert Pretraining(num_samples=3).eval_samples == 3
    with pytest.raises(ConfigError, match="num_samples= is the old name of eval_samples="):
        Pretraining(num_samples=3, eval_samples=4)


def test_a_list_of_contexts_is_refused(corpus):
    with pytest.raises(ConfigError, match="one context per fit.*not contexts="):
        Pretraining(**TINY).fit(clean_target(corpus), contexts=["a", "b"])


def test_mle_on_a_training_split_measures_the_heldout_loss(tmp_path):
    corpus = Corpus(write_corpus(tmp_path / "corpus"), segment="line", split="train",
                    heldout_fraction=0.3)
    post = Pretraining(objective="mle", data_dir=str(tmp_path / "d"), eval_every=3,
                       **TINY).fit(clean_target(corpus))
    assert [row["step"] for row in post.history if "heldout_loss" in row] == [0, 3]
    assert post.config["heldout"]["documents"] == 1  # one of the three files
    assert post.config["heldout_loss"] < post.history[0]["heldout_loss"]
    whole = Pretraining(objective="mle", data_dir=str(tmp_path / "e"), **TINY).fit(
        clean_target(Corpus(tmp_path / "corpus", segment="line")))
    assert "heldout_loss" not in whole.config and "heldout_loss" not in whole.history[0]


def _toy_prior():
    from conftest import toy_a_prior

    return toy_a_prior()


def test_recorded_run_config_is_json(corpus, tmp_path):
    post = Pretraining(objective="filtering", data_dir=str(tmp_path / "d"), **TINY).fit(
        clean_target(corpus))
    assert post.config["threshold_unit"] == "document"
    json.dumps(post.config)


TARGET_FILE = textwrap.dedent("""
    import pyro
    import torch

    import bayesalign as ba
    from bayesalign.models import Corpus, scorers

    corpus = Corpus({corpus!r}, segment="line")


    @ba.target
    def clean():
        y = pyro.sample("y", corpus)
        ba.reward("r", torch.tensor([-float("bad" in t) for t in y.text]))
""")


def test_cli_trains_a_target_declared_in_a_file(tmp_path, capsys):
    from bayesalign.app.cli import main
    from bayesalign.models import CausalLM

    write_corpus(tmp_path / "corpus")
    spec = tmp_path / "phf_target.py"
    spec.write_text(TARGET_FILE.format(corpus=str(tmp_path / "corpus")))
    common = ["pretrain", "--output", str(tmp_path / "out"), "--max-steps", "4", "--batch-size",
              "4", "--block-size", "32", "--num-samples", "4", "--threads", "1"]
    assert main([*common, "--objective", "conditional", "--target", f"{spec}:clean"]) == 0
    record = json.loads((tmp_path / "out" / "pretraining.json").read_text())
    assert record["config"]["threshold"] == 0.0 and record["config"]["objective"] == "conditional"
    assert (tmp_path / "out" / "training" / "history.csv").exists()
    assert CausalLM.from_pretrained(tmp_path / "out").vocab_size == record["config"]["vocab_size"]
    capsys.readouterr()
    for argv, message in [
        (["--objective", "rwr"], "needs --target FILE.py:NAME"),
        (["--target", f"{tmp_path}/missing.py:clean"], "no such file"),
        (["--target", f"{spec}:dirty"], "'dirty' is not defined in .*targets there: clean"),
        (["--target", f"{spec}:corpus"], "'corpus' is not a @ba.target"),
        (["--target", f"{spec}:clean", "--corpus", str(tmp_path)], "cannot be combined"),
    ]:
        assert main([*common, *argv]) == 2
        assert re.search(message, capsys.readouterr().err)
