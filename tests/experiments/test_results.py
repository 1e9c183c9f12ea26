"""experiments/results: results.json is written whole or not at all, and reads back what was
written; `publish` draws the table and the plot from what was written."""

import json
import math
import os

import pytest
import torch

from experiments.results import RESULTS, publish, read_results, write_results


def test_results_read_back_with_tensors_as_lists_and_non_finite_floats_restored(tmp_path):
    back = write_results(tmp_path, "demo", False, {
        "rows": [{"kl_coef": math.nan, "ratio": math.inf, "low": -math.inf, "note": None}],
        "reference": torch.tensor([0.25, 1.0], dtype=torch.float64), "sizes": (1, 2)})
    assert read_results(tmp_path) == back
    assert back["experiment"] == "demo" and back["finished"] is False
    assert back["reference"] == [0.25, 1.0] and back["sizes"] == [1, 2]
    row = back["rows"][0]
    assert math.isnan(row["kl_coef"]) and row["ratio"] == math.inf and row["low"] == -math.inf
    assert row["note"] is None
    # Standard JSON on disk: no NaN / Infinity literals.
    raw = json.loads((tmp_path / RESULTS).read_text(),
                     parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    assert raw["rows"][0]["kl_coef"] == "nan"


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    write_results(tmp_path, "demo", True, {"value": 1})

    def fail(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_results(tmp_path, "demo", False, {"value": 2})
    assert read_results(tmp_path) == {"experiment": "demo", "finished": True, "value": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [RESULTS]


def test_publish_renders_and_plots_the_saved_json_and_plots_only_once_finished(tmp_path):
    plotted = []

    def render(saved):
        return f"{saved['experiment']}: {saved['sizes']!r}, finished {saved['finished']}"

    def plot(saved, path):
        plotted.append((saved["sizes"], path))

    for finished, partial in ((False, False), (True, False), (False, True)):
        saved, report = publish(tmp_path, "demo", {"sizes": (1, 2)}, finished, render, plot,
                                plot_partial=partial)
        assert saved == read_results(tmp_path) and saved["finished"] is finished
        # The tuple came back from the JSON as a list: the table shows what the file holds.
        assert report == f"demo: [1, 2], finished {finished}"
        assert (tmp_path / "demo.md").read_text() == report + "\n"
    assert plotted == [([1, 2], tmp_path / "demo.png")] * 2
    publish(tmp_path, "bare", {"sizes": 1}, True, render)
    assert (tmp_path / "bare.md").exists() and not (tmp_path / "bare.png").exists()
