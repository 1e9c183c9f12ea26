"""experiments/smc_code (quick, tiny random GPT-2): every method runs end to end."""

import math
from types import SimpleNamespace

import torch

from bayesalign.sequences import Sequences
from experiments import smc_code
from experiments.results import read_results


def test_quick_smc_code_runs_every_method(tmp_path):
    report = smc_code.run(tmp_path, quick=True)
    assert (tmp_path / "smc_code.png").stat().st_size > 5000
    assert (tmp_path / "smc_code.md").read_text().strip() == report
    results = read_results(tmp_path)
    assert results["experiment"] == "smc_code" and results["finished"]
    assert report == smc_code.render(results)  # the table is the JSON's rendering
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["Importance (prior)", "Rejection", "SMC, no twist", "SMC, learned twist",
                          "SMC, learned twist, twisted proposal", "SMC, prefix twist",
                          "SMC, prefix twist, twisted proposal", "SMC, prefix + learned twist",
                          "SMC, prefix + learned twist, twisted proposal"]
    # The banned set leaves at most the asked fraction of the pilot, so the target is rare.
    assert results["banned"] and results["pilot_acceptance"] <= 0.1
    # q ∝ a·1[ok] never draws a banned token: no run loses every particle.
    twisted = rows["SMC, prefix twist, twisted proposal"]
    assert twisted["zero_runs"] == 0 and math.isfinite(twisted["log_z_hat"])
    assert twisted["ess_per_1k_tokens"] > rows["Importance (prior)"]["ess_per_1k_tokens"]
    assert all(r["tokens"] == 16 * 6 for r in rows.values())
    assert math.isfinite(results["reference_log_z"])
    # Quick mode's few replicates give noisy ends (their order is not asserted); the prefix twist
    # keeps SMC's lower end finite where a prior replicate may have no allowed draw.
    assert math.isfinite(results["bounds_iwae"]["upper"])
    for key in ("bounds_smc", "bounds_learned"):
        assert all(math.isfinite(results[key][end]) for end in ("lower", "upper")), key
    assert results["twist_training_tokens"] > 0


def test_empty_samples_are_not_clean_so_any_acceptance_is_reached():
    # Half the pilot is empty (EOS first): they meet any banned-token constraint, so the target
    # leaves them out and the banned set only has to exclude the others.
    tokens = torch.tensor([[3, 0], [4, 0], [5, 0], [3, 0], [0, 0], [0, 0], [0, 0], [0, 0]])
    mask = torch.tensor([[True, True]] * 4 + [[True, False]] * 4)
    pilot = Sequences(tokens=tokens, mask=mask)
    prior = SimpleNamespace(sample_batch=lambda n: pilot, vocab_size=8, eos_token_id=0)
    sizes = smc_code.Sizes.for_mode(quick=True)  # acceptance 0.1
    banned, acceptance = smc_code.banned_tokens(prior, sizes)
    assert banned == [3, 4, 5] and acceptance == 0.0
    assert smc_code.non_empty(pilot, 0).tolist() == [True] * 4 + [False] * 4


