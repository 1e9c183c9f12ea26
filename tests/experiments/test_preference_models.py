"""experiments/preference_models (quick): snippets are valid code; the run writes its table and plot."""

import ast

from experiments import preference_models
from experiments.results import read_results


def test_snippets_are_whole_statements_and_lines_are_unindented():
    source = "import os\n\n\nclass A:\n    @property\n    def f(self):\n        return os.sep + 'x' * 40\n"
    snippets = preference_models.code_snippets([source], min_chars=11)  # drops "import os\n"
    assert snippets == ["class A:\n    @property\n    def f(self):\n        return os.sep + 'x' * 40\n",
                        "@property\ndef f(self):\n    return os.sep + 'x' * 40\n"]
    for snippet in snippets:
        ast.parse(snippet)
    assert preference_models.code_lines([source]) == [
        "import os\n", "class A:\n", "@property\n", "def f(self):\n", "return os.sep + 'x' * 40\n"]


def test_quick_run_writes_table_and_figure(tmp_path):
    assert preference_models.main(["--quick", "--output", str(tmp_path)]) == 0
    table = (tmp_path / "preference_models.md").read_text()
    assert "tiny, randomly initialised" in table
    for row in preference_models.ROWS:
        assert f"| {row} | no |" in table and f"| {row} | yes |" in table
    assert (tmp_path / "preference_models.png").stat().st_size > 10_000
    results = read_results(tmp_path)
    assert results["experiment"] == "preference_models" and results["finished"]
    assert table.strip() == preference_models.render(results)  # the table is the JSON's rendering
    columns = [0, *preference_models.QUICK.sizes]
    cells = [(a["objective"], a["pmp"], a["comparisons"]) for a in results["accuracy"]]
    assert cells == [(row, pmp, n) for row in preference_models.ROWS for pmp in (False, True)
                     for n in columns]
    seeds = len(preference_models.QUICK.seeds)
    assert all(len(a["per_seed"]) == seeds and all(0 <= v <= 1 for v in a["per_seed"])
               for a in results["accuracy"])
    assert results["test_pairs"] == preference_models.QUICK.test_pairs
    assert 0 <= results["shorter_wins"] <= 1
