"""Executors on this machine: in this process, or one task at a time in a contained worker process."""
from __future__ import annotations

import multiprocessing
import signal
import time
import warnings
from multiprocessing.connection import Connection
from typing import Any, Callable

from oodbench.api import Executor, TaskFailed

#: Default ``--task-timeout`` of the local executor, seconds: longer than any task of the papers' settings on one
#: GPU (training a DenseNet on CIFAR takes hours and is one task), short enough that a hung plugin ends.
DEFAULT_TASK_TIMEOUT = 24 * 3600.0


class InlineExecutor(Executor):
    """Every task in this process, one after another: no isolation, for debuggers and notebooks.

    A plugin that calls ``os._exit``, crashes the interpreter or hangs takes the run with it;
    use ``local`` (the default) for that. Ignores ``--workers``, ``--scheduler``, ``--task-timeout``;
    ``--threads`` holds while the tasks run.
    """

    name = "inline"

    def run(self, tasks: list[Any], done: Callable[[Any, Any], None]) -> None:
        import torch

        results: dict[str, Any] = {}
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            for task in tasks:
                if not all(d in results for d in task.deps):
                    continue
                # Exceptions propagate: in-process there is no worker to blame, and a traceback is what a debugger
                # wants.
                results[task.key] = task.fn(*task.args, *(results[d] for d in task.deps))
                done(task, results[task.key])
        finally:
            torch.set_num_threads(before)


class LocalExecutor(Executor):
    """Tasks one after another in a worker process: a plugin that crashes, exits or hangs costs its own task.

    The worker (started once per run, from a fork server that has oodbench imported) runs
    each task within ``--task-timeout`` seconds (default 24 h); if the worker dies (a
    segfault, ``os._exit``) or runs past the limit, it is stopped, the task is reported
    failed with the reason, and a fresh worker takes the next task. Ctrl-C stops the run
    (the worker ignores SIGINT, so a plugin's own ``KeyboardInterrupt`` is just its failure).
    Ignores ``--workers`` and ``--scheduler``.
    """

    name = "local"

    def run(self, tasks: list[Any], done: Callable[[Any, Any], None]) -> None:
        timeout = DEFAULT_TASK_TIMEOUT if self.task_timeout is None else self.task_timeout
        results: dict[str, Any] = {}
        worker: _Worker | None = None
        try:
            for task in tasks:
                if not all(d in results for d in task.deps):
                    continue  # a dependency failed: the driver reports it
                worker = worker or _Worker(self.threads)
                try:
                    results[task.key] = worker.call(task.fn, (*task.args, *(results[d] for d in task.deps)), timeout)
                except TaskFailed as failure:
                    if not worker.alive:
                        worker = None
                    done(task, failure)
                else:
                    done(task, results[task.key])
        finally:
            if worker is not None:
                worker.stop()


def _context() -> multiprocessing.context.BaseContext:
    # A fork server with oodbench (and torch) imported starts workers in milliseconds, and unlike a plain fork it
    # never copies a process whose thread pools (OpenMP, CUDA) are already running.
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["oodbench.tasks"])
        return context
    return multiprocessing.get_context("spawn")


class _Worker:
    """One worker process, fed tasks over a pipe."""

    def __init__(self, threads: int | None):
        context = _context()
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, threads), daemon=True, name="oodbench-worker")
        self.process.start()
        child.close()

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float) -> Any:
        try:
            self.conn.send((fn, args))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            self.stop()
            raise TaskFailed(self._death()) from None
        deadline = time.monotonic() + timeout if timeout > 0 else None
        while True:
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            if self.conn.poll(wait):
                try:
                    status, value = self.conn.recv()
                except (EOFError, ConnectionResetError, OSError):
                    self.process.join(5)
                    self.stop()
                    raise TaskFailed(self._death()) from None
                if status == "ok":
                    return value
                raise TaskFailed(value)
            if not self.process.is_alive():
                raise TaskFailed(self._death())
            if deadline is not None and time.monotonic() >= deadline:
                self.stop()
                raise TaskFailed(f"ran past --task-timeout {timeout:g} s and was stopped")

    def _death(self) -> str:
        code = self.process.exitcode
        if code is not None and code < 0:
            try:
                return f"the worker process died of {signal.Signals(-code).name}"
            except ValueError:
                return f"the worker process died of signal {-code}"
        return f"the worker process exited with status {code}" if code is not None else "the worker process died"

    def stop(self) -> None:
        try:
            if self.process.is_alive():
                self.conn.send(None)
                self.process.join(2)
        except OSError:
            pass
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _serve(conn: Connection, threads: int | None) -> None:
    """The worker's loop: run what arrives, send back ("ok", value) or ("error", why)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: it stops this worker
    warnings.formatwarning = lambda message, category, *rest, **kw: f"oodbench: {message}\n"
    if threads:
        import torch

        torch.set_num_threads(threads)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        fn, args = message
        try:
            reply = ("ok", fn(*args))
        except BaseException as exc:  # noqa: B036 - sys.exit, KeyboardInterrupt from a plugin: its task's failure
            reply = ("error", describe_failure(exc))
        try:
            conn.send(reply)
        except Exception as exc:  # an unpicklable result
            conn.send(("error", f"the task's result could not be sent back: {type(exc).__name__}: {exc}"))


def describe_failure(exc: BaseException) -> str:
    """One line naming what escaped the task (its rows' ``error`` text, so no paths or line numbers)."""
    if isinstance(exc, SystemExit):
        return f"the task called sys.exit({exc.code!r})"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
