"""``aios-kernel serve`` as a child process, for tests that signal, kill and restart a real kernel."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from .scratch import scratch_dir

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "kernel"]


_LIVE: "set[ServeProcess]" = set()
_cleanup = []  # holds the atexit registration once made


def _kill_leftovers() -> None:
    """At the test process's exit, kill every child kernel still running: a test that failed (or was interrupted)
    before its stop() left it serving, re-parented to init, holding its port and data dir (test-suite audit)."""
    for server in list(_LIVE):
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=30)


class ServeProcess:
    """Starts ``aios-kernel serve`` on a free port and waits for its ready line.

    The data directory (audit log, keys, task/review store) is a fresh
    scratch folder (removed when the test process exits) unless ``data_dir`` is given; a restart
    passes the same folder again. ``cli``: the command that takes ``serve`` and its arguments (a test's
    wrapper that injects a fault into the kernel before running its command line), ``aios-kernel`` unless given.
    """

    def __init__(self, models: Path, *extra: str, data_dir: str | Path | None = None, env: dict | None = None,
                 cli: list[str] | None = None):
        self.data_dir = Path(data_dir) if data_dir is not None else scratch_dir()
        self.proc = subprocess.Popen(
            [*(cli or CLI), "serve", "--models", str(models), "--port", "0", "--data-dir", str(self.data_dir), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
        )
        if not _cleanup:  # (registered late: atexit then runs it before the scratch folders' removal, made earlier)
            _cleanup.append(atexit.register(_kill_leftovers))
        _LIVE.add(self)
        line = self.proc.stdout.readline()
        if "ready on" not in line:
            self.proc.kill()
            raise AssertionError(f"kernel did not start: {line!r} {self.proc.stderr.read()}")
        self.address = line.strip().rsplit(" ", 1)[-1]

    def stop(self, timeout=30) -> tuple[int, str]:
        """SIGTERM (graceful drain); returns (exit code, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        finally:
            if self.proc.poll() is not None:
                _LIVE.discard(self)
        return self.proc.returncode, err

    def kill(self) -> None:
        """SIGKILL: no drain, no flush, no final checkpoint — a crash."""
        self.proc.kill()
        self.proc.communicate(timeout=30)
        _LIVE.discard(self)


@contextmanager
def killed_after(proc: subprocess.Popen):
    """Run the block with child ``proc``, then kill -9 it (a crash: no flush, no final checkpoint) and reap
    it; a block that fails leaves no child behind either."""
    try:
        yield proc
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
