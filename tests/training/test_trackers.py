"""The history reaches accelerate's trackers: a TensorBoard event file read back holds every
history scalar at its step (DPG and KL-RL through the one Trainer)."""

import csv
import math

import pytest
from conftest import toy_a_target, write_corpus
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bayesalign.app.cli import main
from bayesalign.errors import ConfigError
from bayesalign.inference import DPG, KLRL


def read_scalars(folder):
    """{tag: [(step, value), ...]} of every TensorBoard event file under ``folder``."""
    files = sorted(folder.rglob("events.out.tfevents*"))
    assert files, f"no event file under {folder}"
    out = {}
    for path in files:
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return out


@pytest.mark.parametrize("engine", [DPG, lambda **kw: KLRL(algorithm="rloo", **kw)],
                         ids=["dpg", "klrl"])
def test_tensorboard_holds_the_history_at_its_steps(engine, tmp_path):
    posterior = engine(steps=6, batch_size=16, eval_samples=64, progress=False,
                       log_with="tensorboard", tracker_dir=str(tmp_path)).fit(toy_a_target())
    logged = read_scalars(tmp_path)
    for column in ("loss", "kl_policy_prior", "learning_rate"):
        expected = [(row["step"], row[column]) for row in posterior.history]
        got = sorted(logged[column])
        assert [s for s, _ in got] == list(range(6))
        assert all(math.isclose(v, e, rel_tol=1e-6, abs_tol=1e-7)
                   for (_, v), (_, e) in zip(got, expected)), (column, got, expected)


def test_trackers_are_off_by_default_and_checked(tmp_path):
    DPG(steps=2, batch_size=8, eval_samples=16, progress=False,
        checkpoint_dir=str(tmp_path)).fit(toy_a_target())
    assert not list(tmp_path.rglob("events.out.tfevents*"))
    with pytest.raises(ConfigError, match="log_with='tensorbored' is not a tracker"):
        DPG(log_with="tensorbored")


def test_bayesalign_pretrain_sends_its_history_to_tensorboard(tmp_path):
    corpus, output, events = write_corpus(tmp_path / "corpus"), tmp_path / "run", tmp_path / "tb"
    assert main(["pretrain", "--corpus", str(corpus), "--output", str(output), "--max-steps", "4",
                 "--block-size", "32", "--batch-size", "4", "--eval-every", "2",
                 "--eval-samples", "4", "--heldout-fraction", "0.34", "--no-progress",
                 "--log-with", "tensorboard", "--tracker-dir", str(events)]) == 0
    with (output / "training" / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    logged = read_scalars(events)
    got = sorted(logged["loss"])
    assert [s for s, _ in got] == [int(row["step"]) for row in history] == [0, 1, 2, 3]
    assert all(math.isclose(v, float(row["loss"]), rel_tol=1e-6)
               for (_, v), row in zip(got, history))
    assert [s for s, _ in sorted(logged["heldout_loss"])] == [
        int(row["step"]) for row in history if row.get("heldout_loss")]
