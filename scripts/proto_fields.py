"""Write ``proto/fields.lock.json``: every message field's number, type and whether it repeats, and every enum
value's number.

Stored audit records and checkpoints are protobuf bytes kept for years, and other teams call the kernel through
stubs generated from older copies of ``proto/``: a field that changes its number or type, or disappears without
being reserved, breaks both without a compile error. ``tests/test_proto_compat.py`` compares the protos with this
file (an upgrade audit found one such change in the history, made before any record was stored). Run this script
after *adding* fields or values; changing or removing one is refused by the test whatever this file says.

    .venv/bin/python scripts/proto_fields.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "proto" / "fields.lock.json"


def current() -> dict[str, list]:
    """``{"pkg.Message.field": [number, type, repeated], "pkg.Enum.VALUE": [number]}`` for every proto of the kernel."""
    sys.path.insert(0, str(ROOT))
    from kernel._proto.aios.kernel.v1 import kernel_pb2
    from kernel._proto.inference import grpc_service_pb2, model_config_pb2

    found: dict[str, list] = {}

    def walk_message(message) -> None:
        for field in message.fields:
            found[field.full_name] = [field.number, field.type, int(field.is_repeated)]
        for nested in message.nested_types:
            walk_message(nested)
        for enum in message.enum_types:
            walk_enum(enum)

    def walk_enum(enum) -> None:
        for value in enum.values:
            found[f"{enum.full_name}.{value.name}"] = [value.number]

    for module in (kernel_pb2, grpc_service_pb2, model_config_pb2):
        for message in module.DESCRIPTOR.message_types_by_name.values():
            walk_message(message)
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            walk_enum(enum)
    return dict(sorted(found.items()))


def main() -> int:
    entries = current()
    lines = [f"  {json.dumps(name)}: {json.dumps(value)}" for name, value in entries.items()]
    LOCK.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {LOCK.relative_to(ROOT)}: {len(entries)} fields and enum values")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
