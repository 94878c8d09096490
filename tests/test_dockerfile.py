"""The Dockerfile, checked without a Docker daemon (none here): what it copies exists and is not excluded by
``.dockerignore``, local state never reaches the build, and the served pipelines folder belongs to the kernel's
user (a docs audit: uploads failed in the image, root owned the folder; ``var/`` with the audit signing key and
the tour's uploaded pipelines went into the build context, the latter into the image, served)."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
IGNORED = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
           if line.strip() and not line.lstrip().startswith("#")]


def _ignored(path: str) -> bool:
    return any(fnmatch.fnmatch(path, pattern) or path.startswith(pattern.rstrip("/") + "/") for pattern in IGNORED)


def _copies() -> list[tuple[list[str], list[str]]]:
    """(flags, sources) of each COPY from the build context (not --from another stage)."""
    found = []
    for line in DOCKERFILE.splitlines():
        words = line.split()
        if not words or words[0] != "COPY":
            continue
        flags = [w for w in words[1:] if w.startswith("--")]
        if any(flag.startswith("--from") for flag in flags):
            continue
        found.append((flags, [w for w in words[1:] if not w.startswith("--")][:-1]))
    return found


def test_every_copied_path_exists_and_is_not_ignored():
    copies = _copies()
    assert copies
    for _flags, sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            assert not _ignored(source), f"COPY {source}: excluded by .dockerignore"


def test_local_state_and_secrets_stay_out_of_the_build_context():
    for path in ("var/audit/signing-key.pem", ".venv/bin/python", "examples/claims/models/claims_triage/1/model.onnx",
                 "kernel/_ext/scheduler.cpython-311-x86_64-linux-gnu.so", ".git/HEAD", "bench/out/x.json",
                 "examples/claims/pipelines/my_pipeline.toml"):
        assert _ignored(path), f"{path} would be sent to the builder"
    assert not _ignored("examples/claims/pipelines/claims_triage.toml")


def test_the_served_pipelines_folder_belongs_to_the_kernels_user():
    user = re.search(r"^USER (\S+)", DOCKERFILE, re.M).group(1)
    served = re.search(r'"--pipelines", "/app/([^"/]+)', DOCKERFILE).group(1)  # the top folder it is under
    assert any(f"--chown={user}" in flags and served in sources for flags, sources in _copies()), \
        f"/app/{served} is copied in without --chown={user}: the kernel could not write uploads there"
    assert DOCKERFILE.index("useradd") < DOCKERFILE.index(f"--chown={user}")  # the user exists when copied for


def test_the_data_dir_is_the_kernels_users_alone():
    """The image's data dir holds escalated cases' free text and the signing key: its owner only, as the kernel makes
    one (otherwise every start in the image warns that every local user can read it)."""
    user = re.search(r"^USER (\S+)", DOCKERFILE, re.M).group(1)
    made = re.search(r"^RUN mkdir -p (/app/var) (.*)$", DOCKERFILE, re.M)
    assert made is not None and f"chown {user} /app/var" in made.group(2) and "chmod 700 /app/var" in made.group(2)
