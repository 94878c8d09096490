"""``aios-kernel task start|get|cancel|watch|list``: durable tasks on a running kernel, over ``TaskService``::

    aios-kernel task start claims_triage --field claim_amount=90000 --idempotency-key claim-7781 --wait
    aios-kernel task get TASK_ID          # state, attempts, every transition, the decision or the error
    aios-kernel task watch TASK_ID        # one line per state change until it is final
    aios-kernel task cancel TASK_ID
    aios-kernel task list [--state running] [--tenant acme]   # oldest first; default: those not final yet

``start --wait`` and ``watch`` exit 0 when the task SUCCEEDED, 1 when it
FAILED or was CANCELLED, and 3 when the watch ended first (the kernel
stopping, the connection lost, ``watch``'s ``--timeout``; ``start``'s
bounds the start call only: ``--wait`` follows however long the review
takes); Ctrl-C stops watching and leaves the task running in the kernel (it
is durable: ``task get`` finds it later).
"""

from __future__ import annotations

import sys
import time

from ..channel import kernel_channel
from ..cli_support import (address_flags, answer, count, decision_lines, duration, enum_name, failed, json_line,
                           listed_summary, nonempty, print_json_lines, read_pages, request_flags, request_or_say_why,
                           show, stamp, when)


WAIT_EXIT_CODES = ("exit status (with --wait, and watch): 0 when the task SUCCEEDED, 1 when it FAILED or was "
                   "CANCELLED or a call was refused, 3 when the watch ended before the task was final (the kernel "
                   "stopping, the connection lost, the watch fallen behind, task watch's --timeout: the task goes on; "
                   "watch it again), 130 after Ctrl-C "
                   "(the task goes on in the kernel)")
UNFINISHED = ("queued", "running", "waiting_for_review")
LIST_STATES = ("unfinished", *UNFINISHED, "succeeded", "failed", "cancelled", "all")
WATCH_CUT = 3  # (a script told "FAILED" and "the kernel restarted" apart only by parsing stderr: a workflow audit)


def add_parser(sub) -> None:
    task = sub.add_parser("task", help="start, follow or cancel durable tasks on a running kernel")
    commands = task.add_subparsers(dest="task_command", required=True, metavar="COMMAND")

    start = commands.add_parser("start", help="run a pipeline as a durable task (survives restarts; may wait for review)",
                                epilog=WAIT_EXIT_CODES)
    request_flags(start)
    start.add_argument("--wait", action="store_true",
                       help="follow the task until it is final, however long a review takes (--timeout bounds the start "
                            "call only; Ctrl-C stops watching; the task goes on)")
    _common(start, cmd_start)

    listing = commands.add_parser("list", help="tasks oldest first (default: those not final yet)")
    listing.add_argument("--state", action="append", choices=LIST_STATES, metavar="STATE",
                         help=f"only tasks in this state (repeat for several): {', '.join(LIST_STATES)}; default "
                              "unfinished = queued, running or waiting_for_review")
    listing.add_argument("--tenant", default="", help="only this tenant's tasks")
    listing.add_argument("--limit", type=count, default=50, help="show at most this many (default 50; 0 = all)")
    _common(listing, cmd_list)

    for verb, command, text in (("get", cmd_get, "a task's state, history and result"),
                                ("cancel", cmd_cancel, "cancel a task that is not final yet"),
                                ("watch", cmd_watch, "print each state change until the task is final")):
        parser = commands.add_parser(verb, help=text, epilog=WAIT_EXIT_CODES if verb == "watch" else None)
        parser.add_argument("task_id", type=nonempty, help="as `task start` printed it")
        _common(parser, command, timeout_s=0 if verb == "watch" else 10.0)


def _common(parser, command, timeout_s: float = 10.0) -> None:
    address_flags(parser, timeout_s)
    parser.add_argument("--json", action="store_true", help="print the Task as JSON (watch: one Task per line)")
    parser.set_defaults(func=command)


def _stub(channel):
    from .._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

    return kgrpc.TaskServiceStub(channel)


def describe(task) -> list[str]:
    """A task as ``task get`` prints it."""
    now = time.time_ns()
    request = task.request
    lines = [f"task {task.task_id}  {enum_name(task, 'state')}  pipeline {request.pipeline}"
             f"{f'  tenant {request.tenant}' if request.tenant else ''}",
             f"  started     {when(task.created_unix_ns, now)}; {task.attempts} run{'s' if task.attempts != 1 else ''}"]
    if request.idempotency_key:
        lines.append(f"  idempotency key {request.idempotency_key}")
    if task.review_id:
        lines.append(f"  review      {task.review_id}")
    if task.next_attempt_unix_ns:
        lines.append(f"  next run    {when(task.next_attempt_unix_ns, now)}")
    for step in task.history:
        detail = f"  {step.detail}" if step.detail else ""
        lines.append(f"    {stamp(step.at_unix_ns)}  "
                     f"{_state(step.state):18}{detail}")
    if task.error:
        lines.append(f"  error: {task.error}")
    if task.HasField("decision"):
        lines.append("  decision:   " + "\n  ".join(decision_lines(task.decision)))
    return lines


def _state(value: int) -> str:
    from .._proto.aios.kernel.v1 import kernel_pb2 as kpb

    return kpb.TaskState.Name(value)


def _final_code(task) -> int:
    """0 for SUCCEEDED (or a stream that ended before the task was final), 1 for FAILED or CANCELLED."""
    from .._proto.aios.kernel.v1 import kernel_pb2 as kpb

    return 1 if task.state in (kpb.FAILED, kpb.CANCELLED) else 0


