"""``aios-kernel review list|show|claim|resolve|watch``: work the human review queue of a running kernel.

A reviewer's loop at a terminal, over ``ReviewService``::

    aios-kernel review list                                  # what waits (open and claimed), oldest first
    aios-kernel review show REVIEW_ID                        # the case, the proposed decision, the allowed actions
    aios-kernel review claim REVIEW_ID --reviewer alice      # a lease (5 min by default) so nobody else works it
    aios-kernel review claim --next --reviewer alice         # or: the oldest open case, claimed in one step
    aios-kernel review resolve REVIEW_ID --reviewer alice --action deny --comment "photos do not match"
    aios-kernel review watch --include-open                  # new cases as they are escalated, until Ctrl-C
    aios-kernel review watch --from 42                       # resume a cut watch (exit 3 names the --from)

Every command takes ``--address`` and ``--json`` (the messages as JSON, one
per line for ``list`` and ``watch``; ``list --json`` says on stderr when more
match than its ``--limit``, 50 by default, let it print).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..channel import kernel_channel
from ..cli_support import (address_flags, answer, count, decision_lines, duration, failed, hanging, json_line, nonempty,
                           listed_summary, print_json_lines, read_pages, when)
from .queue import DEFAULT_LEASE_S, MAX_LEASE_S

STATES = ("unresolved", "open", "claimed", "resolved", "all")  # "all" is the API's empty filter
WATCH_CUT = 3  # as `task watch`'s: the watch ended without a refusal; watch again (here: with --from)
WATCH_EXIT_CODES = ("exit status: 0 at --count or --timeout, 1 when the kernel refused the watch (a bad flag value, "
                    "too many watches, a --from retention passed), 3 when it ended without a refusal (the kernel "
                    "stopping, restarting or out of reach, the connection lost, the watch fallen behind): watch "
                    "again with the --from it names on stderr, which prints every review stored since the last one "
                    "printed, none twice; 130 after Ctrl-C (it names the --from too)")


def add_parser(sub) -> None:
    review = sub.add_parser("review", help="work the human review queue of a running kernel")
    commands = review.add_subparsers(dest="review_command", required=True, metavar="COMMAND")

    listing = commands.add_parser("list", help="reviews oldest first (default: open and claimed ones)")
    listing.add_argument("--state", choices=STATES, default="unresolved",
                         help="unresolved = open or claimed (default); all = every state")
    listing.add_argument("--pipeline", default="", help="only this pipeline's reviews")
    listing.add_argument("--tenant", default="", help="only this tenant's reviews")
    listing.add_argument("--limit", type=count, default=50, help="show at most this many (default 50; 0 = all)")
    _common(listing, cmd_list)

    show = commands.add_parser("show", help="one review: the case, the proposed decision, what may be done")
    show.add_argument("review_id", type=nonempty, help="as `review list` or the escalated decision shows it")
    _common(show, cmd_show)

    claim = commands.add_parser("claim", help="take a review's lease so no other reviewer works it")
    claim.add_argument("review_id", type=nonempty, nargs="?", help="as `review list` shows it (or --next)")
    claim.add_argument("--next", action="store_true",
                       help="instead of a REVIEW_ID: the oldest open review (matching --pipeline and --tenant), "
                            "claimed in one step, so reviewers working together never reach for the same case")
    claim.add_argument("--pipeline", default="", help="with --next: only this pipeline's reviews")
    claim.add_argument("--tenant", default="", help="with --next: only this tenant's reviews")
    claim.add_argument("--reviewer", type=nonempty, required=True,
                       help="who works the case (recorded with the resolution)")
    claim.add_argument("--lease", type=lease, default=0, metavar="SECONDS",
                       help=f"how long the lease lasts (default 0: the kernel's {DEFAULT_LEASE_S}; at most "
                            f"{MAX_LEASE_S}); claiming again renews it")
    _common(claim, cmd_claim)

    resolve = commands.add_parser("resolve", help="give a claimed review its final action (an audited decision)")
    resolve.add_argument("review_id", type=nonempty, help="a review you hold the lease of (`review claim`)")
    resolve.add_argument("--reviewer", type=nonempty, required=True, help="the reviewer holding the lease")
    resolve.add_argument("--action", type=nonempty, required=True, help="one of the actions `review show` lists")
    resolve.add_argument("--comment", default="", help="why (kept with the review and its audit record)")
    _common(resolve, cmd_resolve)

    watch = commands.add_parser("watch", help="print reviews as they are escalated, until Ctrl-C",
                                epilog=WATCH_EXIT_CODES)
    watch.add_argument("--pipeline", default="", help="only this pipeline's reviews")
    watch.add_argument("--tenant", default="", help="only this tenant's reviews")
    watch.add_argument("--include-open", dest="include_open", action="store_true",
                       help="first print the reviews already waiting")
    watch.add_argument("--updates", action="store_true",
                       help="also print each claim and resolution, and each lease that lapses (OPEN again)")
    watch.add_argument("--count", type=count, default=0, help="stop after this many reviews (default 0: never)")
    watch.add_argument("--from", dest="from_sequence", type=sequence, default=0, metavar="SEQ",
                       help="resume a watch that was cut: first every review stored from sequence SEQ on (what the "
                            "cut watch said on stderr: the highest it received + 1), then new ones; not with "
                            "--include-open")
    _common(watch, cmd_watch, timeout_s=0)


def sequence(text: str) -> int:
    """``--from``: a review's sequence, 0 (none) up to what the request's uint64 holds."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 (none) or more, below 2**64")
    return value


