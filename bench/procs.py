"""Start and stop benchmark servers as fresh subprocesses, pinned with ``taskset``.

A server is started as ``taskset -c CPU python -m ...`` (taskset execs, so the PID is the
server's own), its stdout and stderr go to one log file, and ``start_server`` waits for the
line that says it is serving (``AIOS kernel ready on HOST:PORT`` / ``listening on HOST:PORT``)
and reads the bound port from it, so ``--port 0`` can be used with no race for a free port.
``ServerProc.stop()`` sends SIGTERM to that PID only, waits, and kills it only if it hangs.

``ServerProc.cpu_seconds()`` reads user+system CPU time of the process (all its threads)
from ``/proc/PID/stat``; the difference across a measurement gives the server's CPU use.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

READY_KERNEL = re.compile(r"AIOS kernel ready on (\S+):(\d+)")
READY_NAIVE = re.compile(r"listening on (\S+):(\d+)")
ERROR_LINE = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b|Segmentation|core dumped|Fatal", re.I)

_CLK_TCK = os.sysconf("SC_CLK_TCK")


class ServerStartError(RuntimeError):
    pass


class ServerProc:
    """One running server process; ``port`` is the port it reported when ready."""

    def __init__(self, name: str, proc: subprocess.Popen, log_path: Path, host: str, port: int, command: list[str]):
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.host = host
        self.port = port
        self.command = command

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds used so far by the process (None once it is gone)."""
        try:
            text = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return None
        fields = text[text.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def error_lines(self, limit: int = 40) -> list[str]:
        """Log lines that look like errors (tracebacks, ERROR records, crashes)."""
        lines = [line for line in self.log_text().splitlines() if ERROR_LINE.search(line)]
        return lines[:limit]

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM this server, wait up to ``timeout`` s, then SIGKILL it; return its exit status."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def taskset_prefix(cpu: str | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def start_server(
    name: str,
    argv: Sequence[str],
    ready: re.Pattern,
    log_path: Path,
    *,
    cpu: str | None = "0",
    timeout: float = 60.0,
    env: dict | None = None,
    cwd: str | os.PathLike | None = None,
) -> ServerProc:
    """Start ``argv`` (pinned to ``cpu``), wait for the ``ready`` line (groups: host, port).

    Raises ``ServerStartError`` with the log's tail if it exits or does not get ready in time.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = taskset_prefix(cpu) + [str(a) for a in argv]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd)
    deadline = time.monotonic() + timeout
    try:
        while True:
            text = log_path.read_text(errors="replace")
            match = ready.search(text)
            if match:
                return ServerProc(name, proc, log_path, match.group(1), int(match.group(2)), command)
            if proc.poll() is not None:
                tail = "\n".join(text.strip().splitlines()[-15:])
                raise ServerStartError(f"{name} exited with status {proc.returncode} before it was ready:\n{tail}")
            if time.monotonic() > deadline:
                tail = "\n".join(text.strip().splitlines()[-15:])
                raise ServerStartError(f"{name} not ready after {timeout:.0f} s:\n{tail}")
            time.sleep(0.05)
    except BaseException:  # not ready, or we are interrupted: leave no server behind
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise


def python() -> str:
    """The interpreter running this script (the project's virtualenv when started from it)."""
    return sys.executable


def run_main(name: str, main) -> int:
    """Run a benchmark's ``main()``; Ctrl-C/SIGINT exits 130 with one line (servers are stopped by ``main``)."""
    try:
        return main()
    except KeyboardInterrupt as exc:
        print(f"{name}: interrupted ({exc or 'SIGINT'}); servers stopped, no results written", file=sys.stderr)
        return 130
