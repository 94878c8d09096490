"""The Ed25519 key that signs checkpoints: load it, or create it on first start.

The private key is a PKCS#8 PEM file created with mode 0600 (``O_EXCL``, so
two processes starting at once cannot both write one); a key file others can
read is used but logged as a warning. The public key is what
``GetPublicKey`` publishes and what ``audit verify --from-key`` trusts; it is
also written next to the log as ``public-key.pem`` for convenience (a copy in
the same directory as the log proves nothing against someone who can rewrite
the directory: an auditor should hold the key from elsewhere).

Keys change (a rotation: ``audit_key`` names a new key). Each checkpoint
names the key that signed it (``key_id``), so the log is verified epoch by
epoch against a set of trusted keys. Every public key that ever signed here
is therefore kept as ``public-keys/<key_id>.pem`` (never overwritten, the
name being the key's own hash); ``public-key.pem`` is the current one. The
default key is created only for a log nothing has signed yet: a missing
``signing-key.pem`` under signed checkpoints is a lost key, and a new one
created silently would start an epoch nobody decided on.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..durable_files import replace_whole
from ..config import OperatorPath
from ..errors import FailedPrecondition
from .errors import AuditError
from .segments import fsync_dir, read_regular

log = logging.getLogger("aios.audit")

ALGORITHM = "Ed25519"
PUBLIC_KEY_FILE = "public-key.pem"
PUBLIC_KEYS_DIR = "public-keys"  # every public key that signed checkpoints here, as <key_id>.pem


def key_id(public_raw: bytes) -> str:
    """A short name for a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


class SigningKey:
    """An Ed25519 private key with its raw public key and key id."""

    __slots__ = ("_private", "public_raw", "key_id", "path")

    def __init__(self, private: Ed25519PrivateKey, path: Path | None = None):
        self._private = private
        self.public_raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = key_id(self.public_raw)
        self.path = path

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def public_pem(self) -> bytes:
        return public_pem(self.public_raw)


