"""Pieces the client subcommands of ``aios-kernel`` share: the address flags, a request from
``--field``/``--text`` flags, a decision in a few lines, times for people, one line per failed call.

The subcommands that talk to a running kernel (``infer``, ``decide``,
``review``, ``task``) print what a person needs at a terminal and ``--json``
for scripts; a call the kernel refused is one line on stderr,
``CODE: details``, and exit code 1; a mistake in the command line itself is
exit code 2 (argparse's own convention).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .channel import kernel_channel

DEFAULT_ADDRESS = "127.0.0.1:8001"


def default_address(environ=os.environ) -> str:
    """Where a client command calls by default: AIOS_ADDRESS, else where ``serve`` listens with this
    environment (AIOS_HOST, AIOS_PORT), else 127.0.0.1:8001 — so ``AIOS_PORT=8551 make serve`` and the
    client commands in the same shell agree. A wildcard listen host is reached on the loopback."""
    if environ.get("AIOS_ADDRESS"):
        return environ["AIOS_ADDRESS"]
    host = environ.get("AIOS_HOST") or "127.0.0.1"
    port = environ.get("AIOS_PORT") or "8001"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def address(text: str) -> str:
    """``--address``: HOST:PORT (a name, IPv4, or [IPv6]) or unix:PATH, checked before gRPC tries to resolve it
    (gRPC turns a mistyped address into DNS errors, C++ log lines, or a silently different port)."""
    if text.startswith(("unix:", "unix-abstract:")):
        return text
    host, sep, port = text.rpartition(":")
    if "://" in text or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        # The default comes from the environment: name the variable, or the flag gets the blame (a walk-through).
        named = [f"${name}" for name in ("AIOS_ADDRESS", "AIOS_HOST", "AIOS_PORT") if os.environ.get(name)]
        source = f" (from {', '.join(named)})" if named and text == default_address() else ""
        raise argparse.ArgumentTypeError(f"{text!r}{source} is not HOST:PORT (for example 127.0.0.1:8001)")
    return text


def seconds(text: str, allow_zero: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be {'0 (no limit) or more' if allow_zero else 'more than 0'}")
    return value


PAGE_SIZE = 1000  # the most a List RPC gives in one page (kernel/paging.py)


def read_pages(fetch, limit: int, items) -> tuple[list, bool, object]:
    """Page through a List RPC: ``fetch(page_size, page_token)`` -> a response with ``next_page_token``, its
    items ``items(response)``; returns ``(found, more, last)``: the items read, whether more match than
    ``limit`` (0 = no limit) let it read, and the last page."""
    found, token = [], ""
    while True:
        page = fetch(PAGE_SIZE if not limit else min(PAGE_SIZE, limit - len(found)), token)
        found.extend(items(page))
        token = page.next_page_token
        if not token:
            return found, False, page
        if limit and len(found) >= limit:
            return found, True, page


def listed_summary(items, noun: str, state_of, more: bool) -> str:
    """The last line of a ``list`` command: ``3 reviews (1 claimed, 2 open)``, and whether more match than
    ``--limit`` let it show."""
    counts: dict[str, int] = {}
    for item in items:
        counts[state_of(item)] = counts.get(state_of(item), 0) + 1
    split = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    return (f"{len(items)} {noun}{'s' if len(items) != 1 else ''}{f' ({split})' if split else ''}"
            f"{' shown; more match (raise --limit, 0 = all)' if more else ''}")


def print_json_lines(items, noun: str, more: bool) -> None:
    """A ``list --json``: one message a line on stdout and, when more match than ``--limit`` let it read, a line
    saying so on stderr (the lines alone read as all there were: a script took the first 50 for the whole queue)."""
    for item in items:
        print(json_line(item))
    if more:
        print(f"{len(items)} {noun}{'s' if len(items) != 1 else ''} shown; more match (raise --limit, 0 = all)",
              file=sys.stderr)


def whole_number(least: int, meaning: str):
    """An argparse type: a whole number of at least ``least``, refused in one line saying what ``least`` means."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {meaning} or more")
        return value

    return parse


# A count where 0 means no limit.
count = whole_number(0, "0 (no limit)")
# A count of at least 1 (the demo's requests and streams: 0 sends nothing, and a negative one ended in numpy's
# traceback once the kernel had started).
positive = whole_number(1, "1")


