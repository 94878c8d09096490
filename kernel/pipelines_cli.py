"""``aios-kernel pipelines list|upload|check``: what a running kernel decides with, and changing it safely.

::

    aios-kernel pipelines list                 # each pipeline's version and hashes, and every file it refused, with why
    aios-kernel pipelines upload examples/claims/pipelines/claims_triage.toml [--policy policy.toml]
    aios-kernel pipelines check examples/claims/pipelines/claims_triage.toml --models examples/claims/models

``check`` runs the checks a kernel's load or an upload runs — the pipeline, its policy, and the binding to the
model it names, loaded from a repository folder — with no kernel running (a pipeline author's walk-through:
binding errors showed only against a running kernel). Exit 0 when it would serve, 1 when it would be refused,
2 when it could not be checked (a file that cannot be read, no model repository folder).

An upload is validated whole (the pipeline, the policy, the model it names)
before anything changes; a refused one answers INVALID_ARGUMENT naming line
and field, exit code 1, and the running version keeps serving. An uploaded
policy replaces its file for every pipeline that reads it: it is refused,
naming the pipeline, if any other pipeline serving would not take it.

``list`` shows each refused file with why, and a serving pipeline whose file
is gone (it stops being served at the kernel's next look at the folder).

(Not under ``kernel/pipelines/``: importing that package loads the decision
flow and numpy, half a second that every ``aios-kernel`` command would pay.)
"""

from __future__ import annotations

import sys
from pathlib import Path

from .channel import kernel_channel
from .cli_support import address_flags, failed, print_json


def add_parser(sub) -> None:
    pipelines = sub.add_parser("pipelines", help="list a running kernel's pipelines, upload one, or check a file")
    commands = pipelines.add_subparsers(dest="pipelines_command", required=True, metavar="COMMAND")
    listing = commands.add_parser("list", help="pipelines serving, with versions and hashes, and files refused")
    address_flags(listing)
    listing.add_argument("--json", action="store_true", help="print the ListPipelinesResponse as JSON")
    listing.set_defaults(func=cmd_list)
    upload = commands.add_parser("upload", help="validate and activate a pipeline file (and its policy)")
    upload.add_argument("file", help="the pipeline's TOML file")
    upload.add_argument("--policy", help="the policy file it names (default: keep the kernel's copy); it replaces "
                        "that file for every pipeline reading it, so each must take it")
    address_flags(upload)
    upload.add_argument("--json", action="store_true", help="print the PipelineInfo as JSON")
    upload.set_defaults(func=cmd_upload)
    check = commands.add_parser("check", help="check a pipeline file, its policy and its model as a load does, "
                                "with no kernel running",
                                epilog="exit status: 0 a kernel would serve it, 1 it would be refused (said why), 2 it "
                                       "could not be checked (a file that cannot be read, no model repository)")
    check.add_argument("file", help="the pipeline's TOML file")
    check.add_argument("--policy", help="the policy file (default: the one the pipeline names, beside it)")
    check.add_argument("--models", help="model repository folder (default: as serve reads it: AIOS_MODELS, "
                       "else ./models)")
    check.set_defaults(func=cmd_check)


def _stub(channel):
    from ._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

    return kgrpc.AdminServiceStub(channel)


def describe(info) -> str:
    model = f"{info.model}/{info.model_version}" if info.model_version else info.model
    return (f"{info.name:20} {info.version[:16]:16} {info.hash[:12]:12}  model {model:22} "
            f"policy {info.policy_name} {info.policy_version} ({info.policy_hash[:12]}), {len(info.fields)} fields")


