"""The ``bayesalign`` command: ``demo`` compares the engines, ``info`` says what is installed.

Subcommands import torch, transformers and the engines inside their functions, so parsing the
command line (``--help``, a typo) does not wait for them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
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


def _info(args: argparse.Namespace) -> int:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from . import inference

    for name in VERSIONED:
        try:
            found = torch.__version__ if name == "torch" else version(name)
        except PackageNotFoundError:
            found = "not installed"
        print(f"{name:<13} {found}")
    print(f"{'device':<13} {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"{'engines':<13} {', '.join(engine_names(inference))}")
    return 0


def engine_names(module: object) -> list[str]:
    """Public classes of ``module`` with a ``fit`` method, i.e. its inference engines."""
    names = []
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name)
        is_protocol = getattr(obj, "_is_protocol", False)
        if isinstance(obj, type) and hasattr(obj, "fit") and not is_protocol:
            names.append(name)
    return sorted(names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayesalign",
        description="Align language models with preferences as Bayesian inference.",
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bayesalign`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
