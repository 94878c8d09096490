"""``aios-kernel``: serve, demo, models, infer, decide, review, task, pipelines, audit, policy.

Each subcommand is a small function taking the parsed arguments and
returning an exit code; the larger families live beside what they drive
(``review/cli.py``, ``tasks/cli.py``, ``audit/cli.py``, ``policy/cli.py``)
and share ``cli_support``.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from . import __version__, grpc_io, pipelines_cli
from .cli_support import (address, address_flags, answer, decision_lines, failed, nonempty, positive, request_flags,
                          request_or_say_why, seconds)
from .config import SettingsError, load_settings
from .errors import KernelError
from .observability import setup_logging
from .review import cli as review_cli
from .tasks import cli as task_cli

log = logging.getLogger("aios.cli")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / "examples" / "claims"


def _server_flags(parser: argparse.ArgumentParser, demo: bool = False) -> None:
    """The settings flags of ``serve``; ``demo`` says the demo's own defaults (it serves the bundled example
    on any free port with a throw-away data dir unless told otherwise)."""
    parser.add_argument("--config", help="kernel.toml with settings (flags and AIOS_* variables override it)")
    parser.add_argument("--models", help="model repository folder (default: " +
                        ("the bundled claims models, built on first use)" if demo else "./models)"))
    parser.add_argument("--pipelines", help="pipeline folder (default: " +
                        ("the bundled claims pipelines)" if demo else "./pipelines)"))
    parser.add_argument("--data-dir", dest="data_dir", help="audit log, keys and the task/review store (default: " +
                        ("a new temporary folder, named at the end)" if demo else "./var)"))
    parser.add_argument("--audit-mode", dest="audit_mode", choices=("fsync", "async", "off"),
                        help="fsync: a decision is acknowledged once its record is on disk (default); async: "
                             "written, not yet synced (a power cut can lose the newest); off: no audit (benchmarks only)")
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gRPC port (default " +
                        ("0: any free port)" if demo else "8001; 0 = any free port)"))
    parser.add_argument("--front-end", dest="front_end", choices=("auto", "sync", "aio"),
                        help="gRPC front end (default auto: aio when a model runs on a GPU, else sync)")
    parser.add_argument("--workers", type=int, help="handler threads of the sync front end, and its limit on calls in "
                                                   "progress: more are refused at once (default 512)")
    parser.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING or ERROR")


def _settings(args, **extra):
    keys = ("models", "pipelines", "data_dir", "audit_mode", "host", "port", "front_end", "workers", "log_level")
    overrides = {key: getattr(args, key, None) for key in keys}
    overrides.update(extra)
    return load_settings(args.config, overrides)


# What keeps a kernel from starting that is the operator's to fix: a port or data directory in use, a
# log that does not verify, a store written by a newer kernel, a folder that cannot be written.
CANNOT_START = (OSError, KernelError)


def _cannot_start(exc: BaseException) -> int:
    """Say in one line why the kernel did not start; exit code 2. A bug (INTERNAL) keeps its traceback."""
    if isinstance(exc, KernelError) and exc.code == "INTERNAL":
        raise exc
    log.error("%s", exc.message if isinstance(exc, KernelError) else exc)
    return 2


EX_TEMPFAIL = 75  # (sysexits.h) the kernel stopped on a fail-stop of its audit log or store: restart it once fixed
SIGNAL_CHECK_S = 0.25  # how often the waiting main thread looks for a signal another thread received


class _StopSignals:
    """SIGTERM/SIGINT/SIGHUP handlers, installed before the kernel starts: a signal during a slow start (an
    orchestrator's, a Ctrl-C) stops it as soon as the start ends, with a clean stop on the log, instead of the
    default action's abrupt end (which left the log as a crash leaves it: crash audit, 2026-11-27).

    SIGHUP too: a terminal closing on a kernel run in it (`make serve` over SSH) would otherwise end it at
    once, cutting the calls in flight; pipelines reload on their own and models through the repository API,
    so there is nothing for a hang-up to reload."""

    def __init__(self):
        self.stop = threading.Event()
        self.received: list[str] = []
        self.server = None  # set once started
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._handler)

    def _handler(self, signum, frame) -> None:
        self.received.append(signal.Signals(signum).name)
        if self.stop.is_set():
            if self.server is None:
                log.warning("%s received again: the kernel is still starting; it stops as soon as the start ends",
                            self.received[-1])
            else:  # a second signal during the drain: the operator will not wait for it
                log.warning("%s received again: stopping now; calls still in progress are cancelled",
                            self.received[-1])
                # (On another thread: this handler may run while the main thread is inside gRPC's stop.)
                threading.Thread(target=self.server.hurry, name="aios-hurry", daemon=True).start()
        self.stop.set()

    def serve(self, server, ready: str) -> int:
        """Print ``ready`` (unless a signal came during the start), block until a signal, then drain in-flight
        calls and stop; exit code 0. A script that signals as soon as it reads the line gets a drain."""
        self.server = server
        if self.stop.is_set():
            log.info("%s received while starting: stopping without serving", self.received[0])
            server.stop()
            return 0 if server.stopped_cleanly else 1
        print(ready, flush=True)
        # Waking now and then: a signal the OS delivers to another thread (gRPC's, onnxruntime's) does not
        # interrupt this wait, and Python runs its handler only once this thread executes bytecode again.
        exit_on_fail_stop = server.settings.exit_on_fail_stop
        while not self.stop.wait(SIGNAL_CHECK_S):
            if exit_on_fail_stop and server.fail_stopped.is_set():
                log.error("exit_on_fail_stop: stopping the kernel, exit code %d, for its supervisor to restart it "
                          "once the fault above is fixed", EX_TEMPFAIL)
                server.stop()
                return EX_TEMPFAIL
        log.info("%s received: draining in-flight calls (up to %.0f s; a second signal stops at once), then "
                 "stopping", self.received[0], server.drain_limit_s())
        server.stop()
        # 1 when a step of the stop failed (its "kernel stopping" record or final checkpoint not written: a full
        # disk): a supervisor reading 0 took it for a clean stop (a crash audit).
        return 0 if server.stopped_cleanly else 1


def cmd_serve(args) -> int:
    # First: importing the server (grpc, onnxruntime, numpy) takes seconds, and a signal then took the
    # default action (exit 143, a docs audit) where the start promises a clean stop.
    signals = _StopSignals()
    settings = _settings(args)
    grpc_io.choose(settings.front_end, settings.grpc_iomgr)  # before grpc is imported (by .server)
    from .server import KernelServer, raise_descriptor_limit

    setup_logging(settings.log_level)
    raised = raise_descriptor_limit()  # (before the start: the server's threads and descriptors come after it)
    if raised is not None:
        log.info("open-file limit raised from %d to %d (its hard limit)", *raised)
    if not Path(settings.models).is_dir():
        what = "is a file, not a folder" if Path(settings.models).exists() else "does not exist"
        log.error("model repository %s %s (set --models, AIOS_MODELS or models in kernel.toml)", settings.models, what)
        return 2
    try:
        server = KernelServer(settings)
        server.start()
    except CANNOT_START as exc:
        return _cannot_start(exc)
    # A line for scripts and tests to wait on, printed once the port accepts calls (and signals drain).
    return signals.serve(server, f"AIOS kernel ready on {settings.host}:{server.port}")


def _print_index(entries) -> None:
    print(f"{'model':28} {'version':8} {'state':12} reason")
    for entry in entries:
        print(f"{entry.name:28} {entry.version or '-':8} {entry.state:12} {entry.reason}")


def cmd_models_list(args) -> int:
    if args.address:
        if args.models:  # (a walk-through: it was ignored without a word)
            print("aios-kernel models list: give --address (a running kernel's models) or --models (a repository "
                  "folder), not both", file=sys.stderr)
            return 2
        import grpc

        from .oip_client import OipClient

        with OipClient(args.address, timeout=args.timeout) as client:
            try:
                _print_index(client.repository_index().models)
            except grpc.RpcError as exc:
                return failed(exc)
        return 0
    from .models import ModelConfigError
    from .models import config as model_config
    from .models.hub import ModelHub

    # The folder serve would read: --models, else AIOS_MODELS or --config's models, else ./models.
    root = Path(args.models or _settings(args).models)
    if not root.is_dir():  # a command-line path that is not there: exit 2, as for serve --models
        print(f"model repository {root} {'is not a folder' if root.exists() else 'does not exist'} (set --models, "
              f"AIOS_MODELS or models in kernel.toml; --address lists a running kernel's)", file=sys.stderr)
        return 2
    found = ModelHub(root).scan()
    if not found:
        print(f"no models under {root} (expected <name>/<version>/model.onnx)")
        return 1
    print(f"{'model':28} {'version':8} {'max_batch':>9}  inputs -> outputs")
    status = 0
    for name, folder in found.items():
        # Files the kernel does not read (kernel/models/config.py unread()): refused or loaded without them.
        for unread in model_config.unread(root / name):
            verdict = "invalid" if unread.refused else "warning"
            print(f"{name:28} {'-':8} {'!':>9}  {verdict}: {unread.path} is not read: {unread.brief}")
            status = 1
        if not folder.version_folders:  # nothing to list per version: say why once
            print(f"{name:28} {'-':8} {'!':>9}  unavailable: {folder.problem}")
            status = 1
        for version in folder.version_folders:
            if version in folder.skipped:
                print(f"{name:28} {version:8} {'!':>9}  unavailable: {folder.skipped[version]}")
                status = 1
                continue
            toml = root / name / version / "model.toml"
            if not toml.is_file():
                print(f"{name:28} {version:8} {'?':>9}  (no model.toml: derived from the graph at load)")
                continue
            try:
                config = model_config.load(toml, name, version)
            except ModelConfigError as exc:
                print(f"{name:28} {version:8} {'!':>9}  invalid: {exc}")
                status = 1
                continue
            ins = ", ".join(f"{s.name}:{s.datatype.name}{list(config.full_shape(s))}" for s in config.inputs)
            outs = ", ".join(f"{s.name}:{s.datatype.name}{list(config.full_shape(s))}" for s in config.outputs)
            print(f"{name:28} {version:8} {config.max_batch_size:>9}  {ins} -> {outs}")
    return status


def cmd_models_change(args) -> int:
    """``models load|unload NAME``: Triton's repository API (RepositoryModelLoad/Unload) from the command line."""
    import grpc

    from ._proto.inference import grpc_service_pb2 as pb
    from .oip_client import OipClient

    with OipClient(args.address, timeout=args.timeout) as client:
        try:
            if args.verb == "load":
                client.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=args.model), timeout=args.timeout)
            else:
                client.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=args.model),
                                                  timeout=args.timeout)
            states = [e for e in client.repository_index().models if e.name == args.model]
        except grpc.RpcError as exc:
            return failed(exc)
    _print_index(states)
    return 0


