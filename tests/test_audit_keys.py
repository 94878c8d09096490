"""Key rotation and a lost key: the log stays verifiable across signing keys, and no key appears silently.

Real kernels (``start_kernel``) write the logs; each start records itself, so
every kernel adds signed records. Verification runs as a user runs it,
``python -m kernel audit verify`` in a subprocess (``run_cli``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from claims_support import build_small_model
from conftest import start_kernel
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_audit_verify import build_log, run_cli

from kernel._proto.aios.kernel.v1 import kernel_pb2 as pb
from kernel.audit import AuditLog, verify_directory
from kernel.audit import checkpoints as cps, keys as keys_module
from kernel.audit.checkpoints import read_all
from kernel.audit.keys import key_id, load_public_key
from kernel.errors import FailedPrecondition


def make_key(folder: Path, name: str) -> tuple[Path, Path, str]:
    """An Ed25519 key as an operator makes one (private PEM, mode 0600) and its public PEM: (private,
    public, key id)."""
    private = Ed25519PrivateKey.generate()
    key_path = folder / f"{name}.pem"
    key_path.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    key_path.chmod(0o600)
    public = private.public_key()
    public_path = folder / f"{name}.pub"
    public_path.write_bytes(public.public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key_path, public_path, key_id(raw)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return build_small_model(tmp_path_factory.mktemp("models"))


def run_kernel(models: Path, data_dir: Path, **settings) -> None:
    """Start a kernel on ``data_dir`` (its start records go into the log) and stop it cleanly."""
    server = start_kernel(models, data_dir=str(data_dir), **settings)
    server.stop(grace=1)


def rotate(models, keys: Path, data_dir: Path) -> tuple[Path, tuple, tuple]:
    """A log in ``data_dir`` signed by key 1, then (a rotation: audit_key names another key) by key 2, the keys made
    in ``keys``: (the audit dir, key 1, key 2), each key as ``make_key`` gives it."""
    first, second = make_key(keys, "k1"), make_key(keys, "k2")
    run_kernel(models, data_dir, audit_key=str(first[0]))
    run_kernel(models, data_dir, audit_key=str(second[0]))
    return data_dir / "audit", first, second


@pytest.fixture(scope="module")
def rotated(models, tmp_path_factory) -> tuple[Path, tuple, tuple]:
    """A log signed by key 1, then by key 2 (shared by the module's tests that only read it)."""
    return rotate(models, tmp_path_factory.mktemp("keys"), tmp_path_factory.mktemp("data"))


def test_a_rotated_log_keeps_every_public_key_and_verifies_without_from_key(rotated):
    audit, (_, _, first_id), (_, _, second_id) = rotated
    assert {c.key_id for c in read_all(audit)[0]} == {first_id, second_id}
    assert sorted(p.name for p in (audit / "public-keys").iterdir()) == sorted([f"{first_id}.pem", f"{second_id}.pem"])
    done = run_cli("verify", str(audit))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"signed checkpoints verified (keys {first_id}, {second_id})" in done.stdout
    # (Docs audit) README: verify prints one line, a script's to read; the note on the keys trusted is for the
    # person, on stderr (it was a second line of stdout)
    assert len(done.stdout.splitlines()) == 1, done.stdout
    assert "note: signatures were checked with the public keys found in the directory" in done.stderr


def test_each_checkpoint_is_checked_with_the_trusted_key_it_names(rotated, tmp_path):
    audit, (_, first_pub, first_id), (_, second_pub, second_id) = rotated
    done = run_cli("verify", str(audit), "--from-key", str(first_pub))  # one epoch's key is not enough
    assert done.returncode == 1
    assert f"was signed by key {second_id}, not by the trusted key {first_id}" in done.stdout
    assert "pass its public key with another --from-key" in done.stdout

    done = run_cli("verify", str(audit), "--from-key", str(first_pub), "--from-key", str(second_pub))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"(keys {first_id}, {second_id})" in done.stdout and "note:" not in done.stdout

    keyring = tmp_path / "keyring.pem"  # both keys in one file
    keyring.write_bytes(first_pub.read_bytes() + second_pub.read_bytes())
    assert run_cli("verify", str(audit), "--from-key", str(keyring)).returncode == 0
    folder = tmp_path / "trusted"  # a folder of keys, as an auditor keeps a copy of public-keys/
    shutil.copytree(audit / "public-keys", folder)
    assert run_cli("verify", str(audit), "--from-key", str(folder)).returncode == 0

    stranger = make_key(tmp_path, "k3")
    result = verify_directory(audit, [_raw(stranger[1]), _raw(second_pub)])
    assert not result.ok
    assert f"signed by key {first_id}, not by any of the trusted keys" in result.reason


def _raw(public_pem: Path) -> bytes:
    key = serialization.load_pem_public_key(public_pem.read_bytes())
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_a_log_written_before_public_keys_existed_keeps_its_old_key_on_rotation(tmp_path):
    """Such a log has only public-key.pem; the first rotation must not overwrite the only copy of the old key."""
    audit = tmp_path / "audit"
    build_log(audit, records=12, checkpoint_every=5)  # the default key
    shutil.rmtree(audit / "public-keys")  # as an older kernel left it
    old_pub = (audit / "public-key.pem").read_bytes()
    new_key, new_pub, new_id = make_key(tmp_path, "new")
    with AuditLog.open(audit, key_path=new_key) as log:
        log.append_and_wait(pb_record(), 10)
    assert (audit / "public-key.pem").read_bytes() == new_pub.read_bytes()
    kept = {p.name: p.read_bytes() for p in (audit / "public-keys").iterdir()}
    assert kept[f"{new_id}.pem"] == new_pub.read_bytes() and old_pub in kept.values()
    assert verify_directory(audit).ok


def pb_record() -> pb.AuditRecord:
    return pb.AuditRecord(kind=pb.DECISION, request_id="after-rotation")


def test_a_lost_default_key_stops_the_start_instead_of_a_new_key(models, tmp_path):
    data_dir = tmp_path / "data"
    run_kernel(models, data_dir)  # the default key, created in the audit directory
    audit = data_dir / "audit"
    (audit / "signing-key.pem").unlink()
    before = sorted(p.name for p in audit.rglob("*"))
    with pytest.raises(FailedPrecondition) as caught:
        start_kernel(models, data_dir=str(data_dir))
    message = caught.value.message
    signed_by = read_all(audit)[0][0].key_id
    assert "\n" not in message
    assert message.startswith(f"the audit signing key {audit / 'signing-key.pem'} is missing, yet the log's "
                              f"checkpoints were signed by key {signed_by}: restore signing-key.pem from a backup")
    assert "name it with audit_key" in message and "no new key is created silently" in message
    assert sorted(p.name for p in audit.rglob("*")) == before  # no key was made, nothing changed
    assert verify_directory(audit).ok


def test_a_fresh_log_still_gets_its_default_key(tmp_path):
    with AuditLog.open(tmp_path / "audit") as log:
        log.append_and_wait(pb_record(), 10)
    assert (tmp_path / "audit" / "signing-key.pem").exists()
    assert verify_directory(tmp_path / "audit").ok


def test_a_retired_key_that_signs_again_is_noted_and_fails_strict(models, tmp_path):
    """(Operator walk-through) after a rotation from key 1 to key 2, checkpoints signed by key 1 again were taken as
    any others: whoever holds a copy of the retired key (left in the data dir) could sign past the rotation."""
    (tmp_path / "keys").mkdir()
    data_dir = tmp_path / "data"
    audit, first, second = rotate(models, tmp_path / "keys", data_dir)  # (a log of its own: this test changes it)
    trusted = [first[1].read_bytes(), second[1].read_bytes()]
    from kernel.audit.keys import parse_public_key
    raw = [parse_public_key(pem) for pem in trusted]
    assert verify_directory(audit, raw, strict=True).ok  # a rotation alone passes
    # Key 1 signs again, as a copy of it in other hands would (a kernel refuses to: the test below).
    found = read_all(audit)[0]
    forged = cps.sign(keys_module.load_or_create(first[0]), found[-1].tree_size, found[-1].root_hash)
    with open(audit / cps.FILE_NAME, "ab") as checkpoints:
        checkpoints.write(cps.frame(forged.SerializeToString()))
    noted = verify_directory(audit, raw)
    assert noted.ok and f"is signed by key {first[2]}, which another key replaced" in noted.describe()
    strict = verify_directory(audit, raw, strict=True)
    assert not strict.ok and "a retired key signed again" in strict.describe()


def test_a_start_with_a_retired_key_is_refused_and_changes_nothing(models, tmp_path):
    """(Operator walk-through) a start with key 1 after a rotation to key 2 (its signing-key.pem restored, audit_key
    set back) signed on with the retired key: from then on `audit verify --strict` failed, and `audit archive`,
    which needs a strict pass, was refused on that log for good."""
    (tmp_path / "keys").mkdir()
    data_dir = tmp_path / "data"
    audit, first, second = rotate(models, tmp_path / "keys", data_dir)  # (a log of its own: this test changes it)
    before = {p.name: p.read_bytes() for p in audit.rglob("*") if p.is_file()}
    with pytest.raises(FailedPrecondition) as caught:
        start_kernel(models, data_dir=str(data_dir), audit_key=str(first[0]))
    message = caught.value.message
    assert "\n" not in message
    assert f"the audit signing key {first[0]} (key {first[2]}) signed checkpoints of {audit}" in message
    assert f"(key {second[2]} signs now)" in message and "make a new one" in message
    assert {p.name: p.read_bytes() for p in audit.rglob("*") if p.is_file()} == before  # nothing signed or moved
    trusted = [load_public_key(first[1]), load_public_key(second[1])]
    assert verify_directory(audit, trusted, strict=True).ok
    run_kernel(models, data_dir, audit_key=str(second[0]))  # the current key still starts


def test_a_link_planted_under_the_public_keys_temporary_name_is_not_written_through(tmp_path):
    """(A helper's audit) Someone who can write the log directory, but nothing outside it, left a link named
    ``public-key.tmp`` pointing at another file and removed ``public-key.pem``: the next open wrote the public key
    through the link, over that file. The temporary file is now always a new one."""
    directory = tmp_path / "audit"
    AuditLog.open(directory).close()
    victim = tmp_path / "outside.txt"
    victim.write_text("not the kernel's to write\n")
    (directory / "public-key.pem").unlink()
    for name in ("public-key.tmp", "public-key.pem.tmp"):
        (directory / name).symlink_to(victim)
    with AuditLog.open(directory) as log:
        key = log.public_key
    assert victim.read_text() == "not the kernel's to write\n"
    assert not (directory / "public-key.pem").is_symlink()
    assert load_public_key(directory / "public-key.pem") == key
