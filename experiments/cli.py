"""The one command line every experiment shares: ``--output DIR``, ``--quick``, ``--threads``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch


def experiment_main(
    run: Callable[[Path, bool], str], description: str, default_output: str,
    argv: list[str] | None = None,
) -> int:
    """Parse the shared options, run the experiment, print its Markdown report."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output", type=Path, default=Path(default_output),
                        help="folder for results.json, the Markdown table rendered from it and the PNG")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, as run by the tests")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (small models run fastest on one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(run(args.output, args.quick))
    return 0