def cmd_infer(args) -> int:
    import grpc
    import numpy as np

    from .models import datatypes
    from .oip_client import OipClient

    try:
        payload = json.loads(args.input)
    except json.JSONDecodeError as exc:
        print(f"--input is not JSON: {exc}", file=sys.stderr)
        return 2
    with OipClient(args.address, timeout=args.timeout) as client:
        try:
            meta = client.metadata(args.model, args.version)
            if not isinstance(payload, dict):  # a bare array feeds the only input
                if len(meta.inputs) != 1:
                    print(f"model {args.model} has {len(meta.inputs)} inputs: pass an object {{name: array}}", file=sys.stderr)
                    return 2
                payload = {meta.inputs[0].name: payload}
            types = {t.name: datatypes.from_name(t.datatype) for t in meta.inputs}
            arrays = {}
            for name, value in payload.items():
                if name not in types:
                    print(f"model {args.model} has no input {name!r}; inputs: {sorted(types)}", file=sys.stderr)
                    return 2
                try:
                    arrays[name] = np.array(value, dtype=types[name].numpy)
                except (TypeError, ValueError) as exc:  # ragged rows, text in a number tensor, ...
                    print(f"--input {name}: not a {types[name].name} array: {exc}", file=sys.stderr)
                    return 2
            outputs = client.infer(args.model, arrays, args.version)
        except grpc.RpcError as exc:
            return failed(exc)
    print(json.dumps({name: _json_safe(value.tolist()) for name, value in outputs.items()}))
    return 0


