"""The `bayesalign` command, the demo's numbers against SPEC §10, and every plot function."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import brute_force_qrs_toy_a, brute_force_toy_a

import bayesalign.app.demo
from bayesalign.app import plots
from bayesalign.app.cli import main
from bayesalign.app.demo import (
    QRS_BETAS,
    DemoSizes,
    exact_qrs_curves,
    pep8_code_target,
    rejection_bound,
    run_demo,
    run_toy_a,
    toy_a_target,
)
from bayesalign.inference import QRS, Exact, Importance, QRSCurves
from bayesalign.models.causal_lm import CausalLM

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOY_A_Z = 2.9543306017  # SPEC §10, Gibbs posterior at kl_coef = 1
# SPEC §10's QRS table (P = a·e^r, q = a): β_q → (acceptance rate, TVD(p,p_β), KL(p‖p_β)).
SPEC_QRS = {1.0: (1.0, 0.3776975621, 0.4912314979), 4.0: (0.5014485599, 0.2186219623, 0.1603136791),
            21.0: (TOY_A_Z / 21, 0.0, 0.0)}


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5000, f"{path} is too small to hold a drawn figure"


def row(rows: list[dict], engine: str) -> dict:
    (found,) = [r for r in rows if r["engine"] == engine]
    return found


def test_info_prints_versions_device_and_engines(capsys: pytest.CaptureFixture) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    assert ("cuda" if torch.cuda.is_available() else "cpu") in out
    engines = next(line for line in out.splitlines() if line.startswith("engines"))
    for name in ("Exact", "Rejection", "QRS", "Importance", "BestOfN"):
        assert name in engines
    assert "Engine" not in engines.split()  # the protocol is not an engine


def test_demo_command_passes_its_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []
    monkeypatch.setattr(bayesalign.app.demo, "run_demo", lambda out, quick: calls.append((out, quick)))
    assert main(["demo", "--output", str(tmp_path), "--quick"]) == 0
    assert calls == [(tmp_path, True)]


def test_help_describes_the_tree_as_it_is(capsys: pytest.CaptureFixture) -> None:
    import importlib
    import re

    from bayesalign import inference

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    packages = re.findall(r"^  (bayesalign[\w.]*) ", out, re.M)
    assert packages == ["bayesalign", "bayesalign.models", "bayesalign.inference",
                        "bayesalign.training", "bayesalign.app"]
    for package in packages:
        importlib.import_module(package)
    engines = out.split("engines:")[1].split("bayesalign.training")[0]
    named = re.findall(r"\b([A-Za-z_]+)\b", engines)
    assert named and all(name in inference.__all__ for name in named), named


def test_unknown_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["nonsense"])
    assert exit_info.value.code == 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    out = tmp_path_factory.mktemp("demo")
    report = run_demo(out, quick=True)
    return out, report, json.loads((out / "results.json").read_text())


def test_demo_writes_figures_and_results(demo: tuple[Path, str, dict]) -> None:
    out, report, _ = demo
    for name in ("engines.png", "qrs_tradeoff.png", "reward_kl_frontier.png"):
        assert_png(out / name)
    assert (out / "results.md").read_text().strip() == report.strip()
    assert "| engine" in report and "QRS sweep" in report and "bundled:code-small" in report


def test_demo_exact_row_matches_spec_log_z(demo: tuple[Path, str, dict]) -> None:
    _, _, results = demo
    exact = row(results["toy_a"]["rows"], "Exact")
    assert abs(exact["log_z"] - math.log(TOY_A_Z)) < 1e-8
    assert abs(exact["log_z"] - math.log(brute_force_toy_a(1.0)["z"])) < 1e-12
    # Its KL and TVD are those of the law Exact declares (p itself), so they test nothing;
    # the row must say so.
    assert exact["distances_from"] == "law" and exact["exact"] is True


def test_demo_rejection_is_exact_and_qrs_is_not(demo: tuple[Path, str, dict]) -> None:
    _, _, results = demo
    rows = results["toy_a"]["rows"]
    rejection, qrs = row(rows, "Rejection"), row(rows, "QRS")
    # Rejection's KL and TVD are those of the law it declares (p, by theorem), not of its
    # draws: the row must say so. The draws themselves are tested against p by a χ² in
    # tests/inference/test_rejection_qrs.py (test_rejection_is_exact_chi_squared, Toy A).
    assert rejection["distances_from"] == "law" and rejection["exact"] is True
    assert qrs["distances_from"] == "law" and qrs["exact"] is True
    # KL(p‖p_β) at β_q = 4 is SPEC §10's 0.1603136791: QRS below max P/q is biased.
    assert qrs["kl_target_policy"] > 0.1
    assert abs(qrs["kl_target_policy"] - 0.1603136791) < 1e-9
    assert abs(qrs["kl_target_policy"] - brute_force_qrs_toy_a(4.0)["kl"]) < 1e-12
    # Acceptance rate of exact rejection is Z/M (SPEC §4.1), within 4 standard errors.
    expected = TOY_A_Z / results["toy_a"]["rejection_bound"]
    assert abs(rejection["acceptance_rate"] - expected) < 4 * rejection["acceptance_rate_se"]


def test_demo_qrs_sweep_agrees_with_enumeration(demo: tuple[Path, str, dict]) -> None:
    _, _, results = demo
    sweep, exact = results["toy_a"]["qrs_sweep"], results["toy_a"]["qrs_exact"]
    for name in ("acceptance_rate", "tvd", "kl"):
        for estimate, se, truth in zip(sweep[name], sweep[f"{name}_se"], exact[name], strict=True):
            assert abs(estimate - truth) <= 4 * se + 1e-9, (name, estimate, se, truth)


def test_demo_code_posteriors_move_towards_the_reward(demo: tuple[Path, str, dict]) -> None:
    _, _, results = demo
    rows = results["code_lm"]["rows"]
    prior = row(rows, "prior")
    assert prior["P[has_newline]"] < 1.0
    for engine in ("Importance", "QRS", "Rejection"):
        # the constraint holds on every sample (weights sum to 1 up to round-off)
        assert row(rows, engine)["P[has_newline]"] == pytest.approx(1.0, abs=1e-12)
        assert row(rows, engine)["E[pep8]"] > prior["E[pep8]"]
    assert all("\n" in text for text in results["code_lm"]["samples"]["Rejection (exact p)"])


def _stored(value: Any) -> Any:
    """``value`` as results.json stores it: JSON types, non-finite floats as strings."""
    def standard(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: standard(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [standard(x) for x in v]
        return str(v) if isinstance(v, float) and not math.isfinite(v) else v

    return json.loads(json.dumps(standard(value)))


def _without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_demo_results_json_has_its_structure(demo: tuple[Path, str, dict]) -> None:
    _, _, results = demo
    assert set(results) == {"quick", "seconds", "toy_a", "code_lm"} and results["quick"] is True
    toy, lm = results["toy_a"], results["code_lm"]
    assert set(toy) == {"rows", "exact_log_z", "rejection_bound", "sweep_samples", "qrs_sweep",
                        "qrs_exact", "frontier"}
    assert [r["label"] for r in toy["rows"]] == [
        "prior a (no inference)", "Exact", "Rejection M=21", "QRS β_q=4", "Importance",
        "BestOfN n=4", "DPG", "DPG + baseline", "DPG off-policy", "KLRL rloo", "KLRL ppo"]
    assert all({"engine", "label", "seconds", "log_z", "kl_target_policy", "tvd"} <= set(r)
               for r in toy["rows"])
    for curves in (toy["qrs_sweep"], toy["qrs_exact"]):
        assert curves["qrs_beta"] == list(QRS_BETAS)
        assert all(len(curves[k]) == len(QRS_BETAS) for k in ("acceptance_rate", "tvd", "kl"))
    assert toy["sweep_samples"] == DemoSizes.for_mode(True).sweep_samples
    assert set(lm) == {"rows", "rejection_bound", "kl_coef", "new_tokens", "samples"}
    assert [r["engine"] for r in lm["rows"]] == ["prior", "Importance", "QRS", "BestOfN",
                                                 "Rejection"]
    assert all(isinstance(r["E[pep8]"], float) and r["E[pep8]"] <= 0 for r in lm["rows"])


def test_demo_seeded_values_are_reproducible_in_one_process(demo: tuple[Path, str, dict]) -> None:
    """Every engine seeds itself: a second run, after the global RNG has moved, gives the
    same Toy A results and the same code-LM Importance estimates as results.json."""
    _, _, results = demo
    torch.manual_seed(12345)
    torch.rand(7)
    sizes = DemoSizes.for_mode(quick=True)
    again = _stored({k: v for k, v in run_toy_a(sizes).items() if k != "histories"})
    toy = results["toy_a"]
    assert _without_times(again.pop("rows")) == _without_times(toy["rows"])
    assert again == {k: v for k, v in toy.items() if k != "rows"}
    prior = CausalLM.from_pretrained("bundled:code-small", max_new_tokens=sizes.lm_new_tokens)
    importance = Importance(num_samples=sizes.lm_importance, chunk_size=sizes.lm_batch)
    d = importance.fit(pep8_code_target(prior)).diagnostics
    stored = row(results["code_lm"]["rows"], "Importance")
    assert (stored["E[pep8]"], stored["log_z"], stored["ess"]) == (
        d.rewards["pep8"], d.log_z, d.ess)


def test_spec_oracles_are_what_brute_force_computes() -> None:
    assert brute_force_toy_a(1.0)["z"] == pytest.approx(TOY_A_Z, abs=1e-9)
    for qrs_beta, (rate, tvd, kl) in SPEC_QRS.items():
        world = brute_force_qrs_toy_a(qrs_beta)
        assert (world["acceptance_rate"], world["tvd"], world["kl"]) == pytest.approx(
            (rate, tvd, kl), abs=1e-9)


def test_rejection_bound_is_the_ceiling_of_max_ratio() -> None:
    # max P/q = e^3 = 20.09 on Toy A (three 2s), so the integer envelope is 21 (SPEC §10).
    assert rejection_bound(Exact().fit(toy_a_target(1.0))) == 21.0
    brute = brute_force_toy_a(1.0)
    max_ratio = max(brute["p"][x] * brute["z"] / brute["a"][x] for x in brute["a"])  # by loop
    assert max_ratio == pytest.approx(math.exp(3), abs=1e-9)
    assert rejection_bound(Exact().fit(toy_a_target(1.0))) == math.ceil(max_ratio)
    assert rejection_bound(Exact().fit(toy_a_target(0.5))) == math.ceil(math.exp(6))


def test_exact_qrs_curves_match_the_spec_table() -> None:
    curves = exact_qrs_curves(toy_a_target(1.0), [1.0, 4.0, 21.0])
    assert curves.acceptance_rate == pytest.approx([1.0, 0.5014485599, TOY_A_Z / 21], abs=1e-9)
    assert curves.tvd == pytest.approx([0.3776975621, 0.2186219623, 0.0], abs=1e-9)
    assert curves.kl == pytest.approx([0.4912314979, 0.1603136791, 0.0], abs=1e-9)
    brute = [brute_force_qrs_toy_a(b) for b in curves.qrs_beta]
    assert curves.acceptance_rate == pytest.approx([b["acceptance_rate"] for b in brute], abs=1e-12)
    assert curves.tvd == pytest.approx([b["tvd"] for b in brute], abs=1e-12)
    assert curves.kl == pytest.approx([b["kl"] for b in brute], abs=1e-12)


@pytest.fixture
def toy_curves() -> QRSCurves:
    return QRS(num_samples=2000).sweep(toy_a_target(1.0), [1.0, 2.0, 4.0, 8.0, 21.0],
                                       num_bootstrap=20)


def test_plot_engine_comparison(tmp_path: Path) -> None:
    rows = [
        {"engine": "Exact", "log_z": 1.0833, "log_z_se": 0.0, "kl_target_policy": 0.0, "tvd": 0.0},
        {"engine": "QRS", "label": "QRS β_q=4", "log_z": 1.04, "log_z_se": 0.02,
         "kl_target_policy": 0.16, "tvd": 0.22},
        {"engine": "BestOfN", "log_z": None, "log_z_se": None, "kl_target_policy": 0.1,
         "tvd": float("nan")},
    ]
    path = plots.plot_engine_comparison(rows, tmp_path / "sub" / "engines.png")
    assert path == tmp_path / "sub" / "engines.png"
    assert_png(path)


def test_plot_qrs_tradeoff(tmp_path: Path, toy_curves: QRSCurves) -> None:
    exact = exact_qrs_curves(toy_a_target(1.0), toy_curves.qrs_beta)
    assert_png(plots.plot_qrs_tradeoff(toy_curves, tmp_path / "qrs.png", exact=exact))
    assert_png(plots.plot_qrs_tradeoff(toy_curves, tmp_path / "qrs_no_exact.png"))


def test_plot_reward_kl_frontier(tmp_path: Path) -> None:
    points = [
        {"engine": "Exact", "kl_coef": b, "kl_policy_prior": kl, "reward": r}
        for b, kl, r in [(2.0, 0.108, 1.066), (1.0, 0.491, 1.575), (0.5, 1.722, 2.422)]
    ] + [{"engine": "BestOfN", "n": 4, "kl_policy_prior": 0.55, "reward": 1.54, "label": "n=4"}]
    assert_png(plots.plot_reward_kl_frontier(points, tmp_path / "frontier.png"))
    assert_png(plots.plot_reward_kl_frontier(points, tmp_path / "symlog.png", symlog_kl=True))


def test_plot_ess_over_steps(tmp_path: Path) -> None:
    history = [{"step": s, "ess_fraction": 0.4 + 0.005 * s} for s in range(100)]
    history.append({"step": 100, "loss": 0.1})  # a step without an ESS measurement is skipped
    assert_png(plots.plot_ess_over_steps(history, tmp_path / "ess.png", label="DPG"))