def lease(text: str) -> int:
    """``--lease``: whole seconds, 0 (the kernel's default) to MAX_LEASE_S. Checked here: past 2**32 the request
    could not even be built (a traceback), and 0 is no "no limit" here."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if not 0 <= value <= MAX_LEASE_S:
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be 0 (the kernel's {DEFAULT_LEASE_S}) to {MAX_LEASE_S} seconds")
    return value


def _common(parser: argparse.ArgumentParser, command, timeout_s: float = 10.0) -> None:
    address_flags(parser, timeout_s)
    parser.add_argument("--json", action="store_true",
                        help="print the Review as JSON (list and watch: one Review per line)")
    parser.set_defaults(func=command)


def _stub(channel):
    from .._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

    return kgrpc.ReviewServiceStub(channel)


def _timeout(args) -> float | None:
    return args.timeout or None  # 0 = no deadline (watch)


def cmd_list(args) -> int:
    import grpc

    from .._proto.aios.kernel.v1 import kernel_pb2 as kpb

    state = "" if args.state == "all" else args.state.upper()
    with kernel_channel(args.address) as channel:
        stub = _stub(channel)
        try:
            shown, more, last = read_pages(
                lambda size, token: stub.ListReviews(kpb.ListReviewsRequest(
                    pipeline=args.pipeline, tenant=args.tenant, state=state, page_size=size, page_token=token),
                    timeout=_timeout(args)),
                args.limit, lambda page: page.reviews)
        except grpc.RpcError as exc:
            return failed(exc)
    missed = last.sla_missed
    if args.json:
        print_json_lines(shown, "review", more)
        return 0
    now = time.time_ns()
    if shown:
        print(f"{'REVIEW':32}  {'STATE':8}  {'PIPELINE':16}  {'TENANT':10}  {'PROPOSED':12}  {'CONF':>5}  "
              f"{'AGE':>8}  SLA")
        for review in shown:
            print(row(review, now))
    print(f"{listed_summary(shown, 'review', lambda review: review.state.lower(), more)}; {missed} matching missed "
          "their SLA")
    return 0


def row(review, now_ns: int) -> str:
    """One review as a line of ``review list`` and ``review watch``."""
    proposed = review.proposed
    age = duration((now_ns - review.created_unix_ns) / 1e9) if review.created_unix_ns else "-"
    if withdrawn(review):
        sla = "withdrawn"
    elif review.state == "RESOLVED":
        sla = f"resolved: {review.resolved_action} by {review.resolved_by}"
        sla += " (SLA missed)" if review.sla_missed else ""
    elif not review.sla_deadline_unix_ns:
        sla = "-"
    elif review.sla_missed:
        sla = f"MISSED {duration((now_ns - review.sla_deadline_unix_ns) / 1e9)} ago"
    else:
        sla = f"due in {duration((review.sla_deadline_unix_ns - now_ns) / 1e9)}"
    if review.state == "CLAIMED":
        sla += f"; {review.claimed_by}"
    return (f"{review.review_id:32}  {review.state:8}  {_cut(review.pipeline, 16)}  {_cut(review.tenant, 10)}  "
            f"{_cut(proposed.action, 12)}  {proposed.model.confidence:5.3g}  {age:>8}  {sla}")


def _cut(text: str, width: int) -> str:
    """``text`` in a column of ``width``, a cut one ending in '…' (a cut name read as another: an author's
    walk-through)."""
    return f"{text:{width}}" if len(text) <= width else text[:width - 1] + "…"


def describe(review) -> list[str]:
    """A whole review as ``review show`` prints it."""
    now = time.time_ns()
    lines = [f"review {review.review_id}  {review.state}  pipeline {review.pipeline}"
             f"{f'  tenant {review.tenant}' if review.tenant else ''}",
             f"  created     {when(review.created_unix_ns, now)}",
             f"  SLA due     {when(review.sla_deadline_unix_ns, now)}{'  MISSED' if review.sla_missed else ''}"]
    if review.state == "CLAIMED":
        lines.append(f"  claimed by  {review.claimed_by} until {when(review.lease_expires_unix_ns, now)}")
    if review.task_id:
        waits = " waits on this review" if review.state != "RESOLVED" else ""
        lines.append(f"  task        {review.task_id}{waits}")
    request = review.request
    if request.fields or request.text_fields or review.defaults or review.text_digests:
        lines.append("  case:")
        for name in sorted({*request.fields, *review.defaults}):
            if name in request.fields:
                lines.append(f"    {name} = {_value(request.fields[name])}")
            else:  # left out: the decision used the pipeline's default (the audit record's defaulted_fields)
                lines.append(f"    {name} = {_value(review.defaults[name])}  (default: not in the request)")
        for name in sorted(request.text_fields):
            lines.append(f"    {name} (text) = {json.dumps(request.text_fields[name], ensure_ascii=False)}")
        for name in sorted(review.text_digests):  # reopened from its audit record, which keeps no text
            lines.append(f"    {name} (text): not kept; this review was reopened from the audit log after a crash, "
                         f"which has only its digest {review.text_digests[name]}")
    proposed = decision_lines(review.proposed)
    proposed[1:1] = _scores(review.proposed)  # (under the action and its confidence)
    lines.append("  proposed:   " + "\n  ".join(proposed))
    if withdrawn(review):
        lines.append(f"  withdrawn by the kernel at {when(review.resolved_unix_ns, now)}: "
                     f"{review.comment.removeprefix('withdrawn: ')}")
    elif review.state == "RESOLVED":
        lines.append(f"  resolved:   {review.resolved_action} by {review.resolved_by} at {when(review.resolved_unix_ns, now)}")
        if review.comment:
            lines.append(hanging("    comment: ", review.comment))
        if review.resolution.request_id:
            lines.append(f"    recorded as audit #{review.resolution.audit_sequence}")
    else:
        lines.append(f"  actions:    {', '.join(review.actions)}")
    return lines


def _scores(decision) -> list[str]:
    """The model's score for each class, highest first, and the policy's adjustment: what the reviewer weighs
    (the confidence alone hid how close the runner-up was)."""
    model = decision.model
    lines = []
    if model.class_scores:
        ranked = sorted(model.class_scores.items(), key=lambda item: (-item[1], item[0]))
        lines.append("  scores: " + ", ".join(f"{label} {score:.3f}" for label, score in ranked))
    if decision.score_adjustment:
        lines.append(f"  score adjustment {decision.score_adjustment:+g} (the fired rules' adjust)")
    return lines


def withdrawn(review) -> bool:
    """Taken off the queue by the kernel (its task was cancelled): RESOLVED with no action."""
    return review.state == "RESOLVED" and not review.resolved_action


def _value(value) -> str:
    kind = value.WhichOneof("kind")
    return "null" if kind is None else json.dumps(getattr(value, kind))


def _one(args, call, request) -> int:
    """Make one unary call and print the Review it answers."""
    return answer(args, lambda channel: getattr(_stub(channel), call)(request, timeout=_timeout(args)), describe)


def cmd_show(args) -> int:
    from .._proto.aios.kernel.v1 import kernel_pb2 as kpb

    return _one(args, "GetReview", kpb.ReviewRef(review_id=args.review_id))


def cmd_claim(args) -> int:
    from .._proto.aios.kernel.v1 import kernel_pb2 as kpb

    wrong = _claim_flags_wrong(args)
    if wrong:
        print(f"review claim: {wrong}", file=sys.stderr)
        return 2
    if args.next:
        return _one(args, "ClaimNextReview", kpb.ClaimNextReviewRequest(
            pipeline=args.pipeline, tenant=args.tenant, reviewer=args.reviewer, lease_seconds=args.lease))
    return _one(args, "ClaimReview", kpb.ClaimReviewRequest(review_id=args.review_id, reviewer=args.reviewer,
                                                            lease_seconds=args.lease))


def _claim_flags_wrong(args) -> str:
    """What is wrong with ``review claim``'s flags ('' if nothing): a REVIEW_ID or --next, not both."""
    if args.next and args.review_id:
        return f"give a REVIEW_ID ({args.review_id}) or --next, not both"
    if not args.next and not args.review_id:
        return "give the REVIEW_ID to claim, or --next for the oldest open review"
    if not args.next and (args.pipeline or args.tenant):
        return "--pipeline and --tenant choose among open reviews: use them with --next (a REVIEW_ID names one)"
    return ""