def _json_safe(value):
    """NaN and infinities as the strings numpy prints for them: JSON has no such numbers."""
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value).replace("inf", "Infinity").replace("nan", "NaN")
    return value


def cmd_decide(args) -> int:
    from ._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc

    request = request_or_say_why(args)
    if request is None:
        return 2
    return answer(args, lambda channel: kgrpc.DecisionServiceStub(channel).Decide(request, timeout=args.timeout),
                  decision_lines)


def cmd_demo(args) -> int:
    from .demo import run_demo

    settings = _settings(args, models=args.models or str(DEMO_DIR / "models"), port=args.port if args.port is not None else 0)
    setup_logging(settings.log_level)
    try:
        return run_demo(settings, requests=args.requests, concurrency=args.concurrency)
    except CANNOT_START as exc:
        return _cannot_start(exc)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="aios-kernel", description="AIOS Kernel: gRPC inference and decisions")
    parser.add_argument("--version", action="version", version=f"aios-kernel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve the model repository over gRPC until SIGTERM",
                           description="Serve the model repository and pipelines over gRPC until Ctrl-C, SIGTERM or "
                                       "SIGHUP, which drain calls in flight first. Settings: --config kernel.toml, "
                                       "AIOS_* variables, then these flags (README, Settings).")
    _server_flags(serve)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="serve the bundled claims demo and send it a burst of traffic",
                          description="Serve the bundled claims demo in this process (building its models if "
                                      "needed), send it a burst of decisions over DecideStream, and show the "
                                      "automated/escalated split, the rules that decided and the audit log's "
                                      "verification. Its data dir is a new temporary folder unless --data-dir "
                                      "names one; it is kept, with the cases waiting for review.")
    _server_flags(demo, demo=True)
    demo.add_argument("--requests", type=positive, default=2000, help="requests in the burst (default 2000)")
    demo.add_argument("--concurrency", type=positive, default=8,
                      help="DecideStreams open at once, each sending its share of the claims as fast as it is "
                           "taken (default 8); not requests in flight: each stream keeps many")
    demo.set_defaults(func=cmd_demo)

    models = sub.add_parser("models", help="inspect a model repository")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    listing = models_sub.add_parser("list", help="list models, versions and tensors",
                                    epilog="exit status: 0 when every model can be served, 1 when one cannot (its "
                                           "reason is listed), 2 when the folder does not exist")
    listing.add_argument("--models", help="repository folder (default: as serve reads it: AIOS_MODELS, "
                                          "--config's models, else ./models)")
    listing.add_argument("--config", help="kernel.toml whose models folder to read")
    listing.add_argument("--address", type=address, help="ask a running kernel at HOST:PORT instead of reading the folder")
    listing.add_argument("--timeout", type=seconds, default=10.0, help="seconds the call may take (default 10)")
    listing.set_defaults(func=cmd_models_list)
    for verb, text in (("load", "load (or reload from disk) a model of the running kernel's repository"),
                       ("unload", "unload a model from the running kernel (calls in flight finish first)")):
        command = models_sub.add_parser(verb, help=text)
        command.add_argument("model", type=nonempty, help="a model folder's name in the kernel's repository")
        address_flags(command, timeout_s=120.0 if verb == "load" else 30.0)
        command.set_defaults(func=cmd_models_change, verb=verb)

    infer = sub.add_parser("infer", help="send one inference request to a running kernel")
    infer.add_argument("model", type=nonempty, help="a loaded model's name (aios-kernel models list --address ...)")
    infer.add_argument("--input", required=True, help='JSON: {"INPUT": [[...]]}, or a bare array for a one-input model')
    infer.add_argument("--version", default="", help="model version (default: latest)")
    address_flags(infer)
    infer.set_defaults(func=cmd_infer)

    decide = sub.add_parser("decide", help="ask a running kernel for one decision")
    request_flags(decide)
    decide.add_argument("--json", action="store_true", help="print the whole Decision as JSON")
    address_flags(decide)
    decide.set_defaults(func=cmd_decide)

    review_cli.add_parser(sub)
    task_cli.add_parser(sub)
    pipelines_cli.add_parser(sub)

    # audit verify|export: every word after "audit" goes to kernel.audit.cli, imported only when used.
    audit = sub.add_parser("audit", help="verify, export, replay or archive an audit log directory (audit --help for more)",
                           add_help=False, prefix_chars="\0")
    audit.add_argument("audit_args", nargs=argparse.REMAINDER)
    audit.set_defaults(func=cmd_audit)

    backup = sub.add_parser(
        "backup", help="copy a data dir, its kernel running or not, into a new folder a kernel starts on",
        description="Copy DATA_DIR (the store, then the audit log, in the order that keeps the copy consistent "
                    "while its kernel runs) into DEST, a new or empty folder, then check the copy. A kernel started "
                    "on it adopts the records past its last checkpoint, as after a crash. The signing key kept in "
                    "the data dir is copied too.",
        epilog="exit status: 0 copied and checked, 1 the copy failed its check (said why), 2 it could not run")
    backup.add_argument("data_dir", type=Path, help="the data dir (serve's --data-dir; default setting: var)")
    backup.add_argument("dest", type=Path, help="a folder that does not exist yet, or is empty")
    backup.set_defaults(func=cmd_backup)
    restore = sub.add_parser(
        "restore", help="put a backup back as a data dir (new or empty; a running kernel's is refused)",
        description="Copy BACKUP (a folder `aios-kernel backup` made) into DATA_DIR, a new or empty folder, in the "
                    "order backup uses, check the copy and move it into place; a backup that fails its check "
                    "(truncated, damaged) is refused and nothing is left in DATA_DIR. A data dir with anything in "
                    "it, or a kernel running on it, is refused: move the old one aside first (keep it).",
        epilog="exit status: 0 restored and checked, 1 the backup failed its check (nothing restored), 2 it could "
               "not run")
    restore.add_argument("backup", type=Path, help="the backup's folder")
    restore.add_argument("data_dir", type=Path, help="where the kernel's data dir goes (serve's --data-dir)")
    restore.set_defaults(func=cmd_restore)

    policy = sub.add_parser("policy", help="check a policy file, or test it against sample cases")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    check = policy_sub.add_parser("check", help="validate a policy file (exit 1 with FILE:LINE errors, 3 if the table "
                                                "was too large to check fully)",
                                  description="Parse, check and compile a policy file as the kernel would: its "
                                              "summary, or every problem with FILE:LINE (exit 1); exit 3 when the "
                                              "table analysis stopped at its work limit (NOT fully checked).")
    check.add_argument("file", help="the policy's TOML file")
    check.set_defaults(func=cmd_policy_check)
    test = policy_sub.add_parser("test", help="run JSON-lines cases: mismatches and rule coverage")
    test.add_argument("file", help="the policy's TOML file")
    test.add_argument("--cases", required=True, help="JSON lines: {\"row\": {...}, \"expect\": {\"action\": ...}}; "
                      "\"expect\" may also hold \"fired\" (rule ids), \"escalate\" (true/false) and \"adjust\" (a number)")
    test.add_argument("--pipeline", help="read each row as this pipeline reads a request, as the kernel does: "
                      "fields left out take their defaults, values out of range or not among a field's values are "
                      "refused")
    test.set_defaults(func=cmd_policy_test)
    return parser


