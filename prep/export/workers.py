"""Worker processes for the export: independent tasks (readiness chunks, whole shards) run in parallel.

`WorkerPool(n)` runs tasks in `n` worker processes, or in this process when `n` is 1. On
Linux the workers are forked: fast, and the caller's script is never re-imported (with
"spawn" an unguarded script would run again in every worker). A forked child of a threaded
process can only deadlock on a lock another thread held; the workers run nothing but this
package's code, which takes no such lock (no logging, printing or importing in the
workers). Elsewhere they are spawned: call the export under `if __name__ == "__main__":`.

At most a few tasks are in flight, so memory stays flat however many there are; results
come back as they complete, tagged, and the caller puts them in order. Workers die with their parent (Linux: PR_SET_PDEATHSIG), so a
SIGKILLed export leaves no orphan writing on; a worker that dies (killed, out of memory)
fails the export with a one-line error, and the other workers are stopped. Either way a
shard is only ever renamed to its final name when complete: what a crash leaves is temp
files, which the next run sweeps.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

MAX_DEFAULT_WORKERS = 8
_PR_SET_PDEATHSIG = 1
# token -> a pool's `shared` object, in this process and (inherited) in its forked workers;
# one entry per open pool, so two exports in one process never read each other's manifest
_SHARED: dict[int, Any] = {}
_TOKENS = itertools.count(1)


def shared(token: int) -> Any:
    """The `shared` object of the WorkerPool whose `token` this task carries (the manifest, for the export)."""
    try:
        return _SHARED[token]
    except KeyError:
        raise RuntimeError("no shared object here: this task needs its records sent with it") from None


def default_workers() -> int:
    """The CPUs this process may run on, at most MAX_DEFAULT_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_WORKERS))


def start_method() -> str:
    """"fork" on Linux (see the module doc), else "spawn"."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def _init_worker(parent: int) -> None:
    """In each worker: die with the parent, leave Ctrl-C to the parent (which stops the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


class WorkerPool:
    """`with WorkerPool(n, shared) as pool: for tag, result in pool.imap(fn, jobs): ...`

    `shared`: an object the tasks reach with `shared(pool.token)` instead of receiving it (the
    manifest: tasks then carry row numbers, not records); available when `shares_memory`. `auto`: the
    number of workers is a default, not the caller's choice (callers may then keep small jobs
    in this process with `inline`).
    """

    def __init__(self, num_workers: int, shared: Any = None, *, auto: bool = False):
        if num_workers < 1:
            raise ValueError(f"--num-workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.shared = shared
        self.token = next(_TOKENS)
        self.auto = auto  # the number was not chosen by the caller: small jobs may stay in this process
        self._executor: ProcessPoolExecutor | None = None

    @property
    def parallel(self) -> bool:
        return self.num_workers > 1

    @property
    def shares_memory(self) -> bool:
        """True when tasks can use `shared(token)`: in this process, or in workers forked from it."""
        return self.shared is not None and (not self.parallel or start_method() == "fork")

    def __enter__(self) -> WorkerPool:
        if self.shared is not None:
            _SHARED[self.token] = self.shared  # before any worker is forked
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def _start(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self.num_workers,
                mp_context=multiprocessing.get_context(start_method()),
                initializer=_init_worker,
                initargs=(os.getpid(),),
            )
        return self._executor

    def close(self, *, failed: bool = False) -> None:
        """Wait for the workers; after a failure, stop them first (their temp files stay for the sweep)."""
        _SHARED.pop(self.token, None)
        executor, self._executor = self._executor, None
        if executor is None:
            return
        if failed:
            for process in list((getattr(executor, "_processes", None) or {}).values()):
                with contextlib.suppress(OSError, AttributeError):
                    process.terminate()
        executor.shutdown(wait=True, cancel_futures=True)

    def imap(
        self, fn: Callable[..., Any], jobs: Iterable[tuple[Any, tuple]], *, in_flight: int = 0, inline: bool = False
    ) -> Iterator:
        """(tag, fn(*args)) for each (tag, args) of `jobs`, in completion order.

        Jobs are drawn lazily: at most `in_flight` (default twice the workers) are submitted
        at a time. In-process (one worker, or `inline`) each job runs when drawn.
        """
        if inline or not self.parallel:
            for tag, args in jobs:
                yield tag, fn(*args)
            return
        executor = self._start()
        limit = in_flight or 2 * self.num_workers
        pending: dict[Future, Any] = {}
        jobs = iter(jobs)
        more = True
        while more or pending:
            while more and len(pending) < limit:
                job = next(jobs, None)
                if job is None:
                    more = False
                else:
                    pending[executor.submit(fn, *job[1])] = job[0]
            if pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield pending.pop(future), _result(future)


def _result(future: Future) -> Any:
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise RuntimeError(
            "an export worker process died (killed, or out of memory); complete shards are kept, "
            "rerun with --resume to finish"
        ) from exc