def cmd_resolve(args) -> int:
    from .._proto.aios.kernel.v1 import kernel_pb2 as kpb

    return _one(args, "ResolveReview", kpb.ResolveReviewRequest(review_id=args.review_id, reviewer=args.reviewer,
                                                                action=args.action, comment=args.comment))


def cmd_watch(args) -> int:
    """Print reviews as WatchReviews sends them; exit as ``WATCH_EXIT_CODES`` says."""
    import grpc

    from .._proto.aios.kernel.v1 import kernel_pb2 as kpb

    if args.from_sequence and args.include_open:
        print(f"review watch: --from {args.from_sequence} resumes a watch, --include-open starts one: give one of "
              "them (a resumed watch prints every review stored since, waiting or not)", file=sys.stderr)
        return 2
    request = kpb.WatchReviewsRequest(pipeline=args.pipeline, tenant=args.tenant, include_open=args.include_open,
                                      updates=args.updates, from_sequence=args.from_sequence)
    seen, resume = 0, args.from_sequence  # resume: where a watch again starts (an update's sequence is older)
    with kernel_channel(args.address) as channel:
        stream = _stub(channel).WatchReviews(request, timeout=_timeout(args))
        try:
            for review in stream:
                print(json_line(review) if args.json else row(review, time.time_ns()), flush=True)
                resume = max(resume, review.sequence + 1)
                seen += 1
                if args.count and seen >= args.count:
                    stream.cancel()
                    break
        except KeyboardInterrupt:
            stream.cancel()
            print("stopped watching" + (f"; resume with --from {resume}" if resume else ""), file=sys.stderr)
            return 130
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # --timeout: the watch ran its time
                return 0
            failed(exc)
            if not _watch_cut(exc):
                return 1
            print("the watch ended without a refusal; " + (
                f"resume with --from {resume} (every review stored since the last one printed, then new ones)"
                if resume else "watch again"), file=sys.stderr)
            return WATCH_CUT
    return 0


def _watch_cut(exc) -> bool:
    """Whether a watch ended without the kernel refusing it: UNAVAILABLE (the kernel stopping, restarting or out of
    reach; the connection lost), or RESOURCE_EXHAUSTED that is no refusal of the watch budget's (those carry
    retry-after-ms): the watch fell behind."""
    import grpc

    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return True
    trailers = dict(exc.trailing_metadata() or ())
    return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry-after-ms" not in trailers
