"""``bayesalign fit`` and ``bayesalign show``: every engine through the command line gives the
numbers the same engine gives from Python with the same seed; bad input is named; a run folder
is finished only once ``COMPLETE`` is written, and a killed learned run resumes from it, on one
process and (slow) on two under ``accelerate launch``."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from conftest import conditional_world, kill_after_first_checkpoint, toy_a_target
from two_processes import training_draws

from bayesalign.app.cli import main
from bayesalign.app.engine_options import ENGINES, engine_class, engine_fields
from bayesalign.inference import DPG
from bayesalign.models.prefix_tree import PrefixTreeLM

ROOT = Path(__file__).resolve().parents[2]
# Toy A (SPEC §10) and the conditional world of tests/conftest.py, declared as a user would.
TARGETS = textwrap.dedent('''
    import pyro
    import torch

    import bayesalign as ba
    from bayesalign.models import TabularLM

    T = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]], dtype=torch.float64)
    prior = TabularLM(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), T, 3)


    @ba.target
    def toy_a():
        y = pyro.sample("y", prior)
        ba.reward("r", (y.tokens == 2).sum(-1).double(), kl_coef=1.0)


    def conditional() -> ba.Target:
        priors = {"a": prior,
                  "b": TabularLM(torch.tensor([0.1, 0.1, 0.8], dtype=torch.float64), T, 3)}

        @ba.target
        def has_two(context):
            y = pyro.sample("y", priors[context])
            ba.constraint("has_two", (y.tokens == 2).any(-1))

        return has_two
''')
LEARNED = {"steps": 4, "batch_size": 8, "eval_samples": 32, "seed": 3}
# Quick settings of every engine; Rejection's bound is above max P/q = e^3 on Toy A.
QUICK: dict[str, dict[str, Any]] = {
    "exact": {},
    "rejection": {"bound": 21.0, "num_samples": 40, "seed": 1},
    "qrs": {"qrs_beta": 4.0, "num_samples": 40, "seed": 1},
    "importance": {"num_samples": 64, "seed": 2},
    "best_of_n": {"n": 3, "num_samples": 40, "seed": 2},
    "smc": {"num_particles": 16, "seed": 4},
    "dpg": {**LEARNED, "baseline": True},
    "klrl": {**LEARNED, "algorithm": "rloo"},
}
# Engine fields with no one-line comment in inference/ (the help says so); none may be added.
UNDOCUMENTED: set[str] = set()


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("targets") / "targets.py"
    path.write_text(TARGETS)
    return path


def flags(options: dict[str, Any]) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]


def fit(target: str, engine: str, output: Path, *arguments: str) -> int:
    return main(["fit", target, "--engine", engine, "--output", str(output), *arguments])


def as_json(diagnostics: dict) -> str:
    """Diagnostics as the run folder writes them (JSON: NaN and ±inf kept, so compared exactly)."""
    return json.dumps(json.loads(json.dumps(diagnostics, default=str)), sort_keys=True)


def folder_diagnostics(output: Path) -> str:
    return as_json(json.loads((output / "diagnostics.json").read_text()))


@pytest.mark.parametrize("engine", sorted(QUICK))
def test_each_engine_from_the_command_line_matches_python(engine, targets, tmp_path) -> None:
    options = QUICK[engine]
    quiet = ["--no-progress"] if "steps" in options else []
    assert fit(f"{targets}:toy_a", engine, tmp_path / "run", *flags(options), *quiet) == 0
    python = engine_class(engine)(**options).fit(toy_a_target(1.0))
    assert folder_diagnostics(tmp_path / "run") == as_json(python.diagnostics.as_dict())
    run = tmp_path / "run"
    assert (run / "COMPLETE").is_file()
    assert (run / "posterior" / "samples.safetensors").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["engine"] == engine and config["target"] == f"{targets}:toy_a"
    assert all(config[k] == v for k, v in options.items())
    if "steps" in options:  # learned: history, plots, a policy and a checkpoint in the folder
        assert len((run / "history.csv").read_text().splitlines()) == options["steps"] + 1
        plots = {"dpg": {"ess_over_steps.png", "reward_kl.png"}, "klrl": {"reward_kl.png"}}
        assert {p.name for p in run.glob("*.png")} == plots[engine]
        assert (run / "posterior" / "policy.safetensors").is_file()
        assert list((run / "checkpoints").glob("checkpoint-*"))
    else:
        assert {p.name for p in run.glob("*.png")} == ({"qrs_tradeoff.png"} if engine == "qrs"
                                                       else set())


def test_cdpg_over_contexts_matches_python(targets, tmp_path) -> None:
    assert fit(f"{targets}:conditional", "cdpg", tmp_path / "run", *flags(LEARNED),
               "--context=a", "--context=b") == 0
    python = DPG(**LEARNED).fit(conditional_world(), contexts=["a", "b"])
    assert python.engine == "CDPG"
    assert folder_diagnostics(tmp_path / "run") == as_json(python.diagnostics.as_dict())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["contexts"] == ["a", "b"]


def test_config_file_with_a_flag_overriding_it_and_config_json_reruns(targets, tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"engine": "importance", "target": f"{targets}:toy_a",
                                      "num_samples": 64, "seed": 5, "resample": True}))
    assert main(["fit", "--config", str(config), "--seed=6", "--output",
                 str(tmp_path / "one")]) == 0
    python = engine_class("importance")(num_samples=64, seed=6, resample=True).fit(toy_a_target())
    assert folder_diagnostics(tmp_path / "one") == as_json(python.diagnostics.as_dict())
    written = tmp_path / "one" / "config.json"
    assert json.loads(written.read_text())["seed"] == 6
    # The config as run is itself a config file: it reruns the same fit.
    assert main(["fit", "--config", str(written), "--output", str(tmp_path / "two")]) == 0
    assert folder_diagnostics(tmp_path / "two") == folder_diagnostics(tmp_path / "one")


def test_a_learned_run_reruns_from_its_config_json_into_its_own_folder(targets, tmp_path,
                                                                      capsys) -> None:
    assert fit(f"{targets}:toy_a", "klrl", tmp_path / "one", *flags(LEARNED), "--no-progress") == 0
    config = tmp_path / "one" / "config.json"
    assert json.loads(config.read_text())["checkpoint_dir"] is None  # the default, not a path
    assert main(["fit", "--config", str(config), "--output", str(tmp_path / "two")]) == 0
    assert folder_diagnostics(tmp_path / "two") == folder_diagnostics(tmp_path / "one")
    assert list((tmp_path / "two" / "checkpoints").glob("checkpoint-*"))
    assert main(["show", str(tmp_path / "two")]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^engine +KLRL-rloo$", table, re.M)
    assert re.search(r"^config\[algorithm\] +rloo$", table, re.M)


def test_help_lists_every_option_with_its_doc_and_what_the_cli_leaves_out(capsys) -> None:
    for engine in ENGINES:
        with pytest.raises(SystemExit) as done:
            main(["fit", "--engine", engine, "--help"])
        assert done.value.code == 0
        out = " ".join(capsys.readouterr().out.split())
        options, left_out = engine_fields(engine_class(engine))
        for option in options:
            assert f"--{option.name}" in out
            assert " ".join(option.doc.split()) in out
        for name, _ in left_out:
            assert f" {name}: " in out
        assert {o.name for o in options if not o.doc} <= UNDOCUMENTED
    assert {"policy", "proposal"} <= {n for n, _ in engine_fields(engine_class("dpg"))[1]}


def error_of(capsys, *argv: str) -> str:
    """Run the command, which must fail with status 2 (bad input); its stderr, one line."""
    try:
        status = main(list(argv))
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status == 2
    return " ".join(capsys.readouterr().err.split())


def test_bad_input_is_named(targets, tmp_path, capsys) -> None:
    out = str(tmp_path / "never")
    toy = f"{targets}:toy_a"
    assert "unknown engine 'dgp'; did you mean dpg?" in error_of(
        capsys, "fit", toy, "--engine", "dgp", "--output", out)
    assert "dpg has no option --stepz; did you mean --steps" in error_of(
        capsys, "fit", toy, "--engine", "dpg", "--stepz=3", "--output", out)
    assert "argument --steps: invalid int value: 'abc'" in error_of(
        capsys, "fit", toy, "--engine", "dpg", "--steps=abc", "--output", out)
    assert "steps must be > 0, got 0" in error_of(
        capsys, "fit", toy, "--engine", "dpg", "--steps=0", "--output", out)
    listing = "targets there: toy_a, conditional()"
    assert f"defines no 'nope'; {listing}" in error_of(
        capsys, "fit", f"{targets}:nope", "--engine", "exact", "--output", out)
    assert f"names no target: write {targets}:TARGET; {listing}" in error_of(
        capsys, "fit", str(targets), "--engine", "exact", "--output", out)
    broken = tmp_path / "broken.py"
    broken.write_text("import math\n\n\ndef helper():\n    return math.log(0)\n\n\nhelper()\n")
    message = error_of(capsys, "fit", f"{broken}:t", "--engine", "exact", "--output", out)
    assert f"{broken} raised on import: Traceback (most recent call last):" in message
    assert f'File "{broken}", line 8, in <module> helper()' in message
    assert f'File "{broken}", line 5, in helper' in message
    assert "ValueError: math domain error" in message
    assert "importlib" not in message and "target_file.py" not in message  # not our frames
    assert not Path(out).exists()


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("bad.yaml", "steps: 3\nbatch_size: [1\n", "not valid YAML: while parsing a flow sequence at "
     "line 2, column 13; expected ',' or ']', but got '<stream end>' at line 3, column 1"),
    ("bad.json", '{"steps": 3,\n "batch_size": }', "not valid JSON at line 2, column 16"),
    ("typed.yaml", "steps: three\n", "option 'steps' must be int, got 'three'"),
    ("typo.json", '{"stepss": 3}', "dpg has no option 'stepss'; did you mean steps?"),
    ("list.yaml", "- steps\n", "the file must hold a mapping of option: value, not a list"),
])
def test_a_bad_config_file_is_named_with_where(name, text, expected, targets, tmp_path,
                                               capsys) -> None:
    config = tmp_path / name
    config.write_text(text)
    message = error_of(capsys, "fit", f"{targets}:toy_a", "--engine", "dpg", "--config",
                       str(config), "--output", str(tmp_path / "never"))
    assert f"--config {config}: {expected}" in message


def test_show_prints_the_table_and_refuses_an_unfinished_folder(targets, tmp_path,
                                                                capsys) -> None:
    assert fit(f"{targets}:toy_a", "exact", tmp_path / "exact") == 0
    capsys.readouterr()
    assert main(["show", str(tmp_path / "exact")]) == 0
    table = capsys.readouterr().out
    exact = engine_class("exact")().fit(toy_a_target())
    assert "engine            Exact" in table
    assert f"log_z             {exact.log_z:.6g}" in table
    # A fit that fails mid-run (P/q above the bound) leaves a folder without COMPLETE.
    failed = tmp_path / "failed"
    assert fit(f"{targets}:toy_a", "rejection", failed, "--bound=2") == 2
    assert (failed / "config.json").is_file() and not (failed / "COMPLETE").exists()
    message = error_of(capsys, "show", str(failed))
    assert "is not a finished run (no COMPLETE marker" in message
    assert "unfinished rejection run on" in message
    # A finished folder is not overwritten.
    assert "holds a finished run" in error_of(
        capsys, "fit", f"{targets}:toy_a", "--engine", "exact", "--output", str(tmp_path / "exact"))


def test_a_killed_dpg_run_resumes_from_its_folder_bit_identically(targets, tmp_path) -> None:
    options = {"steps": 40, "batch_size": 8, "eval_samples": 32, "seed": 7,
               "checkpoint_every": 2}
    run = tmp_path / "run"
    argv = ["fit", f"{targets}:toy_a", "--engine", "dpg", "--output", str(run),
            "--no-progress", *flags(options)]
    script = f"import sys; from bayesalign.app.cli import main; sys.exit(main({argv!r}))"
    kill_after_first_checkpoint(script, run / "checkpoints", options["steps"])
    assert not (run / "COMPLETE").exists()
    before = checkpointed_seconds(run)
    assert main(argv) == 0
    assert history_column(run, "seconds")[: len(before)] == before  # resumed, not restarted
    python = DPG(**{k: v for k, v in options.items() if k != "checkpoint_every"}).fit(
        toy_a_target())
    assert folder_diagnostics(run) == as_json(python.diagnostics.as_dict())
    assert history_column(run, "loss") == [row["loss"] for row in python.history]


def checkpointed_seconds(run: Path) -> list[float]:
    """The step times in the newest checkpoint's history: a resumed run's history starts with
    them, a run started afresh would time its steps anew."""
    newest = max((run / "checkpoints").glob("checkpoint-*"), key=lambda p: p.name)
    return [row["seconds"] for row in json.loads((newest / "trainer.json").read_text())["history"]]


def launch_fit(argv: list[str]) -> subprocess.Popen:
    """``accelerate launch`` of ``bayesalign ARGV`` on 2 CPU processes."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port=0",
               "-m", "bayesalign", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def kill_job(pid: int) -> None:
    """SIGKILL the launcher and its workers, as a killed job is (torch's elastic agent starts
    each worker in a session of its own: a SIGKILL of the launcher alone leaves them running)."""
    launcher = psutil.Process(pid)
    for process in [*launcher.children(recursive=True), launcher]:
        process.send_signal(signal.SIGKILL)


