"""``aios-kernel audit verify`` and ``aios-kernel audit export``.

``kernel/cli.py`` hands every word after ``audit`` to ``main(argv)`` (so the
kernel's other commands never pay for importing the audit code); the same
commands run standalone as ``python -m kernel.audit.cli``.
Exit codes: 0 success, 1 the log failed verification, 2 the command could
not run (no such directory, unreadable key, bad option).
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

from .._proto.aios.kernel.v1 import kernel_pb2
from .errors import AuditError
from .export import export_jsonl
from .keys import load_public_key
from .reader import RecordFilter, iter_directory
from .verify import verify_directory


def _time(text: str) -> int:
    """Unix nanoseconds, from an integer or an ISO-8601 time (UTC if no offset is given)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither unix nanoseconds nor an ISO-8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1_000_000_000)


def _kind(text: str) -> int:
    try:
        return kernel_pb2.AuditKind.Value(text.upper())
    except ValueError:
        names = ", ".join(name for name in kernel_pb2.AuditKind.keys() if name != "AUDIT_KIND_UNSPECIFIED")
        raise argparse.ArgumentTypeError(f"unknown kind {text!r}; one of {names}") from None


def _sequence(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def cmd_verify(args) -> int:
    directory = Path(args.directory)
    if not directory.is_dir():
        print(f"aios-kernel audit verify: {directory} is not a directory", file=sys.stderr)
        return 2
    key = None
    if args.from_key:
        try:
            key = load_public_key(args.from_key)
        except AuditError as exc:
            print(f"aios-kernel audit verify: {exc.message}", file=sys.stderr)
            return 2
    result = verify_directory(directory, key)
    rate = result.records / result.elapsed_s if result.elapsed_s > 0 else 0.0
    print(f"{directory}: {result.describe()} [{result.elapsed_s:.2f} s, {rate:,.0f} records/s]")
    if result.ok and key is None:
        print("note: signatures were checked with the public-key.pem found in the directory; "
              "pass --from-key with a copy of the key you trust to rule out a rewritten log")
    return 0 if result.ok else 1


def cmd_export(args) -> int:
    directory = Path(args.directory)
    if not directory.is_dir():
        print(f"aios-kernel audit export: {directory} is not a directory", file=sys.stderr)
        return 2
    wanted = RecordFilter.of(args.tenant, args.pipeline, args.kind, args.since, args.until)
    records = iter_directory(directory, args.from_sequence, wanted)
    try:
        if args.out and args.out != "-":
            with open(args.out, "w", encoding="utf-8") as out:
                count = export_jsonl(records, out)
            print(f"exported {count} records to {args.out}", file=sys.stderr)
        else:
            export_jsonl(records, sys.stdout)
    except AuditError as exc:
        print(f"aios-kernel audit export: {exc.message}", file=sys.stderr)
        return 1
    return 0


def build_parser(prog: str = "aios-kernel audit") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Verify, export or replay an audit log directory.")
    commands = parser.add_subparsers(dest="audit_command", required=True)

    verify = commands.add_parser("verify", help="check every hash, link and signed checkpoint; exit 1 naming "
                                                "the first bad record")
    verify.add_argument("directory", help="the log directory (e.g. var/audit)")
    verify.add_argument("--from-key", dest="from_key", metavar="PUBKEY",
                        help="the trusted Ed25519 public key file (PEM, 32 raw bytes, hex or base64); "
                             "default: public-key.pem in the directory")
    verify.set_defaults(func=cmd_verify)

    export = commands.add_parser("export", help="write records as JSON Lines")
    export.add_argument("directory", help="the log directory (e.g. var/audit)")
    export.add_argument("--out", help="output file (default: standard output)")
    export.add_argument("--from", dest="from_sequence", type=_sequence, default=0, metavar="SEQ",
                        help="first sequence number (default 0)")
    export.add_argument("--since", type=_time, help="records at or after this time (unix ns or ISO-8601)")
    export.add_argument("--until", type=_time, help="records before this time (unix ns or ISO-8601)")
    export.add_argument("--tenant")
    export.add_argument("--pipeline")
    export.add_argument("--kind", type=_kind, help="DECISION, REVIEW_RESOLUTION, MODEL_DEPLOY, ...")
    export.set_defaults(func=cmd_export)

    # Replay needs pipelines and policies; it lives with them and is imported only when used.
    from ..pipelines import replay_cli

    replay = commands.add_parser("replay", help="re-decide recorded decisions under a candidate policy "
                                                "and report which would change")
    replay_cli.add_arguments(replay, _time)
    replay.set_defaults(func=replay_cli.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``aios-kernel audit ARGS``: parse ``argv`` (the words after ``audit``) and run the command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
