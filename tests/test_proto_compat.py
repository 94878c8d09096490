"""The protos stay wire-compatible with what was stored and shipped (``scripts/proto_fields.py`` says why).

Every field and enum value in ``proto/fields.lock.json`` must still exist with the same number, type and
repetition, or have been removed *with its number reserved*. New ones must be added to the lock file (run the
script), so that they are held to this from then on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from proto_fields import LOCK, current  # noqa: E402


def _reserved(full_name: str) -> bool:
    """Whether a removed field's number is reserved in its message (so it can never be reused)."""
    from google.protobuf import descriptor_pb2, descriptor_pool

    message_name, field_name = full_name.rsplit(".", 1)
    try:
        message = descriptor_pool.Default().FindMessageTypeByName(message_name)
    except KeyError:
        return False
    proto = descriptor_pb2.DescriptorProto()
    message.CopyToProto(proto)
    return field_name in proto.reserved_name


def test_no_locked_field_or_enum_value_changed_or_went_unreserved():
    locked = json.loads(LOCK.read_text())
    now = current()
    changed = {name: (was, now[name]) for name, was in locked.items() if name in now and now[name] != was}
    gone = [name for name in locked if name not in now and not _reserved(name)]
    assert not changed, f"fields or enum values changed number or type (wire-incompatible): {changed}"
    assert not gone, f"removed without reserving their names and numbers: {gone}"


def test_every_field_and_enum_value_is_in_the_lock_file():
    new = sorted(set(current()) - set(json.loads(LOCK.read_text())))
    assert not new, f"not in {LOCK.name} yet (run .venv/bin/python scripts/proto_fields.py): {new}"
