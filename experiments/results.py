"""An experiment's results as JSON: written atomically, read back by name, rendered as Markdown.

Each experiment writes ``results.json`` (named fields, the numbers its table shows) and renders
its Markdown table from that file's contents, so the table and the JSON cannot disagree. A run
that writes as it goes (after every engine, every kl_coef…) marks its file ``"finished": false``
until the last write; each write goes to a temporary file first and is renamed over the old one,
so a reader never sees half a file. `publish` is every experiment's ending: the JSON, then the
Markdown and the PNG drawn from what the JSON holds. Non-finite floats are stored as the strings
``"nan"``, ``"inf"``, ``"-inf"`` (standard JSON has no NaN; the demo's results.json does the
same) and read back as floats.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = "results.json"
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_results(output: Path, experiment: str, finished: bool, results: dict[str, Any]
                  ) -> dict[str, Any]:
    """Write ``output/results.json`` atomically and return its contents as read back."""
    document = {"experiment": experiment, "finished": finished, **results}
    text = json.dumps(_jsonable(document), indent=1, ensure_ascii=False)
    write_text_atomic(Path(output) / RESULTS, text + "\n")
    return _restore(json.loads(text))


def publish(output: Path, experiment: str, results: dict[str, Any], finished: bool,
            render: Callable[[dict[str, Any]], str],
            plot: Callable[[dict[str, Any], Path], object] | None = None, *,
            plot_partial: bool = False) -> tuple[dict[str, Any], str]:
    """Write ``results.json``, then ``{experiment}.md`` rendered and ``{experiment}.png`` plotted
    from its contents as read back, so neither can disagree with the JSON; return both.

    The plot is drawn once the run is ``finished`` (or on every call with ``plot_partial``, for
    a run whose curves are worth seeing while it goes).
    """
    output = Path(output)
    saved = write_results(output, experiment, finished, results)
    report = render(saved)
    write_text_atomic(output / f"{experiment}.md", report + "\n")
    if plot is not None and (finished or plot_partial):
        plot(saved, output / f"{experiment}.png")
    return saved, report


def read_results(output: Path) -> dict[str, Any]:
    """The contents of ``output/results.json``, non-finite floats restored."""
    return _restore(json.loads((Path(output) / RESULTS).read_text(encoding="utf-8")))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # a tensor or an array
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _restore(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v) for v in value]
    if isinstance(value, str) and value in NON_FINITE:
        return NON_FINITE[value]
    return value
