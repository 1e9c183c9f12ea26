"""experiments/preference_models (quick): snippets are valid code; the run writes its table and plot."""

import ast

from experiments import preference_models


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
