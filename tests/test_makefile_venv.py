"""The Makefile's set-up on an old python3 (a day-one walk-through): the README's first command is `make serve`,
and "if that is older, name another: make serve PYTHON=python3.11". The first run made .venv with the old python3
and failed in pip; the second, with PYTHON=python3.11, kept that .venv (`test -x .venv/bin/python`) and failed the
same way until .venv was removed by hand. Now an old PYTHON is refused before a .venv is made, and a .venv whose
Python is older than requires-python is made again with PYTHON.

Run with real make on a copy of the Makefile, with stand-in interpreters (no second Python is installed here, and a
real install takes minutes): each answers the version check as an old or a new Python would, makes a venv holding a
copy of itself, and fails pip's install when old, as pip refuses a package whose requires-python it does not meet."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

INTERPRETER = r"""#!/bin/bash
KIND={kind}
if [ "$1" = -c ]; then
  case "$2" in *version_info*) [ $KIND = new ]; exit;; esac
  exit 0
fi
if [ "$1" = -m ] && [ "$2" = venv ]; then
  dir="${{@: -1}}"; rm -rf "$dir"; mkdir -p "$dir/bin"; cp "$0" "$dir/bin/python"; exit 0
fi
if [ "$1" = -m ] && [ "$2" = pip ]; then
  [ $KIND = new ] || {{ echo "ERROR: Package 'aios-kernel' requires a different Python: 3.9.2 not in '>=3.11'" >&2; exit 1; }}
fi
exit 0
"""


def _checkout(tmp_path: Path) -> Path:
    """A folder with the Makefile and the files its set-up depends on (their contents do not matter here)."""
    work = tmp_path / "repo"
    (work / "ext").mkdir(parents=True)
    shutil.copy(ROOT / "Makefile", work / "Makefile")
    for name in ("pyproject.toml", "setup.py", "ext/a.pyx", "ext/a.pxd", "ext/a.pxi"):
        (work / name).write_text("")
    return work


def _interpreter(path: Path, kind: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(INTERPRETER.format(kind=kind))
    path.chmod(0o755)
    return path


def _make(work: Path, python: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "build", f"PYTHON={python}"], cwd=work, capture_output=True, text=True, timeout=60)


def test_an_old_python_is_refused_before_a_venv_is_made(tmp_path):
    work = _checkout(tmp_path)
    old = _interpreter(tmp_path / "bin" / "python3", "old")
    done = _make(work, old)
    assert done.returncode != 0
    assert f"{old} is not Python 3.11 or newer" in done.stdout + done.stderr
    assert "PYTHON=python3.11" in done.stdout + done.stderr
    assert not (work / ".venv").exists(), "a .venv made with the old Python would be kept by the next make"


def test_a_venv_of_an_old_python_is_made_again_with_python(tmp_path):
    work = _checkout(tmp_path)
    _interpreter(work / ".venv" / "bin" / "python", "old")  # what a first `make serve` on an old python3 left
    new = _interpreter(tmp_path / "bin" / "python3.11", "new")
    done = _make(work, new)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "KIND=new" in (work / ".venv" / "bin" / "python").read_text()
    assert list((work / ".venv").glob(".installed-*"))
    # and a good .venv is kept, whatever PYTHON names then (python3 may still be the old one)
    (work / "setup.py").write_text("# changed\n")
    later = time.time() + 10
    os.utime(work / "setup.py", (later, later))  # newer than the stamp: the set-up runs again
    marker = work / ".venv" / "kept"
    marker.write_text("")
    done = _make(work, _interpreter(tmp_path / "bin" / "python3", "old"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert marker.exists()
