"""`Scorer`: any per-text function as a batched scorer that survives any text a model writes.

Safety: a `Scorer` runs its per-text function in worker processes and kills one whose sample
takes longer than ``timeout`` seconds, because pycodestyle and ``ast`` cannot be interrupted from
the thread that runs them. It scores at most ``max_chars`` characters of each text, and a sample
that times out or fails gets the scorer's ``worst`` value or raises a `ScorerError` naming its
index. The built-in scorers give a failed sample the worst score, never a perfect one, so a policy
cannot earn reward by crashing the scorer. Workers are forked (on Linux) on first use and reused;
small batches go to one worker, batches of ``parallel_threshold`` or more are spread over
``workers`` processes.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from typing import Any, Literal

import torch

from bayesalign.errors import ConfigError, ScorerError, ScorerTimeoutError
from bayesalign.sequences import Sequences

Texts = Sequences | Sequence[str] | str
Policy = Literal["worst", "raise"]

# A worker costs ~0.05 ms per batch and ~11 µs per sample over scoring in place; fanning out
# costs no more and pays when cores are free. On 2 shared cores, 1000 pep8 samples of ~260 chars:
# 688 ms in place, 730 ms in one worker, 559 ms in two; under 64 samples (< 50 ms) gains were noise.
PARALLEL_THRESHOLD = 64


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _serve(fn: Callable[[str], Any], setup: Callable[[], Any] | None, conn: Any, parent: int) -> None:
    """A worker's loop: receive a list of texts, send back one ``(status, value)`` per text."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's; it kills its workers
    if setup is not None:
        setup()
    conn.send("ready")
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent:  # orphaned: the parent died without killing us
                return
            continue
        try:
            texts = conn.recv()
        except EOFError:
            return
        for text in texts:
            try:
                conn.send(("ok", fn(text)))
            except Exception as e:
                conn.send(("error", f"{type(e).__name__}: {e}"))


class _Worker:
    """One process serving a scorer's function, with the samples it owes answers for."""

    def __init__(self, fn: Callable[[str], Any], setup: Callable[[], Any] | None, name: str) -> None:
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(fn, setup, child, os.getpid()), daemon=True, name=f"scorer-{name}"
        )
        self.process.start()
        self.owner = os.getpid()
        child.close()
        self.owed: deque[int] = deque()
        self.deadline = math.inf
        if not self.conn.poll(120.0) or self._recv_or_none() != "ready":
            self.kill()
            raise ScorerError(f"scorer '{name}': a worker process failed to start (its setup raised?)")

    def _recv_or_none(self) -> Any:
        try:
            return self.conn.recv()
        except EOFError:
            return None

    def kill(self) -> None:
        if self.owner != os.getpid():  # inherited through a fork of our process: not ours to stop
            return
        self.process.kill()
        self.process.join()
        self.conn.close()


def _kill_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.kill()
    workers.clear()


