"""``aios-kernel demo``: serve the bundled claims models and send them a short burst.

Builds the demo models if absent, starts the kernel in-process on a free
port, sends synthetic claims over gRPC from several client threads (small
and large model alternating), and prints a one-screen summary.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from .config import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS = ("claims_triage", "claims_triage_large")


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
    from .oip_client import OipClient
    from .server import KernelServer

    build_models, data, features = _claims_example()
    models_dir = Path(settings.models)
    ensure_demo_models(models_dir, log=lambda line: print(f"  model: {line}"))
    server = KernelServer(settings)
    port = server.start()
    address = f"{settings.host}:{port}"
    cases = data.generate_cases(requests, seed=7)
    encoded = features.encode(cases)
    truth = data.labels_array(cases)
    labels = ["approve", "review", "deny"]
    latencies: dict[str, list[float]] = {m: [] for m in MODELS}
    predictions: dict[str, dict[int, int]] = {m: {} for m in MODELS}
    errors: Counter = Counter()
    lock = threading.Lock()

    def worker(offset: int) -> None:
        with OipClient(address) as client:
            for i in range(offset, requests, concurrency):
                model = MODELS[i % 2]
                started = time.perf_counter()
                try:
                    out = client.infer(model, {"features": encoded[i:i + 1]})
                except Exception as exc:  # counted and shown, the burst goes on
                    with lock:
                        errors[type(exc).__name__] += 1
                    continue
                elapsed = time.perf_counter() - started
                with lock:
                    latencies[model].append(elapsed)
                    predictions[model][i] = int(np.argmax(out["probabilities"][0]))

    print(f"AIOS kernel demo: {requests} claims to {address}, {concurrency} in flight, models {', '.join(MODELS)}")
    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    server.stop(grace=2)

    done = sum(len(v) for v in latencies.values())
    print(f"\n  sent {requests}, answered {done}, errors {sum(errors.values())} {dict(errors) if errors else ''}")
    print(f"  wall {wall:.2f} s, {done / wall:,.0f} inferences/s\n")
    print(f"  {'model':22} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'accuracy':>9}   approve/review/deny")
    for model in MODELS:
        lat = np.array(latencies[model]) * 1e3
        preds = predictions[model]
        if not preds:
            continue
        idx = np.fromiter(preds.keys(), dtype=np.int64)
        guess = np.fromiter(preds.values(), dtype=np.int64)
        accuracy = float(np.mean(guess == truth[idx]))
        split = np.bincount(guess, minlength=3) / len(guess)
        print(
            f"  {model:22} {len(lat):>6} {np.percentile(lat, 50):>8.2f} {np.percentile(lat, 99):>8.2f} "
            f"{accuracy:>9.3f}   " + "/".join(f"{100 * s:.0f}%" for s in split)
        )
    print(f"\n  labels: {', '.join(labels)}; accuracy is against the synthetic ground truth.")
    print("  Decisions (policy, escalation, audit) come with the decision API; this demo serves the models.")
    return 0 if not errors else 1
