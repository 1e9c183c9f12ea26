"""The ``bayesalign`` command: ``demo`` compares the engines, ``info`` says what is installed,
``pretrain`` fits a GPT-2 prior to a local corpus, ``fit`` runs any engine on a declared target
into a run folder and ``show`` prints a finished run's diagnostics.

Subcommands import torch, transformers and the engines inside their functions, so parsing the
command line (``--help``, a typo) does not wait for them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# Distributions whose versions decide whether a result reproduces (PyPI names).
VERSIONED = ("bayesalign", "torch", "pyro-ppl", "transformers", "accelerate", "arviz", "datasets")


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .demo import run_demo

    # The demo's tensors are tiny: intra-op threads only add synchronisation, which costs
    # 5-20x when the cores are shared (measured on 2 cores).
    torch.set_num_threads(args.threads)
    run_demo(Path(args.output), quick=args.quick)
    print(f"Wrote figures, results.md and results.json to {args.output}")
    return 0


def versions() -> dict[str, str]:
    """The installed version of each of `VERSIONED` ("not installed" where missing)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    found = {}
    for name in VERSIONED:
        try:
            found[name] = torch.__version__ if name == "torch" else version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _info(args: argparse.Namespace) -> int:
    import torch

    from bayesalign import inference

    for name, found in versions().items():
        print(f"{name:<13} {found}")
    print(f"{'device':<13} {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"{'engines':<13} {', '.join(engine_names(inference))}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    import torch

    from bayesalign.errors import ConfigError
    from bayesalign.inference.pretraining_run import pretrain

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    options = {_ENGINE_NAMES.get(k, k): v for k, v in vars(args).items()
               if k not in ("command", "run", "threads", "argv") and v is not None}
    # The card records the command as typed, also when main() is called with an argv list.
    typed = shlex.join(["bayesalign", *args.argv])
    try:
        output = pretrain(**options, command=typed)
    except ConfigError as error:
        print(f"bayesalign pretrain: error: {error}", file=sys.stderr)
        return 2
    card = "" if args.target else ", MODEL_CARD.md, card.json"
    _print_once(f"Wrote the model, tokenizer{card}, pretraining.json and training/ to {output}")
    return 0


def _print_once(message: str) -> None:
    """Print on the main process only (``accelerate launch`` runs this command on every rank)."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(message)


# ``bayesalign pretrain`` flags whose `Pretraining` option has another name.
_ENGINE_NAMES = {"max_steps": "steps"}


def _add_objectives(add: Callable[..., object]) -> None:
    """The PHF options of ``bayesalign pretrain`` (SPEC §5)."""
    add("--objective", default="mle", choices=["mle", "filtering", "conditional", "unlikelihood",
                                               "rwr", "awr"],
        help="PHF objective; all but mle need --target (default: %(default)s)")
    add("--target", metavar="FILE.py:NAME", help="a @ba.target whose prior site is a Corpus and "
        "whose factor sites score its segments; its Corpus replaces --corpus")
    add("--threshold-quantile", type=float, default=0.5, metavar="Q",
        help="good/bad threshold at this quantile of the segment scores (default: %(default)s)")
    add("--drop-token-fraction", type=float, default=0.01, metavar="F",
        help="conditional: fraction of segments left untagged (default: %(default)s)")
    add("--conditional-decoding", default="once", choices=["once", "every_segment"],
        help="conditional: sample given <|good|> once with both tags banned (once), or ban "
        "<|bad|> only and let the model tag each segment, tags hidden (every_segment, PHF's)")
    add("--unlikelihood-mode", default="hard", choices=["hard", "soft"],
        help="unlikelihood: threshold (hard) or PHF's weight 1 + R (soft) (default: hard)")
    add("--awr-alpha", type=float, default=0.5, metavar="A",
        help="awr: policy weight, 1 - A weighs the value loss (default: %(default)s)")
    add("--awr-beta", type=float, default=1.0, metavar="B",
        help="rwr/awr: temperature on R = log L (default: %(default)s)")
    add("--score-cache", metavar="FILE", help="SQLite cache of segment scores (default: "
        "OUTPUT/training/data/scores.sqlite)")


def _add_pretrain(commands: argparse._SubParsersAction) -> None:
    pretrain = commands.add_parser(
        "pretrain", help="the Pretraining engine: a GPT-2 on a local corpus (default: Python's "
        "stdlib) by MLE, or any PHF objective on a --target",
        description="Train a byte-level BPE and a GPT-2 on a local corpus, hold out files, "
        "checkpoint and resume exactly, and write a folder CausalLM.from_pretrained loads "
        "with MODEL_CARD.md and card.json: the Pretraining engine with objective mle on the "
        "corpus, or any PHF objective on a --target. Unset sizes come from --preset. Several "
        "processes: "
        "accelerate launch --config_file configs/accelerate/{ddp,fsdp,deepspeed}.yaml -m "
        "bayesalign pretrain ... (data parallel, FSDP2, DeepSpeed ZeRO-2).",
    )
    add = pretrain.add_argument
    add("--corpus", metavar="PATH", help=".py/.txt/.json/.jsonl files, a folder of them, or a "
        "dataset saved with save_to_disk (default: this Python's standard library, no tests)")
    add("--output", default="outputs/pretrain", metavar="DIR",
        help="folder for the model, its card and training/ (default: %(default)s)")
    add("--preset", default="tiny", choices=["tiny", "code-small"],
        help="model size: tiny = 2 layers x 64, vocab 512; code-small = 4 x 256, vocab 2048")
    add("--max-steps", type=int, default=300, metavar="N",
        help="optimizer steps in all (default: %(default)s)")
    add("--seed", type=int, default=0, help="model init, split, block order (default: 0)")
    add("--batch-size", type=int, metavar="N",
        help="blocks per micro-batch and process (default: the preset's)")
    add("--gradient-accumulation-steps", type=int, default=1, metavar="N",
        help="micro-batches per step; global batch = N x batch size x processes (default: 1)")
    add("--mixed-precision", choices=["no", "bf16", "fp16"],
        help="autocast precision, bf16 on GPU (default: accelerate launch's setting, else no)")
    add("--block-size", type=int, metavar="N",
        help="tokens per block = the model's context (default: the preset's)")
    add("--learning-rate", type=float, metavar="LR", help="peak Adam rate (default: the preset's)")
    add("--warmup-steps", type=int, metavar="N", help="linear learning-rate warm-up (default: "
        "the preset's without --target, 0 with one)")
    add("--lr-decay-steps", type=int, metavar="N",
        help="cosine decay to 10%% by step N (default: constant after warm-up)")
    add("--heldout-fraction", type=float, default=0.05, metavar="F",
        help="fraction of --corpus files held out (default: %(default)s)")
    add("--checkpoint-every", type=int, default=100, metavar="N",
        help="steps between checkpoints (default: %(default)s)")
    add("--eval-every", type=int, default=50, metavar="N",
        help="steps between held-out evaluations (default: %(default)s)")
    add("--eval-samples", "--num-samples", type=int, default=64, metavar="N", dest="eval_samples",
        help="samples for the diagnostics and the card's parse rate; --num-samples is its old "
        "name (default: %(default)s)")
    add("--max-new-tokens", type=int, metavar="N", help="tokens per sample (default: the block "
        "size; 2 fewer for conditional's prompt)")
    add("--progress", action=argparse.BooleanOptionalAction, default=True,
        help="a progress bar and a line per held-out evaluation (default: on)")
    add("--threads", type=int, metavar="N", help="torch intra-op threads (default: torch's; "
        "1 is often faster on cores shared with other jobs)")
    add("--resume", action=argparse.BooleanOptionalAction, default=True,
        help="continue from checkpoints in --output (default); --no-resume discards them")
    add("--log-with", metavar="TRACKER", help="send the history to an accelerate tracker "
        "(tensorboard, wandb, mlflow, ...; default: none)")
    add("--tracker-dir", metavar="DIR", help="where file-based trackers write (default: "
        "OUTPUT/training/checkpoints/trackers)")
    _add_objectives(add)
    pretrain.set_defaults(run=_pretrain)


def _fit(args: argparse.Namespace) -> int:
    from .fit import main as fit_main

    return fit_main(args.arguments)


def _show(args: argparse.Namespace) -> int:
    from .fit import show_main

    return show_main(args.folder)


def _add_fit_and_show(commands: argparse._SubParsersAction) -> None:
    # fit's options depend on --engine: its own parser (bayesalign.app.fit) reads them all.
    fit = commands.add_parser(
        "fit", add_help=False,
        help="run an engine on a target declared in a Python file and write a run folder "
        "(bayesalign fit --engine NAME --help lists the engine's options)")
    fit.set_defaults(run=_fit)
    show = commands.add_parser("show", help="print the diagnostics table of a finished run")
    show.add_argument("folder", metavar="DIR", help="a folder written by bayesalign fit")
    show.set_defaults(run=_show)


def engine_names(module: object) -> list[str]:
    """Public classes of ``module`` with a ``fit`` method, i.e. its inference engines."""
    names = []
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name)
        is_protocol = getattr(obj, "_is_protocol", False)
        if isinstance(obj, type) and hasattr(obj, "fit") and not is_protocol:
            names.append(name)
    return sorted(names)


LAYOUT = """library layout (README.md, docs/):
  bayesalign            modelling core: targets, likelihood helpers, Sequences, Posterior,
                        diagnostics, evaluate, errors
  bayesalign.models     priors (TabularLM, CausalLM, Corpus), adaptors, scorers, preference models
  bayesalign.inference  engines: Exact, Rejection, QRS, Importance, BestOfN, SMC, DPG, KLRL,
                        Pretraining, fit_moments
  bayesalign.training   the training loop, checkpoints, launch strategies (DDP, FSDP, ZeRO)
  bayesalign.app        this command, the demo, plots"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayesalign",
        description="Align language models with preferences as Bayesian inference.",
        epilog=LAYOUT, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="run every sampling engine on Toy A and a tiny GPT-2; write tables and plots"
    )
    demo.add_argument("--output", default="outputs/demo", metavar="DIR",
                      help="folder for PNGs, results.md and results.json (default: %(default)s)")
    demo.add_argument("--quick", action="store_true",
                      help="fewer samples: about 30 s instead of about 2 minutes")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch intra-op threads (default 1: the demo's models are tiny)")
    demo.set_defaults(run=_demo)
    info = commands.add_parser(
        "info", help="print library versions, the torch device and the available engines"
    )
    info.set_defaults(run=_info)
    _add_pretrain(commands)
    _add_fit_and_show(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bayesalign`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "fit":
        args.arguments = argv[argv.index("fit") + 1:]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