def cmd_audit(args) -> int:
    from .audit.cli import main as audit_main

    return audit_main(args.audit_args)


def cmd_backup(args) -> int:
    from .backup import backup

    return _copy_command("backup", lambda: backup(args.data_dir, args.dest), args.data_dir, args.dest)


def cmd_restore(args) -> int:
    from .backup import restore

    return _copy_command("restore", lambda: restore(args.backup, args.data_dir), args.backup, args.data_dir)


def _copy_command(name: str, run, source: Path, dest: Path) -> int:
    """backup and restore: the result's summary, or why it could not run, in one line."""
    import sqlite3

    from .audit.errors import AuditError, AuditFormatTooNew
    from .backup import BackupRefused

    try:
        result = run()
    except BackupRefused as exc:
        print(f"aios-kernel {name}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable source, a full or read-only destination
        print(f"aios-kernel {name}: {exc.strerror or exc}: {exc.filename or dest}", file=sys.stderr)
        return 2
    except AuditFormatTooNew as exc:  # a newer kernel's log (a rollback): not damage, and nothing to check
        print(f"aios-kernel {name}: {exc.message}; nothing was left in {dest}", file=sys.stderr)
        return 2
    except AuditError as exc:  # a source log damaged where the copy reads it (its base, a checkpoint file header)
        print(f"aios-kernel {name}: {exc.message}; no copy was left in {dest} (run `aios-kernel audit "
              f"verify` on the source's log)", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:  # a store SQLite cannot read
        print(f"aios-kernel {name}: {source}'s store: {exc}", file=sys.stderr)
        return 2
    print(result.summary)
    return 0 if result.ok else 1


def cmd_policy_check(args) -> int:
    from .policy.cli import check_command

    return check_command(args.file)


def cmd_policy_test(args) -> int:
    from .policy.cli import test_command

    return test_command(args.file, args.cases, pipeline_path=args.pipeline)


def _chosen_command(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The (sub)command parser ``args`` went down to, so a mistake is shown with that command's usage."""
    for action in parser._actions:  # argparse keeps its subcommands there; no public way to walk them
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            if chosen is not None:
                return _chosen_command(chosen, args)
    return parser


def _as_typed(text) -> str:
    """``text`` with the bytes the shell passed that are not UTF-8 shown as ``\\xNN``."""
    if not isinstance(text, str):
        return repr(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeError:  # (a surrogate no shell byte makes)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _an_arguments(exc: UnicodeEncodeError, argv: list[str]) -> bool:
    """Whether ``exc`` is about text taken from the command line that is not UTF-8."""
    text = exc.object if isinstance(exc.object, str) else ""
    return exc.reason == "surrogates not allowed" and any(text in arg or arg in text for arg in argv if arg)


# Errors of a write that found no room. Raised with no file name, they come from printing the answer: what a command
# writes to files it names says so itself (audit export --out, replay --report, backup).
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# This process running out (a module imported on first use, a file a command reads): no bug of the command, so one
# line saying what to do and exit EX_OSERR, as a traceback ending in "OSError: [Errno 24] Too many open files" said
# neither. (A kernel running out answers its callers UNAVAILABLE: kernel/os_faults.py.)
_RAN_OUT = {errno.EMFILE: ("this process ran out of file descriptors", "raise its open-file limit (ulimit -n)"),
            errno.ENFILE: ("the system ran out of file descriptors", "raise fs.file-max or stop what holds them"),
            errno.ENOMEM: ("this process ran out of memory", "free memory on this host")}


class _Parser(argparse.ArgumentParser):
    """argparse's, but help or usage that cannot be written raises (argparse drops the OSError: `--help > out.txt`
    on a full disk lost the help and exited 0). Its subcommands' parsers are of this class too."""

    def _print_message(self, message, file=None):
        if message:
            (file or sys.stderr).write(message)


def _unwritten(exc: OSError) -> int:
    """The answer could not be written to standard output (a full disk): one line, and exit EX_IOERR."""
    print(f"aios-kernel: cannot write the answer to standard output: {exc.strerror or exc}", file=sys.stderr)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's exit flush would raise again)
    return os.EX_IOERR


def _ran_out(exc: BaseException) -> int:
    code = errno.ENOMEM if isinstance(exc, MemoryError) else exc.errno
    what, to_do = _RAN_OUT[code]
    print(f"aios-kernel: {what} ({errno.errorcode[code]}: {os.strerror(code)}): {to_do}", file=sys.stderr)
    return os.EX_OSERR


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # an answer is printed whatever the terminal takes (never lost to it)
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    parser = build_parser()
    try:
        # parse_args would report a stray word with the top-level usage; say it with the command's own.
        args, stray = parser.parse_known_args(argv)
        if stray:
            _chosen_command(parser, args).error(f"unrecognized arguments: {' '.join(stray)}")
    except SystemExit:  # --help (or a usage error): what is still buffered is written here, where a failure can be said
        try:
            sys.stdout.flush()
        except OSError as exc:
            if exc.errno not in _NO_ROOM:
                raise
            return _unwritten(exc)
        raise
    except OSError as exc:  # writing the help itself failed (_Parser)
        if exc.errno not in _NO_ROOM or exc.filename is not None:
            raise
        return _unwritten(exc)
    try:
        code = args.func(args)
        sys.stdout.flush()  # (what is still buffered is written here, where a failure can be said, not at exit)
        return code
    except SettingsError as exc:
        print(f"aios-kernel: {exc}", file=sys.stderr)
        return 2
    except UnicodeEncodeError as exc:  # (a pipeline author's walk-through: a traceback from deep in protobuf)
        # The shell handed bytes that are not UTF-8 (Python keeps them as surrogates); a request carries UTF-8 only.
        # Only an argument's: anything else is no mistake of the command line (a review: an answer printed to an
        # ASCII terminal was blamed on the arguments, after the decision was made and recorded).
        if not _an_arguments(exc, sys.argv[1:] if argv is None else argv):
            raise
        print(f"aios-kernel: an argument is not valid UTF-8 text: {_as_typed(exc.object)[:200]!r}; requests carry "
              "UTF-8 only", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C on a client command (serve handles its own signals and drains)
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `aios-kernel ... | head`: the reader left; stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's exit flush would raise again)
        return 141
    except MemoryError as exc:
        return _ran_out(exc)
    except OSError as exc:
        if exc.errno in _RAN_OUT:
            return _ran_out(exc)
        # `... > out.txt` on a full disk: the answer could not be written (a traceback from inside print or from
        # the exit's flush). Any other OSError is no such thing: raised as it was.
        if exc.errno not in _NO_ROOM or exc.filename is not None:
            raise
        return _unwritten(exc)
