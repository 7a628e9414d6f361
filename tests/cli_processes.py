"""Commands in processes of their own that do not import the stack again.

``python -m lightning_desa2va.cli`` spends about 8 s importing torch, Lightning, transformers and MLflow
before it reads its arguments, and the tests that stop, kill and resume runs start about fifteen commands.
Each is forked instead from a :mod:`multiprocessing` fork server that imported those modules once per test
worker. It is still a process of its own (its pid, signals, exit status, standard streams, working folder and
environment) that runs the command's own ``main(argv)`` and ends as Python ends one: its atexit handlers run
and its streams are flushed. Tests of the entry point itself start Python (``test_sweep_spec``, the DDP job).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

SERVER = multiprocessing.get_context("forkserver")
SERVER.set_forkserver_preload(
    ["lightning_desa2va.cli", "lightning_desa2va.pipeline", "lightning_desa2va.tuning.sweep"]
)
POLL_S = 0.1
STARTED: list[CommandProcess] = []
"""The commands :func:`start` started, for :func:`stop_left_running`."""


class CommandProcess:
    """A started command, read as a :class:`subprocess.Popen` is (``pid``, ``poll``, ``wait``, signals),
    its standard output and error in files."""

    def __init__(self, process: BaseProcess, stdout: Path, stderr: Path) -> None:
        self.process, self.stdout, self.stderr = process, stdout, stderr

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status; minus the signal's number for a process a signal ended."""
        return self.process.exitcode

    def poll(self) -> int | None:
        return None if self.process.is_alive() else self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.is_alive():
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        """Signal the command if it still runs (its pid may be another process's once it has ended)."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it ended since the poll
                os.kill(self.pid, signum)

    def kill(self) -> None:
        self.process.kill()

    def error_lines(self) -> Iterator[str]:
        """Standard error line by line as it is written, until the process ends (a line is decoded once it
        is whole, so a character written in two parts is read as one)."""
        pending = b""
        with self.stderr.open("rb") as stream:
            while True:
                ended = self.poll() is not None  # before the read: what was written by the end is read
                pending += stream.read()
                *lines, pending = pending.split(b"\n")
                yield from (f"{line.decode()}\n" for line in lines)
                if ended:
                    yield from [pending.decode()] if pending else []
                    return
                time.sleep(POLL_S)

    def result(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Wait for the end; the exit status and both streams' text."""
        code = self.wait(timeout)
        return subprocess.CompletedProcess(
            str(self.pid), code, self.stdout.read_text(), self.stderr.read_text()
        )


def start(
    root: Path,
    function: Callable[..., Any],
    *args: Any,
    stdout: Path | None = None,
    stderr: Path | None = None,
) -> CommandProcess:
    """``function(*args)`` in a process of its own working in ``root`` with the tests' environment less the
    tracking URI (each command names its own store); its output appended to ``stdout`` and ``stderr`` (one
    file may take both; new files in ``root`` by default)."""
    stamp = time.monotonic_ns()
    stdout = stdout or root / f"stdout-{stamp}.log"
    stderr = stderr or root / f"stderr-{stamp}.log"
    for path in (stdout, stderr):
        path.touch()
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    process = SERVER.Process(target=_run, args=(function, args, root, environment, stdout, stderr))
    process.start()
    STARTED.append(CommandProcess(process, stdout, stderr))
    return STARTED[-1]


def stop_left_running() -> None:
    """Kill and reap every started command still running (a failed test's): multiprocessing would otherwise
    wait for it when the test process exits."""
    while STARTED:
        command = STARTED.pop()
        if command.poll() is None:
            command.kill()
            command.process.join()


def _run(
    function: Callable[..., Any], args: tuple, root: Path, env: dict[str, str], stdout: Path, stderr: Path
) -> None:
    """In the new process: its folder, environment and streams, then ``function`` and Python's own exit
    (atexit handlers, flushed streams, the status of ``SystemExit`` or 1 with the traceback printed)."""
    os.chdir(root)
    os.environ.clear()
    os.environ.update(env)
    for path, descriptor in ((stdout, 1), (stderr, 2)):
        with path.open("a") as stream:
            os.dup2(stream.fileno(), descriptor)
    code = 0
    try:
        function(*args)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            sys.stderr.write(f"{exit_.code}\n")
            code = 1
    except BaseException:  # as Python reports an uncaught error
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