def cmd_list(args) -> int:
    import grpc

    from ._proto.aios.kernel.v1 import kernel_pb2 as kpb

    with kernel_channel(args.address) as channel:
        try:
            response = _stub(channel).ListPipelines(kpb.ListPipelinesRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            return failed(exc)
    if args.json:
        print_json(response)
        return 0
    for info in sorted(response.pipelines, key=lambda p: p.name):
        print(describe(info))
        print(f"  {decided(info.decisions)}")
        if info.unavailable_reason:
            print(f"  cannot decide now: {info.unavailable_reason}")
    for file, why in sorted(response.refused.items()):
        print(f"refused {file}: {why}")
    stalled = sum(1 for info in response.pipelines if info.unavailable_reason)
    print(_summary(len(response.pipelines), len(response.refused))
          + (f"; {stalled} of them cannot decide now (model not loaded)" if stalled else ""))
    return 0


def _policy_named(pipeline_toml: bytes) -> str:
    """The policy file name a pipeline's text gives ([policy].file), "" when it cannot be read."""
    import tomllib

    try:
        table = tomllib.loads(pipeline_toml.decode("utf-8")).get("policy")
    except (ValueError, RecursionError):  # (not UTF-8, not TOML, a 5,000-digit integer, a deep array)
        return ""
    named = table.get("file") if isinstance(table, dict) else ""
    return named if isinstance(named, str) else ""


def decided(counts) -> str:
    """A pipeline's DecisionCounters as one line."""
    made = counts.automated + counts.escalated + counts.fallback
    return (f"decided {made} since the start: {counts.automated} automated, {counts.escalated} escalated, "
            f"{counts.fallback} fallback; {counts.late} of them late; {counts.failed} failed")


def _summary(serving: int, refused: int) -> str:
    line = f"{serving} pipeline{'s' if serving != 1 else ''} serving"
    if refused:
        line += f", {refused} file{'s' if refused != 1 else ''} refused"
        # (only a pipeline that served before a bad edit keeps serving: with none serving there is nothing to keep)
        line += " (the versions before them, if any, keep serving)" if serving else ""
    return line


def cmd_upload(args) -> int:
    import grpc

    from ._proto.aios.kernel.v1 import kernel_pb2 as kpb

    try:
        request = kpb.UploadPipelineRequest(pipeline_toml=Path(args.file).read_bytes(),
                                            policy_toml=Path(args.policy).read_bytes() if args.policy else b"")
    except OSError as exc:
        print(f"cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    with kernel_channel(args.address) as channel:
        try:
            info = _stub(channel).UploadPipeline(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            # The kernel got bytes, not files: it names the pipeline "<upload>" and the policy by the name the
            # pipeline gives it; name the files the user gave (a walk-through: its own policy was not named).
            details = (exc.details() or "").replace("<upload>", args.file)
            named = _policy_named(request.pipeline_toml) if args.policy else ""
            if named and named != args.policy:  # (where the pipeline's [policy].file names it: that one place)
                details = details.replace(f"[policy].file: {named}:", f"[policy].file: {args.policy}:", 1)
            return failed(exc, details)
    if args.json:
        print_json(info)
    else:
        print(f"serving: {describe(info)}")
        for warning in info.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_check(args) -> int:
    from .config import load_settings
    from .models import ModelConfigError
    from .models.hub import ModelHub
    from .pipelines.binding import bind, binding_warnings
    from .pipelines.spec import PipelineError, load_pipeline
    from .policy import PolicyError, load_policy

    for path in filter(None, (args.file, args.policy)):
        # A path that cannot be read was never checked: exit 2, as policy check's (docs/operations.md), not the
        # "would be refused" of exit 1 that a script gating an upgrade acts on.
        try:
            open(path, "rb").close()  # (opened, not read: the load refuses an oversized file without reading it)
        except OSError as exc:
            print(f"{path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
            return 2
    try:
        pipeline = load_pipeline(args.file, (lambda _named: load_policy(args.policy)) if args.policy else load_policy)
    except (PipelineError, PolicyError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    root = Path(args.models or load_settings(None, {}).models)
    if not root.is_dir():
        print(f"model repository {root} {'is not a folder' if root.exists() else 'does not exist'} (set --models "
              f"or AIOS_MODELS)", file=sys.stderr)
        return 2
    hub = ModelHub(root)
    try:
        for mv in hub.load(pipeline.model):
            mv.runtime.probe()  # (what a served kernel's load-time profile notes: binding_warnings reads it)
    except ModelConfigError as exc:
        print(f"refused: {args.file}: [model].name: model {pipeline.model!r} in {root} cannot be loaded: {exc}",
              file=sys.stderr)
        return 1
    try:
        bound = bind(pipeline, hub)
    except PipelineError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    for warning in binding_warnings(bound, hub):
        print(f"warning: {warning}", file=sys.stderr)
    policy = bound.policy
    print(f"ok: {args.file}: pipeline {bound.name} {bound.label!r} ({bound.hash[:12]}), policy {policy.name} "
          f"{policy.version!r} ({policy.hash[:12]}), model {bound.model} version {bound.bound_version} from {root}: "
          f"a kernel would serve it")
    return 0