class Scorer:
    """A batched scorer ``texts → Tensor[batch]`` from a per-text function ``str → number``.

    ``Scorer(fn, worst=0.0)(y)`` scores a `Sequences` (its decoded ``.text``), a list of str or
    one str. Options:

    - ``timeout``: seconds one sample may take in a worker; ``None`` scores in the calling
      process, with no time bound and no isolation (fastest; for trusted functions and texts).
    - ``on_timeout`` / ``on_error``: ``"raise"`` a `ScorerTimeoutError` / `ScorerError` naming
      the first failing sample, or give it ``"worst"``. An error is an exception in ``fn``, a
      value that is not a number or is NaN, or a worker that died (e.g. killed for memory).
    - ``worst``: the value of a failed sample; a number, or a function of its (truncated) text.
    - ``max_chars``: only the first ``max_chars`` characters of each text are scored.
    - ``workers`` / ``parallel_threshold``: a batch of at least ``parallel_threshold`` samples is
      spread over ``workers`` processes (default: the usable CPUs); smaller ones use one worker.
    - ``setup``: called once before the first sample (in this process, so forked workers inherit
      what it builds, e.g. scrubadub's scrubber).
    - ``dtype``: of the returned tensor (values are cast); returned on the `Sequences`' device.

    Off Linux, workers are spawned, so ``fn`` and ``setup`` must be picklable (module-level).
    """

    def __init__(
        self,
        fn: Callable[[str], Any],
        *,
        name: str | None = None,
        worst: Any = None,
        timeout: float | None = 2.0,
        on_timeout: Policy = "raise",
        on_error: Policy = "raise",
        max_chars: int = 20_000,
        workers: int | None = None,
        parallel_threshold: int = PARALLEL_THRESHOLD,
        setup: Callable[[], Any] | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.fn, self.setup, self.dtype, self.worst = fn, setup, dtype, worst
        self.name = name or getattr(fn, "__name__", "scorer")
        for option, policy in (("on_timeout", on_timeout), ("on_error", on_error)):
            if policy not in ("worst", "raise"):
                raise ConfigError(f"scorer '{self.name}': {option}={policy!r}; use 'worst' or 'raise'")
            if policy == "worst" and worst is None:
                raise ConfigError(f"scorer '{self.name}': {option}='worst' needs a worst= value")
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"scorer '{self.name}': timeout must be > 0 seconds or None, got {timeout}")
        if max_chars < 1 or parallel_threshold < 1 or (workers is not None and workers < 1):
            raise ConfigError(f"scorer '{self.name}': max_chars, workers and parallel_threshold must be >= 1")
        self.timeout, self.on_timeout, self.on_error = timeout, on_timeout, on_error
        self.max_chars, self.parallel_threshold = max_chars, parallel_threshold
        self.workers = workers or _usable_cpus()
        self._pool: list[_Worker] = []
        self._lock = threading.Lock()
        self._set_up = False
        weakref.finalize(self, _kill_all, self._pool)

    def __call__(self, texts: Texts) -> torch.Tensor:
        batch = self.prepare(texts)
        with self._lock:
            results = self._score_here(batch) if self.timeout is None else self._score_in_workers(batch)
        values = [self._value(i, text, *result) for i, (text, result) in enumerate(zip(batch, results))]
        device = texts.device if isinstance(texts, Sequences) else None
        return torch.tensor(values, dtype=self.dtype, device=device)

    def prepare(self, texts: Texts) -> list[str]:
        """The texts this scorer scores: decoded, listed, each cut to ``max_chars`` characters."""
        if isinstance(texts, str):
            texts = [texts]
        elif isinstance(texts, Sequences):
            try:
                texts = texts.text
            except AttributeError as e:
                raise ScorerError(
                    f"scorer '{self.name}': {e}; build the Sequences with decoder= (e.g. a tokenizer's "
                    "batch_decode) or pass a list of str"
                ) from e
        batch = list(texts)
        for i, text in enumerate(batch):
            if not isinstance(text, str):
                raise ScorerError(f"scorer '{self.name}': sample {i} is a {type(text).__name__}, not a str")
        return [text[: self.max_chars] for text in batch]

    def close(self) -> None:
        """Stop this scorer's worker processes (a later call starts new ones)."""
        with self._lock:
            _kill_all(self._pool)

    def _ensure_setup(self) -> None:
        if self.setup is not None and not self._set_up:
            self.setup()
        self._set_up = True

    def _score_here(self, batch: list[str]) -> list[tuple[str, Any]]:
        self._ensure_setup()
        results = []
        for text in batch:
            try:
                results.append(("ok", self.fn(text)))
            except Exception as e:
                results.append(("error", f"{type(e).__name__}: {e}"))
        return results

    def _score_in_workers(self, batch: list[str]) -> list[tuple[str, Any]]:
        """Stream the batch through the workers; kill and replace one whose sample overruns."""
        self._ensure_setup()
        if not batch:
            return []
        n_workers = min(self.workers if len(batch) >= self.parallel_threshold else 1, len(batch))
        pool = self._pool
        for i, worker in enumerate(pool):
            if worker.owner != os.getpid() or not worker.process.is_alive():
                worker.kill()
                pool[i] = _Worker(self.fn, self.setup, self.name)
        pool.extend(_Worker(self.fn, self.setup, self.name) for _ in range(n_workers - len(pool)))
        active = pool[:n_workers]
        # Chunks small enough to balance the load, large enough to amortise a pipe round trip.
        chunk = max(1, min(64, math.ceil(len(batch) / (4 * n_workers))))
        pending = deque(range(len(batch)))
        results: list[tuple[str, Any]] = [("error", "not scored")] * len(batch)
        finished = False
        try:
            while pending or any(w.owed for w in active):
                for worker in active:
                    if not worker.owed and pending:
                        take = [pending.popleft() for _ in range(min(chunk, len(pending)))]
                        worker.owed.extend(take)
                        worker.deadline = time.monotonic() + self.timeout
                        with contextlib.suppress(OSError):  # a dead worker shows up in wait() below
                            worker.conn.send([batch[i] for i in take])
                busy = [w for w in active if w.owed]
                soonest = min(w.deadline for w in busy)
                ready = wait([w.conn for w in busy], timeout=max(0.0, soonest - time.monotonic()))
                for k, worker in enumerate(active):
                    if not worker.owed:
                        continue
                    if worker.conn in ready:
                        answer = None
                        while worker.owed and worker.conn.poll():  # drain: one wait() per burst
                            answer = worker._recv_or_none()
                            if answer is None:
                                break
                            results[worker.owed.popleft()] = answer
                        worker.deadline = time.monotonic() + self.timeout
                        if answer is not None:
                            continue
                        worker.process.join(1.0)
                        failure = ("error", f"its worker process died (exit code {worker.process.exitcode})")
                    elif time.monotonic() >= worker.deadline:
                        failure = ("timeout", None)
                    else:
                        continue
                    results[worker.owed.popleft()] = failure
                    pending.extendleft(reversed(worker.owed))
                    worker.kill()
                    active[k] = pool[k] = _Worker(self.fn, self.setup, self.name)
            finished = True
        finally:
            if not finished:  # interrupted: workers still owe answers that would garble the next call
                _kill_all(pool)
        return results

    def _value(self, index: int, text: str, status: str, value: Any) -> Any:
        if status == "ok":
            try:
                number = float(value)
            except (TypeError, ValueError):
                status, value = "error", f"it returned {type(value).__name__} {value!r:.60}, not a number"
            else:
                if not math.isnan(number):
                    return number
                status, value = "error", "it returned NaN"
        policy = self.on_timeout if status == "timeout" else self.on_error
        if policy == "worst":
            return self.worst(text) if callable(self.worst) else self.worst
        if status == "timeout":
            raise ScorerTimeoutError(
                f"scorer '{self.name}': sample {index} ({text[:40]!r}...) took longer than timeout="
                f"{self.timeout} s; raise timeout, lower max_chars (now {self.max_chars}) or pass "
                "on_timeout='worst' with a worst= value"
            )
        raise ScorerError(
            f"scorer '{self.name}': sample {index} ({text[:40]!r}...): {value}; fix the function or "
            "pass on_error='worst' with a worst= value"
        )


class PerCharacterPenalty:
    """``R = −count/characters`` from a count scorer: PHF's PEP8 and PII metrics, negated (SPEC §5).

    Characters are those scored (after ``max_chars``), at least 1, so empty text scores 0. A
    count scorer whose ``worst`` is ``len`` makes a failed sample score −1: one violation per
    character, below any real code or prose we measured.
    """

    def __init__(self, counter: Scorer) -> None:
        self.counter = counter

    def __call__(self, texts: Texts) -> torch.Tensor:
        batch = self.counter.prepare(texts)
        chars = torch.tensor([max(len(text), 1) for text in batch], dtype=torch.float64)
        reward = 0.0 - self.counter(batch).to(torch.float64) / chars  # 0.0 - x: no −0.0 for clean text
        return reward.to(texts.device) if isinstance(texts, Sequences) else reward

    def counts(self, texts: Texts) -> list[int]:
        """The raw counts (violations, detections) per sample."""
        return [int(c) for c in self.counter(texts).tolist()]


