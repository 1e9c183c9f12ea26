"""experiments/code_prompts (quick, tiny random GPT-2): the prompt set, what is scored, and a
full run on held-out prompts with policies trained on the train prompts only."""

import csv
import json

from bayesalign.inference import dpg, klrl
from experiments import code_prompts
from experiments.code_prompts import METHODS
from experiments.results import read_results


def test_the_prompt_set_is_a_fixed_disjoint_split_of_distinct_requests():
    data = json.loads(code_prompts.PROMPTS.read_text())
    train, held_out = data["train"], data["held_out"]
    assert len(train) + len(held_out) >= 50 and len(held_out) >= 10
    assert len(set(train + held_out)) == len(train) + len(held_out)
    assert all(code_prompts._function_name(p) != p[:24] for p in train + held_out)


def test_code_is_the_first_fence_even_when_cut_off_else_the_whole_answer():
    assert code_prompts.code_of("Here:\n```python\ndef f():\n    pass\n```\nDone.") == (
        "def f():\n    pass\n")
    assert code_prompts.code_of("```\nx = 1\n```") == "x = 1\n"
    assert code_prompts.code_of("Sure:\n```python\ndef f(x):\n    return") == (
        "def f(x):\n    return")
    assert code_prompts.code_of("x = 1") == "x = 1"


def test_quick_run_evaluates_held_out_prompts_with_policies_trained_on_train_prompts(
        tmp_path, monkeypatch):
    trained_on = []
    for module in (dpg, klrl):
        def spy(target, proposal, n, context, original=module.score_batch):
            trained_on.append(context)
            return original(target, proposal, n, context)

        monkeypatch.setattr(module, "score_batch", spy)
    finished = []

    def publish(output, experiment, results, done, *rest, original=code_prompts.publish):
        finished.append(done)
        return original(output, experiment, results, done, *rest)

    monkeypatch.setattr(code_prompts, "publish", publish)
    report = code_prompts.run(tmp_path, quick=True)
    assert (tmp_path / "code_prompts.md").read_text().strip() == report
    assert (tmp_path / "code_prompts.png").stat().st_size > 5000
    train, held_out = code_prompts.load_prompts(code_prompts.Sizes.for_mode(True))
    assert trained_on and set(trained_on) <= set(train)
    results = read_results(tmp_path)
    assert results["experiment"] == "code_prompts" and results["finished"]
    assert report == code_prompts.render(results)  # the tables are the JSON's rendering
    assert results["train_prompts"] == train
    # Written after every held-out prompt; only the last write says the run finished.
    assert finished == [False] * (len(held_out) - 1) + [True]
    rows = results["rows"]
    assert [r["prompt"] for r in rows[::len(METHODS)]] == held_out
    assert [r["method"] for r in rows] == list(METHODS) * len(held_out)
    z_hats = {r["z_hat"] for r in rows}
    assert all(0 <= z <= 1 for z in z_hats)
    assert min(z_hats) == 0 < max(z_hats)  # both the empty and the non-empty path ran
    for r in rows:
        if r["parse_rate"] is None:
            assert r["method"] in ("QRS", "Importance") and r["note"]
            assert r["violations_per_char"] is None
            continue
        assert 0 <= r["parse_rate"] <= 1 and r["violations_per_char"] >= 0
        if r["method"] in ("QRS", "Importance"):  # they return only samples with P > 0
            assert r["parse_rate"] == 1
    assert [s["method"] for s in results["summary"]] == list(METHODS)
    assert results["summary"] == code_prompts.summary(rows)
    # The CSV holds the same rows, an empty cell where the JSON has null.
    csv_rows = list(csv.DictReader((tmp_path / "code_prompts.csv").open()))
    assert [{k: "" if v is None else str(v) for k, v in r.items()} for r in rows] == csv_rows
