"""The `bayesalign` command, the demo's numbers against SPEC §10, and every plot function."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import bayesalign.app.demo
from bayesalign.app import plots
from bayesalign.app.cli import main
from bayesalign.app.demo import exact_qrs_curves, rejection_bound, run_demo, toy_a_target
from bayesalign.inference import QRS, Exact, QRSCurves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOY_A_Z = 2.9543306017  # SPEC §10, Gibbs posterior at kl_coef = 1


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
    assert exact["kl_target_policy"] == 0 and exact["tvd"] == 0


def test_demo_rejection_is_exact_and_qrs_is_not(demo: tuple[Path, str, dict]) -> None:
    _, _, results = demo
    rows = results["toy_a"]["rows"]
    rejection, qrs = row(rows, "Rejection"), row(rows, "QRS")
    assert abs(rejection["kl_target_policy"]) < 1e-12 and abs(rejection["tvd"]) < 1e-12
    # KL(p‖p_β) at β_q = 4 is SPEC §10's 0.1603136791: QRS below max P/q is biased.
    assert qrs["kl_target_policy"] > 0.1
    assert abs(qrs["kl_target_policy"] - 0.1603136791) < 1e-9
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


def test_rejection_bound_is_the_ceiling_of_max_ratio() -> None:
    # max P/q = e^3 = 20.09 on Toy A (three 2s), so the integer envelope is 21 (SPEC §10).
    assert rejection_bound(Exact().fit(toy_a_target(1.0))) == 21.0
    assert rejection_bound(Exact().fit(toy_a_target(0.5))) == math.ceil(math.exp(6))


def test_exact_qrs_curves_match_the_spec_table() -> None:
    curves = exact_qrs_curves(toy_a_target(1.0), [1.0, 4.0, 21.0])
    assert curves.acceptance_rate == pytest.approx([1.0, 0.5014485599, TOY_A_Z / 21], abs=1e-9)
    assert curves.tvd == pytest.approx([0.3776975621, 0.2186219623, 0.0], abs=1e-9)
    assert curves.kl == pytest.approx([0.4912314979, 0.1603136791, 0.0], abs=1e-9)


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
