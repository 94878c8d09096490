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
import sys
import time

DEFAULT_ADDRESS = "127.0.0.1:8001"


def address_flags(parser: argparse.ArgumentParser, timeout_s: float = 10.0) -> None:
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help=f"kernel address (default {DEFAULT_ADDRESS})")
    parser.add_argument("--timeout", type=float, default=timeout_s, help=f"seconds a call may take (default {timeout_s:g})")


def request_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of one DecisionRequest (``decide`` and ``task start``)."""
    parser.add_argument("pipeline")
    parser.add_argument("--field", action="append", default=[], metavar="NAME=VALUE",
                        help="a request field; VALUE is read as JSON when it is a JSON scalar (12, 0.5, true, \"12\")")
    parser.add_argument("--text", action="append", default=[], metavar="NAME=TEXT", help="a free-text field")
    parser.add_argument("--tenant", default="")
    parser.add_argument("--idempotency-key", dest="idempotency_key", default="",
                        help="the same key and request again returns the first answer instead of deciding twice")
    parser.add_argument("--request-id", dest="request_id", default="")


def request_from_flags(args):
    """The DecisionRequest ``request_flags`` describe; ValueError names a malformed flag."""
    from .decision_client import make_request, parse_cli_value

    fields, text = {}, {}
    for target, pairs, flag in ((fields, args.field, "--field"), (text, args.text, "--text")):
        for pair in pairs:
            name, sep, value = pair.partition("=")
            if not sep or not name:
                raise ValueError(f"{flag} {pair!r}: expected NAME=VALUE")
            target[name] = parse_cli_value(value) if target is fields else value
    options = {"tenant": args.tenant, "idempotency_key": args.idempotency_key, "request_id": args.request_id}
    return make_request(args.pipeline, fields, text, **{k: v for k, v in options.items() if v})


def failed(exc) -> int:
    """A refused call (``grpc.RpcError``) as one line on stderr; exit code 1."""
    print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1


def print_json(message) -> None:
    from google.protobuf import json_format

    print(json_format.MessageToJson(message, preserving_proto_field_name=True))


def enum_name(message, field: str) -> str:
    value = getattr(message, field)
    return message.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[value].name


def decision_lines(decision) -> list[str]:
    """A Decision as a person reads it: action and outcome, the rules, escalation, where it is recorded."""
    model = decision.model
    lines = [f"{decision.action}  ({enum_name(decision, 'outcome')}; model {model.model_name}/{model.model_version} "
             f"confidence {model.confidence:.3f})"]
    lines += [f"  rule {reason.rule_id}: {reason.description}" for reason in decision.reasons]
    lines += [f"  escalated: {why}" for why in decision.escalation_reasons]
    if decision.review_id:
        lines.append(f"  review {decision.review_id}")
    lines.append(f"  request {decision.request_id}, policy {decision.policy_name} {decision.policy_version} "
                 f"({decision.policy_hash[:12]}), audit #{decision.audit_sequence}")
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


def when(unix_ns: int, now_ns: int | None = None) -> str:
    """A wall-clock instant in local time with how far it is from now: ``2026-11-26 22:10:05 (4 min ago)``."""
    if not unix_ns:
        return "-"
    now_ns = time.time_ns() if now_ns is None else now_ns
    delta = (unix_ns - now_ns) / 1e9
    relative = f"in {duration(delta)}" if delta > 0 else f"{duration(delta)} ago"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(unix_ns / 1e9))} ({relative})"
