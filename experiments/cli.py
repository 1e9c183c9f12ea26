"""The one command line every experiment shares: ``--output DIR`` and ``--quick``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def experiment_main(
    run: Callable[[Path, bool], str], description: str, default_output: str,
    argv: list[str] | None = None,
) -> int:
    """Parse the shared options, run the experiment, print its Markdown report."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output", type=Path, default=Path(default_output),
                        help="folder for the Markdown table and the PNG")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, as run by the tests")
    args = parser.parse_args(argv)
    print(run(args.output, args.quick))
    return 0