def nonempty(text: str) -> str:
    """An id or name the kernel is asked about: not empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def address_flags(parser: argparse.ArgumentParser, timeout_s: float = 10.0) -> None:
    """``--address`` and ``--timeout``; ``timeout_s`` 0: a watch, which runs until stopped unless given one."""
    parser.add_argument("--address", type=address, default=default_address(),
                        help=f"kernel address, HOST:PORT (default {default_address()}: AIOS_ADDRESS, else "
                             f"AIOS_HOST:AIOS_PORT as serve reads them, else {DEFAULT_ADDRESS})")
    if timeout_s:
        parser.add_argument("--timeout", type=seconds, default=timeout_s,
                            help=f"seconds the call may take (default {timeout_s:g})")
    else:
        parser.add_argument("--timeout", type=lambda text: seconds(text, allow_zero=True), default=0.0,
                            help="stop watching after this many seconds (default 0: until Ctrl-C)")


def request_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of one DecisionRequest (``decide`` and ``task start``)."""
    parser.add_argument("pipeline", type=nonempty, help="the pipeline to decide with (aios-kernel pipelines list)")
    parser.add_argument("--field", action="append", default=[], metavar="NAME=VALUE",
                        help="a request field; VALUE is read as JSON when it is a JSON scalar (12, 0.5, true, \"12\")")
    parser.add_argument("--text", action="append", default=[], metavar="NAME=TEXT", help="a free-text field")
    parser.add_argument("--tenant", default="", help="whose request this is (reviews and audit records carry it)")
    parser.add_argument("--idempotency-key", dest="idempotency_key", default="",
                        help="the same key and request again returns the first answer instead of deciding twice")
    parser.add_argument("--request-id", dest="request_id", default="",
                        help="your id for the request (default: the kernel makes one)")


def request_or_say_why(args):
    """``request_from_flags``, or None after saying on stderr what is wrong with the flags (exit 2 then)."""
    try:
        return request_from_flags(args)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return None


def request_from_flags(args):
    """The DecisionRequest ``request_flags`` describe; ValueError names a malformed flag."""
    from .decision_client import make_request, parse_cli_value

    fields, text = {}, {}
    for target, pairs, flag in ((fields, args.field, "--field"), (text, args.text, "--text")):
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ValueError(f"{flag} {pair!r}: expected NAME=VALUE")
            if key in fields or key in text:
                raise ValueError(f"{flag} {pair!r}: {key} is given twice")
            if target is fields and value.strip() == "null":  # (JSON's null: no field value is "none")
                raise ValueError(f"{flag} {pair!r}: a field has no null; leave --field {key} out for the pipeline's "
                                 f"default, or quote it for the string: --field '{key}=\"null\"'")
            target[key] = parse_cli_value(value) if target is fields else value
    options = {"tenant": args.tenant, "idempotency_key": args.idempotency_key, "request_id": args.request_id}
    try:
        return make_request(args.pipeline, fields, text, **{k: v for k, v in options.items() if v})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--field {str(exc).removeprefix('field ')}") from None


def failed(exc, details: str | None = None) -> int:
    """A refused call (``grpc.RpcError``) as one line on stderr, its ``details`` (default: the call's own); exit
    code 1. A kernel that could not be reached gets a hint where the command looked for it (a docs audit: gRPC's
    "failed to connect" alone left a user who served on another port guessing)."""
    details = (exc.details() or "") if details is None else details
    if "failed to connect" in details:
        details += (" (is the kernel running there? Client commands take their address from --address, else "
                    "AIOS_ADDRESS, else AIOS_HOST and AIOS_PORT: 127.0.0.1:8001 by default)")
    print(f"{exc.code().name}: {details}", file=sys.stderr)
    return 1


def answer(args, call, describe) -> int:
    """Make one unary call, ``call(channel) -> message``, against ``args.address``, and print the answer:
    ``describe(message)``'s lines, or with ``--json`` the message as JSON; a refused call is one line, exit 1."""
    import grpc

    with kernel_channel(args.address) as channel:
        try:
            message = call(channel)
        except grpc.RpcError as exc:
            return failed(exc)
    show(args, message, describe)
    return 0


def show(args, message, describe) -> None:
    if getattr(args, "json", False):
        print_json(message)
    else:
        print("\n".join(describe(message)))


def print_json(message) -> None:
    """One message, indented (``--json`` of a command that answers with one)."""
    from google.protobuf import json_format

    print(json_format.MessageToJson(message, preserving_proto_field_name=True))


def json_line(message) -> str:
    """One message on one line (``--json`` of a list or a stream: JSON lines)."""
    import json

    from google.protobuf import json_format

    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True), separators=(",", ":"))


