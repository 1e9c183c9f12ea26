"""experiments/lsc (quick, tiny random GPT-2): both methods run end to end; the pieces are exact."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from experiments import lsc
from experiments.results import read_results


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quick_run_reports_both_methods(tmp_path):
    report = lsc.run(tmp_path, quick=True)
    assert (tmp_path / "lsc.png").stat().st_size > 5000
    assert (tmp_path / "lsc.md").read_text().strip() == report
    results = read_results(tmp_path)
    assert results["experiment"] == "lsc" and results["finished"]
    assert report == lsc.render(results)  # the tables are the JSON's rendering
    rows = results["rows"]
    assert [r["method"] for r in rows] == ["prior", "raw", "lsc"]
    for r in rows:
        assert math.isfinite(r["kl"])
        satisfaction = [r["sat_pep8"], r["sat_parses"], r["worst"]]
        assert all(0 <= v <= 1 for v in satisfaction)
        assert r["worst"] == min(satisfaction[:2])  # worst = the lower property
    assert "Matched KL" in report and results["matched"]
    assert results["matched"] == lsc.matched(rows)
    # r_ref in the report is the empirical 0.85 quantile of the same seeded prior draws.
    sizes = lsc.Sizes.for_mode(quick=True)
    prior = lsc.load_prior(True, sizes.new_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rewards = lsc.property_rewards(prior.sample_batch(sizes.reference_samples)).numpy()
    assert f"PEP8 {np.quantile(rewards[:, 0], 0.85):.4f}" in report
    assert results["calibration"]["properties"] == list(lsc.PROPERTIES)
    assert results["calibration"]["reference"] == pytest.approx(
        np.quantile(rewards, 0.85, axis=0).tolist(), rel=1e-12, abs=1e-15)
    assert results["calibration"]["scale"] == pytest.approx(
        [s if s > 0 else 1.0 for s in rewards.std(0, ddof=1)], rel=1e-12)
    assert (rewards.shape[1], prior.sample_batch(4).lengths.tolist()) == (2, [16] * 4)


def test_reference_is_empirical_quantile_and_lsc_is_log_and():
    rewards = torch.tensor([[-0.03, 0.0], [-0.01, 1.0], [0.0, 0.0], [-0.02, 0.0], [-0.05, 1.0]],
                           dtype=torch.float64)
    calibration = lsc.calibrate(rewards)
    assert torch.allclose(calibration.reference,
                          torch.tensor(np.quantile(rewards.numpy(), 0.85, axis=0)))
    assert torch.allclose(calibration.scale, rewards.std(0))
    z = (rewards - calibration.reference) / calibration.scale
    assert torch.allclose(lsc.utility(rewards, "lsc", calibration), F.logsigmoid(z).sum(-1))
    assert torch.allclose(lsc.utility(rewards, "raw", calibration),
                          (rewards / calibration.scale).sum(-1))
    # log σ(a) + log σ(b) = log P(good₁ ∧ good₂) under independence.
    p_both = torch.sigmoid(z).prod(-1)
    assert torch.allclose(lsc.utility(rewards, "lsc", calibration).exp(), p_both)


def test_constant_property_gets_unit_scale():
    rewards = torch.tensor([[-0.1, 0.0], [-0.2, 0.0], [-0.3, 0.0]], dtype=torch.float64)
    assert lsc.calibrate(rewards).scale[1] == 1.0


def test_matched_kl_interpolates_each_curve_from_the_prior():
    def row(method, kl, worst):
        return {"method": method, "kl": kl, "worst": worst, "sat_pep8": worst,
                "sat_parses": worst}

    rows = [row("prior", 0.0, 0.1), row("raw", 2.0, 0.3), row("raw", 4.0, 0.5),
            row("lsc", 1.0, 0.4), row("lsc", 3.0, 0.6)]
    assert lsc.at_kl(rows, "raw", "worst", 1.0) == pytest.approx(0.2)
    assert lsc.at_kl(rows, "lsc", "worst", 2.0) == pytest.approx(0.5)
    points = lsc.matched(rows)
    assert [p["kl"] for p in points] == [1.0, 2.0, 3.0]  # 4.0 lies beyond the LSC curve
    assert points[1]["raw_worst"] == pytest.approx(0.3)
    assert points[1]["lsc_worst"] == pytest.approx(0.5)
