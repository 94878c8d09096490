"""``aios-kernel demo``: serve the bundled claims pipeline and send it a burst of claims.

Builds the demo models if absent, starts the kernel in-process on a free
port with the claims-triage pipeline, sends synthetic claims over gRPC as
decisions (``DecideStream`` from several client threads), and prints a
one-screen summary: throughput and latency, automated vs escalated, the
actions and the rules behind them, the review queue, and the audit log.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from .config import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS = ("claims_triage", "claims_triage_large")
PIPELINES = REPO_ROOT / "examples" / "claims" / "pipelines"


def _claims_example():
    """The examples/claims package, importable from a source checkout."""
    if not (REPO_ROOT / "examples" / "claims" / "build_models.py").is_file():
        raise SystemExit("the demo needs a source checkout (examples/claims is missing)")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from examples.claims import build_models, data, features

    return build_models, data, features


def ensure_demo_models(models_dir: Path, log=print) -> None:
    build_models, _, _ = _claims_example()
    build_models.build(models_dir, force=False, log=log)


def run_demo(settings: Settings, requests: int = 2000, concurrency: int = 8) -> int:
    from ._proto.aios.kernel.v1 import kernel_pb2 as kpb
    from .audit import verify_directory
    from .decision_client import DecisionClient, make_request
    from .server import KernelServer

    _, data, _ = _claims_example()
    models_dir = Path(settings.models)
    ensure_demo_models(models_dir, log=lambda line: print(f"  model: {line}"))
    if settings.pipelines == Settings().pipelines or not Path(settings.pipelines).is_dir():
        # The bundled claims pipelines, as --help says, unless others were named: a ./pipelines folder where the
        # demo happens to run (a CLI audit: one holding an uploaded pipeline) is not what the demo shows.
        settings = replace(settings, pipelines=str(PIPELINES))
    if settings.data_dir == Settings().data_dir:  # the demo leaves no audit log behind unless asked to
        settings = replace(settings, data_dir=tempfile.mkdtemp(prefix="aios-demo-"))
    server = KernelServer(settings)
    port = server.start()
    try:  # the kernel stops however the burst ends (an error, Ctrl-C): its audit log closes cleanly
        address = f"{settings.host}:{port}"
        cases = data.generate_cases(requests, seed=7)
        latencies: list[float] = []
        answers: dict[int, kpb.Decision] = {}
        errors: Counter = Counter()
        lock = threading.Lock()

        def worker(offset: int) -> None:
            with DecisionClient(address, timeout=60) as client:
                mine = list(range(offset, requests, concurrency))
                sent_at = {}

                def produce():
                    for i in mine:
                        case = cases[i]
                        sent_at[str(i)] = time.perf_counter()
                        yield make_request("claims_triage", {k: case[k] for k in data.REQUEST_FIELDS}, {"description": case["description"]},
                                           tenant="demo", request_id=str(i))

                try:
                    for decision in client.decide_stream(produce(), timeout=120):
                        now = time.perf_counter()
                        with lock:
                            if decision.error_code:
                                errors[decision.error_code] += 1
                                continue
                            latencies.append(now - sent_at[decision.request_id])
                            answers[int(decision.request_id)] = decision
                except Exception as exc:  # counted and shown; the other streams go on
                    with lock:
                        errors[type(exc).__name__] += 1

        print(f"AIOS kernel demo: {requests} claims to {address} as decisions, {concurrency} streams, "
              f"pipeline claims_triage")
        started = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        with DecisionClient(address) as client:
            waiting, token = 0, ""
            while True:  # page through: a page holds at most 1,000 reviews
                page = client.reviews.ListReviews(kpb.ListReviewsRequest(
                    pipeline="claims_triage", state="OPEN", page_size=1000, page_token=token))
                waiting += len(page.reviews)
                token = page.next_page_token
                if not token:
                    break
    finally:
        server.stop(grace=2)
    audit_dir = Path(settings.data_dir) / "audit"
    verified = verify_directory(audit_dir)

    done = len(answers)
    print(f"\n  sent {requests}, answered {done}, errors {sum(errors.values())} {dict(errors) if errors else ''}")
    if latencies:
        lat = np.array(latencies) * 1e3
        print(f"  wall {wall:.2f} s, {done / wall:,.0f} decisions/s, latency p50 {np.percentile(lat, 50):.2f} ms "
              f"p99 {np.percentile(lat, 99):.2f} ms (streams keep many in flight)\n")
    outcomes = Counter(kpb.Outcome.Name(d.outcome) for d in answers.values())
    for name in ("AUTOMATED", "ESCALATED"):
        share = 100 * outcomes[name] / max(1, done)
        print(f"  {name.lower():10} {outcomes[name]:>6}  {share:5.1f}%")
    actions = Counter((d.action, kpb.Outcome.Name(d.outcome)) for d in answers.values())
    print("\n  action        outcome      count")
    for (action, outcome), count in sorted(actions.items(), key=lambda kv: -kv[1]):
        print(f"  {action:13} {outcome:12} {count:>5}")
    rules = Counter(r.rule_id for d in answers.values() for r in d.reasons)
    described = {r.rule_id: r.description for d in answers.values() for r in d.reasons}
    print("\n  rules that decided")
    for rule, count in rules.most_common():
        print(f"  {rule:8} {count:>5}  {described[rule]}")
    automated = [i for i, d in answers.items() if d.outcome == kpb.AUTOMATED]
    agree = sum(1 for i in automated if _agrees(answers[i].action, cases[i]["label"]))
    if automated:
        print(f"\n  automated decisions agreeing with the synthetic ground truth: {100 * agree / len(automated):.1f}%")
    print(f"  review queue: {waiting} cases waiting for a person, kept with the demo's data in {settings.data_dir} "
          f"(delete it when done); to work them, serve it\n"
          # (every path absolute: the hint works from any folder, not only the one `make demo` ran in)
          f"    aios-kernel serve --models {models_dir.resolve()} --pipelines {Path(settings.pipelines).resolve()} "
          f"--data-dir {Path(settings.data_dir).resolve()}\n"
          "    and use aios-kernel review list / show / claim / resolve")
    print(f"  audit log {audit_dir}: {verified.describe()}")
    return 0 if not errors and verified.ok else 1


def _agrees(action: str, label: str) -> bool:
    return {"fast_track": "approve"}.get(action, action) == label