def enum_name(message, field: str) -> str:
    value = getattr(message, field)
    return message.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[value].name


def hanging(prefix: str, text: str) -> str:
    """``prefix`` and ``text``, each further line of ``text`` indented under its first. A review comment (and so
    the resolution's reason) or a policy rule's description may span lines; printed at the left edge, a line of
    it read as a line of the kernel's own (a comment "ok\\n  resolved:   approve by carol" in ``review show``)."""
    first, *rest = text.split("\n")
    return "\n".join([prefix + first, *(" " * len(prefix) + line if line else "" for line in rest)])


def decision_lines(decision) -> list[str]:
    """A Decision as a person reads it: action and outcome, the rules, escalation, where it is recorded."""
    model = decision.model
    lines = [f"{decision.action}  ({enum_name(decision, 'outcome')}; model {model.model_name}/{model.model_version} "
             f"confidence {model.confidence:.3f})"
             f"{'  replayed: the answer first given for this idempotency key' if decision.replayed else ''}"]
    lines += [hanging(f"  rule {reason.rule_id}: ", reason.description) if reason.description
              else f"  rule {reason.rule_id}" for reason in decision.reasons]
    lines += [f"  escalated: {why}" for why in decision.escalation_reasons]
    if decision.review_id:
        lines.append(f"  review {decision.review_id}")
    lines.append(f"  request {decision.request_id}, policy {decision.policy_name} {decision.policy_version} "
                 f"({decision.policy_hash[:12]}), "
                 f"{f'audit #{decision.audit_sequence}' if decision.audit_hash else 'not on an audit log (audit_mode off)'}")
    return lines


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3 h 20 min``, ``2 d 4 h``: as precise as a person needs."""
    seconds = abs(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    hours, minutes = divmod(int(minutes), 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def stamp(unix_ns: int, up: bool = False) -> str:
    """A wall-clock instant as the commands show it: date, time and zone, ``2026-11-26 22:10:05 UTC`` (local time,
    the zone named: a task's history showed bare ``22:10:05``, with neither the day of a step days back nor the zone
    of a time the kernel's own messages give in UTC). To the second, cut down, or rounded ``up`` (an end to come:
    "claimed by alice until 22:10:05" for a lease ending at 22:10:05.8 sent bob back too early)."""
    seconds = -(-unix_ns // 1_000_000_000) if up else unix_ns // 1_000_000_000
    return time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(seconds))


def when(unix_ns: int, now_ns: int | None = None) -> str:
    """A wall-clock instant in local time, its zone named, with how far it is from now: ``2026-11-26 22:10:05 UTC
    (4 min ago)`` (the kernel's own messages give instants in UTC: the zone tells a reviewer which is which)."""
    if not unix_ns:
        return "-"
    now_ns = time.time_ns() if now_ns is None else now_ns
    delta = (unix_ns - now_ns) / 1e9
    relative = f"in {duration(delta)}" if delta > 0 else f"{duration(delta)} ago"
    return f"{stamp(unix_ns, up=delta > 0)} ({relative})"


def open_private(path: str):
    """``path`` opened for writing text, a new file made owner-only (0600) whatever the umask: an export or a replay
    report holds the recorded requests the data dir keeps owner-only (0644 under the usual umask left them to every
    local user, a helper's audit). A file replaced (``--force``) keeps its mode: whoever made it chose it."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8")


def output_problem(out: str, log_dir: Path, force: bool) -> str | None:
    """Why a command must not write its output file ``out`` next to the audit log ``log_dir``, or None.

    Never inside the log directory, nor the data dir holding it (segments, checkpoints, keys, the store are the
    kernel's): `audit export --out` over a segment truncated it before reading it, and the log no longer
    verified (an operator walk-through). Not over an existing file either, unless ``force``: a report is
    written whole, and the file it replaces may be the only copy of something."""
    from .store.sqlite import DATABASE_FILE

    if out.startswith(("/dev/", "/proc/")):  # a device or the process's own streams (/dev/stdout > file.jsonl)
        return None
    target = Path(out).resolve()
    guarded = [log_dir.resolve()]
    if (guarded[0].parent / DATABASE_FILE).exists():  # (the log's folder is a data dir's)
        guarded.append(guarded[0].parent)
    for folder in guarded:
        if target == folder or folder in target.parents:
            return f"{out} is inside {folder}, which the kernel owns (its audit log, keys, store); write elsewhere"
    if target.is_file() and not force:  # (a regular file: a FIFO or a device is written as before)
        return f"{out} already exists; pass --force to replace it"
    return None
