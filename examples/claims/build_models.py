"""Train and export the bundled claims-triage demo models.

    python examples/claims/build_models.py [--out DIR] [--force]

Writes, for each model, ``DIR/<name>/1/{model.onnx, model.toml, features.toml}``:

* ``claims_triage``        multinomial logistic regression: fast, decent.
* ``claims_triage_large``  3 hidden ReLU layers of 384: several times slower per
  request at batch 1, clearly more accurate (the hidden rule is non-linear).

Training is plain numpy (softmax cross-entropy, minibatch Adam, cosine learning
rate) with fixed seeds, so a rebuild on the same machine gives byte-identical
files; no timings go into the files for the same reason.  Float results can
differ across CPUs (OpenBLAS picks kernels per CPU), so the repository ships no
binaries: callers build what they need.
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.claims import data, features  # noqa: E402
from kernel.testing.onnx_models import dense_layers, mlp_from_weights, save  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "models"
TRAIN_N, TRAIN_SEED = 20000, 1
TEST_N, TEST_SEED = 5000, 2  # held-out split, a different seed, never trained on
VERSION = "1"
MAX_BATCH_SIZE = 64

Layers = list[tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: tuple[int, ...]  # hidden layer widths; () is logistic regression
    epochs: int
    batch: int
    lr: float
    seed: int
    summary: str


MODELS = (
    ModelSpec("claims_triage", (), epochs=30, batch=256, lr=0.05, seed=11,
              summary="multinomial logistic regression"),
    ModelSpec("claims_triage_large", (384, 384, 384), epochs=10, batch=512, lr=0.002, seed=12,
              summary="MLP with 3 hidden ReLU layers of 384"),
)


def forward(layers: Layers, x: np.ndarray) -> list[np.ndarray]:
    """Activations of every layer (input first, logits last): Gemm + Relu, like the ONNX graph."""
    acts = [x]
    for index, (weight, bias) in enumerate(layers):
        z = acts[-1] @ weight + bias
        acts.append(np.maximum(z, 0) if index < len(layers) - 1 else z)
    return acts


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def train(x: np.ndarray, y: np.ndarray, spec: ModelSpec) -> Layers:
    """Minibatch Adam on softmax cross-entropy; float32 throughout, deterministic for a seed."""
    widths = [x.shape[1], *spec.hidden, len(data.LABELS)]
    layers = dense_layers(widths, spec.seed)  # He init, same helper the tests use
    params = [p for layer in layers for p in layer]
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    onehot = np.eye(len(data.LABELS), dtype=np.float32)[y]
    rng = np.random.default_rng(spec.seed)
    steps = spec.epochs * -(-len(x) // spec.batch)
    step = 0
    for _ in range(spec.epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), spec.batch):
            rows = order[start:start + spec.batch]
            acts = forward(layers, x[rows])
            grad = (softmax(acts[-1]) - onehot[rows]) / len(rows)  # dLoss/dlogits
            grads: list[np.ndarray] = []
            for index in range(len(layers) - 1, -1, -1):
                weight = layers[index][0]
                grads[:0] = [acts[index].T @ grad, grad.sum(axis=0)]
                if index:
                    grad = (grad @ weight.T) * (acts[index] > 0)
            step += 1
            # Cosine decay to 0: a stable final model without tuning an epoch count per size.
            lr = np.float32(spec.lr * 0.5 * (1 + np.cos(np.pi * step / steps)))
            c1, c2 = 1 - 0.9 ** step, 1 - 0.999 ** step
            for p, g, a, b in zip(params, grads, m1, m2):
                a *= 0.9
                a += 0.1 * g
                b *= 0.999
                b += 0.001 * g * g
                p -= lr * (a / c1) / (np.sqrt(b / c2) + 1e-8)
    return layers


def evaluate(layers: Layers, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    pred = forward(layers, x)[-1].argmax(axis=1)
    f1s = []
    for k in range(len(data.LABELS)):
        tp = np.sum((pred == k) & (y == k))
        wrong = np.sum((pred == k) != (y == k))  # false positives + false negatives
        f1s.append(2 * tp / max(2 * tp + wrong, 1))
    return {"accuracy": round(float(np.mean(pred == y)), 4), "macro_f1": round(float(np.mean(f1s)), 4)}


def param_count(layers: Layers) -> int:
    return sum(w.size + b.size for w, b in layers)


def model_toml(spec: ModelSpec, layers: Layers, metrics: dict[str, float]) -> str:
    """model.toml, formatted by hand (the stdlib reads TOML but cannot write it)."""
    q = features.toml_value
    labels = q(list(data.LABELS))
    card = {
        "owner": "AIOS Kernel examples (synthetic demo model)",
        "intended_use": f"Demo triage of insurance claims into {'/'.join(data.LABELS)} "
                        f"({spec.summary}). Not for real claims decisions.",
        "training_data": f"{TRAIN_N} synthetic claims from examples/claims/data.py (seed {TRAIN_SEED}),"
                         " encoded per features.toml.",
        "limitations": f"Learned from a hidden synthetic rule with {data.LABEL_NOISE:.0%} label noise;"
                       " says nothing about real claims. Metrics are on"
                       f" {TEST_N} held-out synthetic claims (seed {TEST_SEED}).",
    }
    return "\n".join([
        'platform = "onnxruntime_onnx"',
        f"max_batch_size = {MAX_BATCH_SIZE}",
        "instances = 1",
        'provider = "auto"',
        "intra_op_threads = 1",
        "",
        "[[input]]",
        f'name = "{features.INPUT_NAME}"',
        'datatype = "FP32"',
        f"dims = [{layers[0][0].shape[0]}]",
        "",
        "[[output]]",
        'name = "probabilities"',
        'datatype = "FP32"',
        f"dims = [{layers[-1][0].shape[1]}]",
        f"labels = {labels}",
        "",
        "[card]",
        *[f"{key} = {q(value)}" for key, value in card.items()],
        "",
        "[card.metrics]",
        *[f"{key} = {value!r}" for key, value in metrics.items()],
    ]) + "\n"


def build(out: Path, force: bool = False, models=MODELS, log=print) -> list[dict]:
    """Build ``models`` under ``out``; returns one summary dict per model."""
    version_dirs = {spec.name: Path(out) / spec.name / VERSION for spec in models}
    todo = [s for s in models if force or not all(
        (version_dirs[s.name] / f).exists() for f in ("model.onnx", "model.toml", "features.toml"))]
    if todo:  # the data is shared and only made when something needs training
        train_cases, test_cases = data.generate_cases(TRAIN_N, TRAIN_SEED), data.generate_cases(TEST_N, TEST_SEED)
        x_train, y_train = features.encode(train_cases), data.labels_array(train_cases)
        x_test, y_test = features.encode(test_cases), data.labels_array(test_cases)
    results = []
    for spec in models:
        folder = version_dirs[spec.name]
        if spec not in todo:
            with open(folder / "model.toml", "rb") as fh:
                metrics = tomllib.load(fh)["card"]["metrics"]
            result = {"name": spec.name, "params": None, "skipped": True, **metrics, "seconds": 0.0}
            log(f"{spec.name:<22} exists, skipped (--force rebuilds)  accuracy={metrics['accuracy']:.4f}")
            results.append(result)
            continue
        started = time.perf_counter()
        layers = train(x_train, y_train, spec)
        metrics = evaluate(layers, x_test, y_test)
        model = mlp_from_weights(layers, features.INPUT_NAME, "probabilities", softmax=True,
                                 graph_name=spec.name)
        save(model, folder / "model.onnx")
        (folder / "model.toml").write_text(model_toml(spec, layers, metrics), encoding="utf-8")
        features.write_spec(folder / "features.toml")
        seconds = time.perf_counter() - started
        result = {"name": spec.name, "params": param_count(layers), "skipped": False, **metrics,
                  "seconds": seconds}
        log(f"{spec.name:<22} params={result['params']:<7} accuracy={metrics['accuracy']:.4f}"
            f" macro_f1={metrics['macro_f1']:.4f} build={seconds:.2f}s")
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rebuild models whose files exist")
    args = parser.parse_args(argv)
    build(args.out, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