def cmd_start(args) -> int:
    import grpc

    from .._proto.aios.kernel.v1 import kernel_pb2 as kpb

    request = request_or_say_why(args)
    if request is None:
        return 2
    with kernel_channel(args.address) as channel:
        try:
            task = _stub(channel).StartTask(kpb.StartTaskRequest(request=request), timeout=args.timeout or None)
        except grpc.RpcError as exc:
            return failed(exc)
        if not args.json:  # (--json: the Task says it, in "replayed")
            print(_started_line(task, request.idempotency_key, following=args.wait))
        if not args.wait:
            show(args, task, describe)
            return 0
        return _follow(args, channel, task.task_id, timeout_s=None)  # --timeout was the start call's


def _started_line(task, key: str, following: bool) -> str:
    """The line after StartTask: the task started, or, when the idempotency key had already started it
    (the kernel says so: ``Task.replayed``), when that was; a re-run of the same command starts nothing
    and shows (``--wait``: follows) the old task, whose states print with their own times."""
    if task.replayed:
        return (f"task {task.task_id} was already started with idempotency key {key!r} "
                f"{when(task.created_unix_ns, time.time_ns())}{'; following it' if following else ''}")
    return f"task {task.task_id} started"


def _one(args, call: str) -> int:
    from .._proto.aios.kernel.v1 import kernel_pb2 as kpb

    ref = kpb.TaskRef(task_id=args.task_id)
    return answer(args, lambda channel: getattr(_stub(channel), call)(ref, timeout=args.timeout or None), describe)


def cmd_list(args) -> int:
    import grpc

    from .._proto.aios.kernel.v1 import kernel_pb2 as kpb

    chosen = args.state or ["unfinished"]
    states = [] if "all" in chosen else sorted({kpb.TaskState.Value(name.upper()) for choice in chosen
                                                for name in (UNFINISHED if choice == "unfinished" else [choice])})
    with kernel_channel(args.address) as channel:
        stub = _stub(channel)
        try:
            shown, more, _last = read_pages(
                lambda size, token: stub.ListTasks(kpb.ListTasksRequest(
                    tenant=args.tenant, states=states, page_size=size, page_token=token),
                    timeout=args.timeout or None),
                args.limit, lambda page: page.tasks)
        except grpc.RpcError as exc:
            return failed(exc)
    if args.json:
        print_json_lines(shown, "task", more)
        return 0
    now = time.time_ns()
    if shown:
        print(f"{'TASK':32}  {'STATE':18}  {'PIPELINE':16}  {'TENANT':10}  {'RUNS':>4}  {'AGE':>8}  LAST CHANGE")
    for task in shown:
        age = duration((now - task.created_unix_ns) / 1e9) if task.created_unix_ns else "-"
        changed = f"{duration((now - task.updated_unix_ns) / 1e9)} ago" if task.updated_unix_ns else "-"
        print(f"{task.task_id:32}  {_state(task.state):18}  {task.request.pipeline[:16]:16}  "
              f"{task.request.tenant[:10]:10}  {task.attempts:>4}  {age:>8}  {changed}")
    summary = listed_summary(shown, "task", lambda task: _state(task.state), more)
    if not shown and not args.state:  # (a task that just finished is in none: "0 tasks" read as "none exist")
        summary += " not final yet (--state all lists finished ones too)"
    print(summary)
    return 0


def cmd_get(args) -> int:
    return _one(args, "GetTask")


def cmd_cancel(args) -> int:
    return _one(args, "CancelTask")


def cmd_watch(args) -> int:

    with kernel_channel(args.address) as channel:
        return _follow(args, channel, args.task_id, timeout_s=args.timeout or None)


def _follow(args, channel, task_id: str, timeout_s: float | None) -> int:
    """Print each state of ``task_id`` as WatchTask sends it; the whole task once it is final."""
    import grpc

    from .._proto.aios.kernel.v1 import kernel_pb2 as kpb

    stream = _stub(channel).WatchTask(kpb.TaskRef(task_id=task_id), timeout=timeout_s)
    last = None
    try:
        for task in stream:
            last = task
            if args.json:
                print(json_line(task), flush=True)
            else:
                step = task.history[-1] if task.history else None
                detail = f"  {step.detail}" if step is not None and step.detail else ""
                at = step.at_unix_ns if step is not None else time.time_ns()  # when it happened, not when seen
                print(f"{stamp(at)}  {_state(task.state):18}{detail}", flush=True)
    except KeyboardInterrupt:
        stream.cancel()
        print(f"stopped watching; task {task_id} goes on in the kernel", file=sys.stderr)
        return 130
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout_s:
            print(f"stopped watching after {timeout_s:g} s; task {task_id} goes on in the kernel", file=sys.stderr)
            return WATCH_CUT
        failed(exc)
        cut = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)  # (the kernel stopping; fell behind)
        if exc.code() in cut and last is not None:  # (it was watching: not a refusal of the watch)
            print(f"the watch ended before task {task_id} was final; it goes on in the kernel: watch it again",
                  file=sys.stderr)
            return WATCH_CUT
        return 1
    if last is None:
        return 0
    if not args.json and last.HasField("decision"):
        print("\n".join(decision_lines(last.decision)))
    if not args.json and last.error:
        print(f"error: {last.error}")
    return _final_code(last)