def history_column(run: Path, column: str) -> list[float]:
    with (run / "history.csv").open() as f:
        return [float(row[column]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_two_processes_fit_dpg_as_one_process_and_resume_after_sigkill_bit_identically(
        targets, tmp_path) -> None:
    """Both ranks train (each checkpoints its RNG), rank 0 writes one finished folder whose loss
    curve is the one 1 process of twice the batch logs when it draws each batch as the 2 ranks
    do (`training_draws`: the Trainer seeds each rank apart, seed + 1_000_003·rank); and a run
    whose whole process group is SIGKILLed after its first checkpoint resumes to the numbers of
    the uninterrupted 2-process run."""
    options = {"steps": 30, "batch_size": 8, "eval_samples": 32, "seed": 7,
               "checkpoint_every": 2}

    def argv(run: Path, batch_size: int = options["batch_size"]) -> list[str]:
        return ["fit", f"{targets}:toy_a", "--engine", "dpg", "--output", str(run),
                "--no-progress", *flags({**options, "batch_size": batch_size})]

    whole, killed, one = tmp_path / "whole", tmp_path / "killed", tmp_path / "one"
    done = launch_fit(argv(whole))
    assert done.wait(timeout=300) == 0, done.stderr.read()[-3000:]
    final = whole / "checkpoints" / f"checkpoint-{options['steps']:08d}"
    assert {f.name for f in final.glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}
    assert json.loads((whole / "COMPLETE").read_text())["processes"] == 2

    with training_draws(options["seed"], ranks=2, distribution=PrefixTreeLM):  # Toy A's policy
        assert main(argv(one, batch_size=2 * options["batch_size"])) == 0
    # Float64 Toy A: the curves differ only by the order of the all-reduced sums.
    assert history_column(one, "loss") == pytest.approx(history_column(whole, "loss"),
                                                        rel=1e-9, abs=1e-12)

    job = launch_fit(argv(killed))
    deadline = time.time() + 300
    while not list((killed / "checkpoints").glob("checkpoint-*")) and job.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    kill_job(job.pid)
    assert job.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert not (killed / "COMPLETE").exists()
    steps = [int(c.name.split("-")[1]) for c in (killed / "checkpoints").glob("checkpoint-*")]
    assert steps and max(steps) < options["steps"]
    before = checkpointed_seconds(killed)
    resumed = launch_fit(argv(killed))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    assert history_column(killed, "seconds")[: len(before)] == before  # resumed, not restarted
    assert folder_diagnostics(killed) == folder_diagnostics(whole)
    assert history_column(killed, "loss") == history_column(whole, "loss")


CODE_TARGET = textwrap.dedent('''
    import pyro

    import bayesalign as ba
    from bayesalign.models import CausalLM, scorers

    prior = CausalLM.from_pretrained("bundled:code-small", max_new_tokens=8)


    @ba.target
    def clean_code():
        y = pyro.sample("y", prior)
        ba.reward("pep8", scorers.pep8(y), kl_coef=0.1)
''')
# P/q = exp(pep8/0.1) <= 1 (pep8 is minus violations per character): bound 1 is exact.
CODE_QUICK = {
    "rejection": {"bound": 1.0, "num_samples": 8, "chunk_size": 32, "seed": 1},
    "qrs": {"qrs_beta": 0.5, "num_samples": 8, "chunk_size": 32, "seed": 1},
    "importance": {"num_samples": 16, "seed": 2},
    "best_of_n": {"n": 2, "num_samples": 8, "seed": 2},
    "smc": {"num_particles": 8, "seed": 4},
    "dpg": {"steps": 2, "batch_size": 4, "eval_samples": 8, "seed": 3},
    "klrl": {"steps": 2, "batch_size": 4, "eval_samples": 8, "seed": 3},
}


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(CODE_QUICK))
def test_each_engine_on_the_bundled_code_prior_matches_python(engine, tmp_path_factory) -> None:
    from bayesalign.app.target_file import load_target

    path = tmp_path_factory.getbasetemp() / "code_target.py"
    if not path.exists():
        path.write_text(CODE_TARGET)
    options, run = CODE_QUICK[engine], tmp_path_factory.mktemp(engine)
    quiet = ["--no-progress"] if "steps" in options else []
    assert fit(f"{path}:clean_code", engine, run, *flags(options), *quiet) == 0
    python = engine_class(engine)(**options).fit(load_target(f"{path}:clean_code"))
    assert folder_diagnostics(run) == as_json(python.diagnostics.as_dict())
    assert (run / "COMPLETE").is_file()
