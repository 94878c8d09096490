"""The data dir is the owner's alone: it holds escalated cases' free text and the audit signing key.

(An operator walk-through found the data dir 0755 and the store 0644 under the usual umask: every local user could
read customers' own words.) A data dir the kernel makes is 0700; one that every local user can read is named in a
WARNING at start. Backups and archives are made the same way.
"""

from __future__ import annotations

import logging
import os

from conftest import start_kernel
from kernel.backup import backup


def test_a_new_data_dir_is_owner_only_and_an_open_one_is_named(model_repo, tmp_path, caplog):
    old_umask = os.umask(0o022)  # the usual one, whatever the test runner's is
    try:
        made = tmp_path / "made" / "data"
        with caplog.at_level(logging.WARNING, logger="aios.decisions"):
            start_kernel(model_repo, data_dir=str(made)).stop(grace=1)
        assert made.stat().st_mode & 0o777 == 0o700
        assert "is open to every local user" not in caplog.text

        opened = tmp_path / "opened"
        opened.mkdir(mode=0o755)
        with caplog.at_level(logging.WARNING, logger="aios.decisions"):
            start_kernel(model_repo, data_dir=str(opened)).stop(grace=1)
        assert f"data_dir {opened} is open to every local user (mode 755)" in caplog.text
        assert f"chmod 700 {opened}" in caplog.text

        copy = tmp_path / "backups" / "copy"
        assert backup(made, copy).ok
        assert copy.stat().st_mode & 0o777 == 0o700
    finally:
        os.umask(old_umask)
