"""TaskService: thin handlers over ``kernel.tasks.TaskRunner`` (see ``rpc.py`` for the calling convention).

An open WatchTask counts against the kernel's watch budget (``watch_budget.py``) until it ends.
"""

from __future__ import annotations

from .._proto.aios.kernel.v1 import kernel_pb2 as kpb
from ..errors import InvalidArgument
from .watch_budget import UNLIMITED, follow

SERVICE = "TaskService"


def task_handlers(runner, watches=None) -> dict:
    """``{(service, method): handler}`` for ``kernel_services.generic_handlers(implemented=...)``;
    ``watches`` (a ``WatchBudget``, shared with the other watch RPCs) caps open WatchTask calls."""
    watches = watches or UNLIMITED

    def start_task(request: kpb.StartTaskRequest, ctx) -> kpb.Task:
        if not request.HasField("request"):
            raise InvalidArgument("request is required (the DecisionRequest the task runs)")
        return runner.submit(request.request)

    def get_task(request: kpb.TaskRef, ctx) -> kpb.Task:
        return runner.get(request.task_id)

    def cancel_task(request: kpb.TaskRef, ctx) -> kpb.Task:
        return runner.cancel(request.task_id)

    def list_tasks(request: kpb.ListTasksRequest, ctx) -> kpb.ListTasksResponse:
        return runner.list(request.tenant, request.states, request.page_size, request.page_token)

    def watch_task(request: kpb.TaskRef, ctx):
        return follow(watches, "WatchTask", lambda: runner.watch(request.task_id), ctx)

    return {
        (SERVICE, "StartTask"): start_task,
        (SERVICE, "GetTask"): get_task,
        (SERVICE, "CancelTask"): cancel_task,
        (SERVICE, "WatchTask"): watch_task,
        (SERVICE, "ListTasks"): list_tasks,
    }
