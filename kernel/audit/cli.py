"""``aios-kernel audit verify``, ``export``, ``replay`` and ``archive``.

``kernel/cli.py`` hands every word after ``audit`` to ``main(argv)`` (so the
kernel's other commands never pay for importing the audit code); the same
commands run standalone as ``python -m kernel.audit.cli``.
Exit codes: 0 success, 1 the log failed verification (``verify --strict``:
records no checkpoint signed, on a log nobody has open, included) or could
not be read whole, or ``replay --fail-on-change`` found a change, 2 the
command could not run (no such directory, a directory with no log in it,
unreadable key or file, bad option).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import math
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from .._proto.aios.kernel.v1 import kernel_pb2
from ..cli_support import open_private, output_problem
from ..progress import Progress, counted
from .errors import AuditError, AuditFormatTooNew
from .export import export_jsonl
from .keys import load_public_keys
from .reader import RecordFilter, iter_directory
from .verify import not_a_log, verify_directory


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


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
    # In whole microseconds (what ISO-8601 gives here): timestamp()'s float seconds times 1e9 were up to 256 ns
    # off, and a record at the very microsecond named fell outside --since (inclusive) or inside --until.
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000


def _tree_head(text: str) -> tuple[int, bytes]:
    """SIZE:ROOT, the root in hex or base64 (GetCheckpoint's root_hash as grpcurl prints it)."""
    size, _, root = text.partition(":")
    try:
        number = int(size)
    except ValueError:
        number = -1
    if number < 0 or not root:
        raise argparse.ArgumentTypeError(f"{text!r} is not SIZE:ROOT (a tree size and its root hash, as GetCheckpoint "
                                         "answers: tree_size and root_hash)")
    for decode in (bytes.fromhex, lambda value: base64.b64decode(value, validate=True)):
        try:
            digest = decode(root)
        except ValueError:
            continue
        if len(digest) == 32:
            return number, digest
    raise argparse.ArgumentTypeError(f"{root!r} is no SHA-256 root hash (64 hex digits, or 44 base64 characters)")


def _kind(text: str) -> int:
    try:
        return kernel_pb2.AuditKind.Value(text.upper())
    except ValueError:
        names = ", ".join(name for name in kernel_pb2.AuditKind.keys() if name != "AUDIT_KIND_UNSPECIFIED")
        raise argparse.ArgumentTypeError(f"unknown kind {text!r}; one of {names}") from None


_MAX_DAYS = 36_500  # a hundred years, as store_retention_days: more is a typo (and 1e300 overflowed the cut's ns)


def _days(text: str) -> float:
    # (float() takes "nan" and "inf": the cut's arithmetic then ended in a traceback)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days")
    if not 0 <= value <= _MAX_DAYS:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 to {_MAX_DAYS} days")
    return value


def _sequence(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # (argparse's own message named this function: "invalid _sequence value")
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _cannot_run(command: str, message: str) -> int:
    """Exit code 2, the command could not run, with its one-line reason on stderr."""
    print(f"aios-kernel audit {command}: {message}", file=sys.stderr)
    return 2


def _log_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot be read as a log (checked before any work, so a wrong path exits 2)."""
    if not directory.is_dir():
        return f"{directory} is not a directory"
    try:
        return not_a_log(directory)
    except OSError as exc:
        return f"cannot read {directory}: {exc.strerror or exc}"


def cmd_verify(args) -> int:
    directory = Path(args.directory)
    problem = _log_problem(directory)
    if problem is not None:
        return _cannot_run("verify", problem)
    keys = None
    if args.from_key:
        try:  # every key given, each file possibly a keyring: checkpoints name the key that signed them
            keys = [raw for path in args.from_key for raw in load_public_keys(path)]
        except AuditError as exc:
            return _cannot_run("verify", exc.message)
    try:
        result = verify_directory(directory, keys, strict=args.strict, min_records=args.min_records,
                                  tree_head=args.tree_head,
                                  progress=Progress("aios-kernel audit verify"))
    except AuditFormatTooNew as exc:  # not a failed log: one this kernel cannot read
        return _cannot_run("verify", exc.message)
    rate = (result.records - result.first_sequence) / result.elapsed_s if result.elapsed_s > 0 else 0.0
    print(f"{directory}: {result.describe()} [{result.elapsed_s:.2f} s, {rate:,.0f} records/s]")
    if result.ok and keys is None and result.key_id:  # no key_id: no checkpoint, so no key was used
        # (on stderr: stdout is the one line a script reads, README)
        print("note: signatures were checked with the public keys found in the directory (public-key.pem, "
              "public-keys/); pass --from-key with a copy of the keys you trust to rule out a rewritten log",
              file=sys.stderr)
    return 0 if result.ok else 1


def cmd_export(args) -> int:
    directory = Path(args.directory)
    problem = _log_problem(directory)
    if problem is not None:
        return _cannot_run("export", problem)
    if args.since is not None and args.until is not None and args.until <= args.since:
        return _cannot_run("export", "--until must be later than --since (StreamAudit refuses the same)")
    to_file = bool(args.out) and args.out != "-"
    problem = output_problem(args.out, directory, args.force) if to_file else None
    if problem is not None:
        return _cannot_run("export", problem)
    try:
        out = open_private(args.out) if to_file else sys.stdout
    except OSError as exc:
        return _cannot_run("export", f"cannot write {args.out}: {exc.strerror or exc}")
    wanted = RecordFilter.of(args.tenant, args.pipeline, args.kind, args.since, args.until)
    try:
        records = iter_directory(directory, args.from_sequence, wanted)
        count = export_jsonl(counted(records, Progress("aios-kernel audit export"), "records exported"), out)
        if to_file:
            out.close()  # (its last lines are written now: a full disk here is said as below, not as a traceback)
    except AuditFormatTooNew as exc:  # not damage: a log this kernel cannot read (as verify says)
        return _cannot_run("export", exc.message)
    except AuditError as exc:
        # Damage, not a torn tail (that one the reader skips with a warning): the export is
        # short, and saying so is the point; exporting past the damage would hide it.
        print(f"aios-kernel audit export: {exc.message}; {args.out if to_file else 'the output'} is incomplete "
              f"and the log does not verify (run `aios-kernel audit verify {directory}`)", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `audit export | head`: the reader left, which is no failure; main stops quietly
        raise
    except OSError as exc:  # a segment that cannot be read (it has a file name), or the output (it has none)
        target = f"read {exc.filename}" if exc.filename else f"write {args.out if to_file else 'standard output'}"
        return _cannot_run("export", f"cannot {target}: {exc.strerror or exc}")
    finally:
        if to_file and not out.closed:
            with contextlib.suppress(OSError):  # (the export failed already, and says so)
                out.close()
    if to_file:
        print(f"exported {count} records to {args.out}", file=sys.stderr)
    return 0


def cmd_replay(args) -> int:
    from ..pipelines import replay_cli

    directory = Path(args.directory)
    problem = _log_problem(directory)
    if problem is not None:
        return _cannot_run("replay", problem)
    # The pipeline loader reads --policy in place of the file the pipeline names, and would blame
    # the pipeline's line for a path the user typed: check the typed paths first.
    problem = output_problem(args.report, directory, args.force) if args.report else None
    if problem is not None:
        return _cannot_run("replay", f"--report {problem}")
    for option, path in (("--pipeline", args.pipeline), ("--policy", args.policy)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            return _cannot_run("replay", f"{option} {path}: cannot read: {exc.strerror or exc}")
    try:
        return replay_cli.run(args)
    except AuditError as exc:  # damage met while reading the recorded decisions
        print(f"aios-kernel audit replay: {exc.message}; the log does not verify "
              f"(run `aios-kernel audit verify {directory}`)", file=sys.stderr)
        return 1


def cmd_archive(args) -> int:
    from .archive import ArchiveRefused, archive

    directory = Path(args.directory)
    problem = _log_problem(directory)
    if problem is not None:
        return _cannot_run("archive", problem)
    days = args.older_than
    try:
        from_keys = [raw for path in args.from_key or () for raw in load_public_keys(path)]
    except AuditError as exc:
        return _cannot_run("archive", exc.message)
    try:
        result = archive(directory, Path(args.dest), before=args.before, older_than_days=days, key_path=args.key,
                         store=Path(args.store) if args.store else None, no_store=args.no_store,
                         from_keys=from_keys, accept_adopted=args.accept_adopted, accept_base=args.accept_base)
    except ArchiveRefused as exc:
        return _cannot_run("archive", exc.message)
    except AuditFormatTooNew as exc:
        return _cannot_run("archive", exc.message)
    except AuditError as exc:  # the checks passed, then a file could not be read or written
        print(f"aios-kernel audit archive: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        return _cannot_run("archive", f"{exc.filename or ''}: {exc.strerror or exc}")
    print(result.summary(directory, Path(args.dest)))
    return 0


def build_parser(prog: str = "aios-kernel audit") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Verify, export, replay or archive an audit log directory.")
    commands = parser.add_subparsers(dest="audit_command", required=True)

    about = ("check every hash, link and signed checkpoint; exit 1 naming the first bad record, or the range "
             "between two signed checkpoints a re-chained edit lies in")
    verify = commands.add_parser("verify", help=about, description=about)
    verify.add_argument("directory", help="the log directory (e.g. var/audit)")
    verify.add_argument("--from-key", dest="from_key", metavar="PUBKEY", action="append",
                        help="a trusted Ed25519 public key file (PEM, 32 raw bytes, hex or base64), a file of "
                             "several PEM keys, or a folder of *.pem keys; repeat it across a key rotation (each "
                             "checkpoint is checked with the key it names); default: the keys kept in the "
                             "directory (public-key.pem, public-keys/)")
    verify.add_argument("--strict", action="store_true",
                        help="also fail (exit 1) when records after the last signed checkpoint are unsigned and "
                             "no kernel has the log open (a crash, or records appended without the key), and when "
                             "a start signed records that hold a clean stop (their checkpoints were cut)")
    verify.add_argument("--min-records", dest="min_records", type=_sequence, default=0, metavar="N",
                        help="fail (exit 1) when the log holds fewer than N records: a size noted earlier (an "
                             "earlier verify, GetCheckpoint) catches a log cut back to one of its own checkpoints, "
                             "which verifies as a shorter log otherwise")
    verify.add_argument("--tree-head", dest="tree_head", type=_tree_head, metavar="SIZE:ROOT",
                        help="fail (exit 1) unless the records give ROOT at SIZE (GetCheckpoint's tree_size and "
                             "root_hash, hex or base64, noted where the log's writers cannot reach): as --min-records "
                             "SIZE, and it also catches a history rewritten and re-signed with a stolen key")
    verify.set_defaults(func=cmd_verify)

    export = commands.add_parser("export", help="write records as JSON Lines")
    export.add_argument("directory", help="the log directory (e.g. var/audit)")
    export.add_argument("--out", help="output file (default: standard output); never inside the data dir, and "
                                      "not an existing file unless --force")
    export.add_argument("--force", action="store_true", help="replace an existing --out file")
    export.add_argument("--from", dest="from_sequence", type=_sequence, default=0, metavar="SEQ",
                        help="first sequence number (default 0)")
    export.add_argument("--since", type=_time, help="records at or after this time (unix ns or ISO-8601)")
    export.add_argument("--until", type=_time, help="records before this time (unix ns or ISO-8601)")
    export.add_argument("--tenant", help="only records of this tenant")
    export.add_argument("--pipeline", help="only records of this pipeline (its name, e.g. claims_triage)")
    export.add_argument("--kind", type=_kind, help="DECISION, REVIEW_RESOLUTION, MODEL_DEPLOY, ...")
    export.set_defaults(func=cmd_export)

    about = ("move the oldest whole segments of a stopped kernel's log into DEST, a log directory of its own, "
             "keeping a small signed base in their place: starts, proofs and verify then begin there")
    archive = commands.add_parser("archive", help=about, description=about)
    archive.add_argument("directory", help="the log directory (e.g. var/audit); its kernel must be stopped")
    archive.add_argument("dest", help="a new (or empty) folder for the archive, outside the log directory")
    cut = archive.add_mutually_exclusive_group(required=True)
    cut.add_argument("--before", type=_sequence, metavar="SEQ",
                     help="archive records before SEQ (rounded down to a segment boundary)")
    cut.add_argument("--older-than", dest="older_than", type=_days, metavar="DAYS",
                     help="archive the segments whose every record is older than DAYS days")
    archive.add_argument("--accept-adopted", dest="accept_adopted", action="store_true",
                         help="archive although a start signed records that hold a clean stop (what `verify "
                              "--strict` fails on; a kernel killed between its 'kernel stopping' record and its final "
                              "checkpoint leaves this too): check those records with `audit export --from` first")
    archive.add_argument("--accept-base", dest="accept_base", action="store_true",
                         help="sign the log's archive base, which has no archive signature (an archive of a release "
                              "before 2026-11-28 wrote it, or someone without the key made it out of a checkpoint "
                              "and deleted the records before it: what `verify --strict` fails on): check it against "
                              "the archive it names first; --before 0 signs it and archives nothing")
    archive.add_argument("--key", help="the signing key (the kernel's audit_key; default DIRECTORY/signing-key.pem)")
    archive.add_argument("--from-key", dest="from_key", metavar="PUBKEY", action="append",
                         help="a public key of an earlier key epoch (a rotation) to trust besides the signing key's "
                              "own; keys merely found in the directory are not trusted")
    stores = archive.add_mutually_exclusive_group()
    stores.add_argument("--store", help="the kernel's store (default: kernel.sqlite3 beside DIRECTORY): the cut stops "
                                        "before the oldest record it may still read back")
    stores.add_argument("--no-store", dest="no_store", action="store_true",
                        help="the log has no kernel store (a log written by AuditLog alone)")
    archive.set_defaults(func=cmd_archive)

    # Replay needs pipelines and policies; it lives with them and is imported only when used.
    from ..pipelines import replay_cli

    about = ("re-decide recorded decisions under a candidate policy (and model) and report which would change, "
             "or keep their action for other rules or another adjustment; --fail-on-change exits 1 if any would")
    replay = commands.add_parser("replay", help=about, description=about)
    replay_cli.add_arguments(replay, _time)
    replay.set_defaults(func=cmd_replay)
    commands.metavar = "{" + ",".join(commands.choices) + "}"  # (a missing one was named "audit_command")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``aios-kernel audit ARGS``: parse ``argv`` (the words after ``audit``) and run the command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
