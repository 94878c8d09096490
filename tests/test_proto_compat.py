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


def _declaration(full_name: str):
    """The DescriptorProto or EnumDescriptorProto named ``full_name``, from the kernel's own descriptor pool (the
    generated modules register in a pool of their own, not protobuf's default one: scripts/gen_protos.py)."""
    from google.protobuf import descriptor_pb2

    from kernel._proto.aios.kernel.v1 import kernel_pb2

    pool = kernel_pb2.DESCRIPTOR.pool
    for find, proto in ((pool.FindMessageTypeByName, descriptor_pb2.DescriptorProto()),
                        (pool.FindEnumTypeByName, descriptor_pb2.EnumDescriptorProto())):
        try:
            find(full_name).CopyToProto(proto)
        except KeyError:
            continue
        return proto
    return None


def _reserved(full_name: str, number: int) -> bool:
    """Whether a removed field or enum value has both its name and its number reserved in its message or enum
    (so neither can ever be reused for something else)."""
    parent, name = full_name.rsplit(".", 1)
    proto = _declaration(parent)
    if proto is None:
        return False
    inclusive = 0 if proto.DESCRIPTOR.name == "DescriptorProto" else 1  # (a message's ranges end before `end`)
    return name in proto.reserved_name and any(r.start <= number < r.end + inclusive for r in proto.reserved_range)


def test_the_declarations_are_found_where_the_generated_code_registers_them():
    assert _declaration("aios.kernel.v1.Decision") is not None
    assert _declaration("aios.kernel.v1.AuditKind") is not None
    assert _declaration("inference.ModelInferRequest") is not None


def test_no_locked_field_or_enum_value_changed_or_went_unreserved():
    locked = json.loads(LOCK.read_text())
    now = current()
    changed = {name: (was, now[name]) for name, was in locked.items() if name in now and now[name] != was}
    gone = [name for name in locked if name not in now and not _reserved(name, locked[name][0])]
    assert not changed, f"fields or enum values changed number or type (wire-incompatible): {changed}"
    assert not gone, f"removed without reserving their names and numbers: {gone}"


def test_every_field_and_enum_value_is_in_the_lock_file():
    new = sorted(set(current()) - set(json.loads(LOCK.read_text())))
    assert not new, f"not in {LOCK.name} yet (run .venv/bin/python scripts/proto_fields.py): {new}"