def public_pem(public_raw: bytes) -> bytes:
    return Ed25519PublicKey.from_public_bytes(public_raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def load_or_create(path: str | Path, signed_by: Callable[[], list[str]] | None = None) -> SigningKey:
    """The signing key at ``path``; a new one is generated and written (0600) if the file is absent.

    Except where ``path`` is an ``OperatorPath`` (``audit_key`` set in kernel.toml, AIOS_AUDIT_KEY or a
    flag): a key the operator named and that is missing is a failed mount or a typo, and a new key would
    sign from then on unnoticed, so it is FAILED_PRECONDITION. Only the default key, kept in the audit
    directory, is created on first start: ``signed_by()`` (the key ids of the log's checkpoints, read only
    when the key is missing) non-empty means it is not the first start, the key that signed is gone, and
    that is FAILED_PRECONDITION too.
    """
    source = path.source if isinstance(path, OperatorPath) else ""
    path = Path(path)
    try:
        return _load(path, source)
    except FileNotFoundError:
        if source:
            raise FailedPrecondition(
                f"audit_key (from {source}) {path} does not exist: check the path and the secret's mount. "
                "A new key starts a new key epoch: create one with `openssl genpkey -algorithm ed25519 -out FILE` "
                "(docs/operations.md, \"The audit log's signing key\"); an empty audit_key keeps a key in the "
                "data dir, for development only") from None
        signers = signed_by() if signed_by is not None else []
        if signers:
            raise FailedPrecondition(_lost_default_key(path, signers)) from None
    return _create(path, source)


def _lost_default_key(path: Path, signed_by) -> str:
    ids = ", ".join(dict.fromkeys(signed_by))
    return (f"the audit signing key {path} is missing, yet the log's checkpoints were signed by key {ids}: "
            f"restore {path.name} from a backup, or, if the key is lost for good, make a new one "
            f"(openssl genpkey -algorithm ed25519 -out audit-key.pem) and name it with audit_key to start a new "
            f"key epoch; no new key is created silently")


def _create(path: Path, source: str) -> SigningKey:
    """A new key written with O_EXCL (another process that created it first wins: its key is used)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return _load(path, source)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    key = SigningKey(private, path)
    log.info("audit: created signing key %s (key id %s)", path, key.key_id)
    return key


def _load(path: Path, source: str = "") -> SigningKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:  # a directory, no permission: name the setting, not only the path
        where = f" (from {source})" if source else ""
        raise FailedPrecondition(f"audit_key{where} {path} cannot be read: {exc.strerror or exc}") from None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("audit: signing key %s is readable by others (mode %04o); chmod 600 it", path, mode)
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise AuditError(f"audit_key {path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise AuditError(f"audit_key {path} holds a {type(private).__name__}, not an Ed25519 key")
    return SigningKey(private, path)


def publish_public_key(directory: Path, key: SigningKey) -> None:
    """Keep ``key``'s public half as ``public-keys/<key_id>.pem`` and make it ``public-key.pem``.

    The key ``public-key.pem`` held before (a log written before ``public-keys/`` existed) is kept
    there first, so replacing it never loses the key that checks the earlier checkpoints.
    """
    path = directory / PUBLIC_KEY_FILE
    pem = key.public_pem()
    try:
        current = read_regular(path)  # (a named pipe there held the start for good)
    except FileNotFoundError:
        current = None
    if current is not None and current != pem:
        _archive_public_key(directory, current)
    _write_once(directory / PUBLIC_KEYS_DIR, f"{key.key_id}.pem", pem)
    if current != pem:
        replace_whole(path, pem)


def _archive_public_key(directory: Path, pem: bytes) -> None:
    try:
        raw = parse_public_key(pem, str(directory / PUBLIC_KEY_FILE))
    except AuditError as exc:  # not a key: nothing to keep, and no reason to stop the start
        log.warning("audit: %s; replacing it", exc.message)
        return
    _write_once(directory / PUBLIC_KEYS_DIR, f"{key_id(raw)}.pem", public_pem(raw))


def _write_once(folder: Path, name: str, data: bytes) -> None:
    """Write ``folder/name`` unless it exists (its name is its key's hash: what is there is that key)."""
    path = folder / name
    if path.exists():
        return
    folder.mkdir(exist_ok=True)
    replace_whole(path, data)


def published_keys(directory: Path, unreadable: list[str] | None = None) -> dict[str, bytes]:
    """key_id -> raw public key, for every key kept in ``directory`` (``public-keys/*.pem`` and
    ``public-key.pem``); files that hold no key are skipped (verify then names the key it lacks), and their
    problems appended to ``unreadable`` when given."""
    found = {}
    paths = sorted((directory / PUBLIC_KEYS_DIR).glob("*.pem")) + [directory / PUBLIC_KEY_FILE]
    for path in paths:
        try:
            for raw in load_public_keys(path, regular_only=True):
                found[key_id(raw)] = raw
        except AuditError as exc:
            if unreadable is not None and path.exists():
                unreadable.append(exc.message)
            continue
    return found


def parse_public_key(data: bytes, source: str = "public key") -> bytes:
    """A raw 32-byte Ed25519 public key from PEM, raw bytes, hex or base64 text."""
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise AuditError(f"{source}: not a PEM public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise AuditError(f"{source}: a {type(key).__name__}, not an Ed25519 public key")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if len(data) == 32:
        return data
    text = data.strip()
    for decode in (binascii.unhexlify, base64.b64decode):
        try:
            raw = decode(text)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == 32:
            return raw
    raise AuditError(f"{source}: expected an Ed25519 public key (PEM, 32 raw bytes, hex or base64)")


def load_public_key(path: str | Path) -> bytes:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read public key {path}: {exc.strerror}") from None
    return parse_public_key(data, str(path))


_PEM_END = b"-----END PUBLIC KEY-----"


def load_public_keys(path: str | Path, regular_only: bool = False) -> list[bytes]:
    """Raw public keys from a keyring: a file of one key (any form ``parse_public_key`` reads) or of
    several PEM keys one after another, or a directory of such ``*.pem`` files (a copy of
    ``public-keys/``). ``regular_only``: the files must be regular ones (``read_regular``: the keys kept in a log
    directory, which whoever hands over the directory chose; a key the operator names may be a pipe,
    ``--from-key <(...)``)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.pem"))
        if not files:
            raise AuditError(f"{path}: a directory with no *.pem public key in it")
        return [raw for file in files for raw in load_public_keys(file, regular_only)]
    try:
        data = read_regular(path) if regular_only else path.read_bytes()
    except FileNotFoundError as exc:
        if _is_key_text(str(path)):  # (an operator walk-through: the key pasted, read as a missing file's name)
            raise AuditError(f"{str(path)[:16]}… is a public key, not a file: the option names a file holding the "
                             "key (PEM, raw, hex or base64): write it to one and pass that") from None
        raise AuditError(f"cannot read public key {path}: {exc.strerror or exc}") from None
    except OSError as exc:
        raise AuditError(f"cannot read public key {path}: {exc.strerror or exc}") from None
    if data.count(_PEM_END) < 2:
        return [parse_public_key(data, str(path))]
    blocks = [block + _PEM_END for block in data.split(_PEM_END) if block.strip()]
    return [parse_public_key(block, f"{path} (key {number + 1})") for number, block in enumerate(blocks)]


def _is_key_text(text: str) -> bool:
    try:
        parse_public_key(text.encode(), "")
    except (AuditError, UnicodeEncodeError):
        return False
    return True


def signature_valid(public_raw: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, message)
    except InvalidSignature:
        return False
    return True
