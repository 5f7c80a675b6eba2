"""A CNN trained here on scikit-learn's digits, then every recipe that applies, side by side.

Variants (one interleaved ao.compare run, batch 64 of the test set): fp32 eager, inductor,
int8-dynamic + inductor, 30% structured pruning (alone and distilled) + inductor, ONNX Runtime
fp32, int8-dynamic and int8-static (per-channel and per-tensor), the pruned-and-distilled network
in int8-static on ONNX Runtime, and the peer: ONNX Runtime's quantize_static with its defaults.
Fidelity: test-set accuracy (eval_fn) and top-1 agreement with fp32.

Writes cnn_digits.json, .md and .png (the report's figure) into benchmarks/results/ (or --results-dir).
    .venv/bin/python benchmarks/cnn_digits.py [--epochs 30] [--results-dir PATH]
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import aigc_opt as ao
from _common import (base_parser, fmt_ci, fmt_ratio, latency_fields, markdown_table, result_header,
                     write_results)


class DigitsCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, padding=1),
            torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2))
        self.classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 128), torch.nn.ReLU(),
                                              torch.nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train(epochs: int) -> tuple[DigitsCNN, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    torch.manual_seed(0)
    net = DigitsCNN()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x_train))
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval(), x_train, x_test, y_test


def ort_static_defaults(onnx_model: ao.Model, calibration: list[torch.Tensor]) -> ao.Model:
    """Peer: plain ONNX Runtime quantize_static with its defaults (QDQ, MinMax, every op it knows)."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    name = onnx_model.artifact.session().get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{name: b.numpy()} for b in calibration])

        def get_next(self):  # noqa: ANN201
            return next(self.feeds, None)

    out = Path(tempfile.mkdtemp()) / "static_defaults.onnx"
    quantize_static(str(onnx_model.artifact.path), str(out), Reader())
    model = ao.Model.from_onnx(out, example_inputs=onnx_model.example_inputs)
    return ao.compile(model, "onnxruntime", transformer_fusions=False)


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--distill-epochs", type=int, default=10)
    args = parser.parse_args()
    started = time.perf_counter()
    net, x_train, x_test, y_test = train(args.epochs)
    train_seconds = time.perf_counter() - started
    batches = [x_test[i:i + args.batch_size] for i in range(0, len(x_test) - args.batch_size + 1, args.batch_size)]
    base = ao.Model(net, example_inputs=(batches[0],), name="fp32 eager")

    def accuracy(model: ao.Model) -> float:
        predictions = torch.cat([model(x_test[i:i + args.batch_size]).argmax(-1)
                                 for i in range(0, len(x_test), args.batch_size)])
        return float((predictions == y_test).float().mean())

    onnx_model = ao.export(base, "onnx")
    train_batches = [x_train[i:i + args.batch_size] for i in range(0, len(x_train), args.batch_size)]
    # pruning alone costs accuracy; distilling from the unpruned model on the training images wins it back
    distilled = ao.distill(ao.prune(base, 0.3), base, train_batches, epochs=args.distill_epochs, lr=2e-3,
                           output_loss="kl", verbose=False)
    variants = {
        "inductor": ao.compile(base, "inductor"),
        "int8-dynamic + inductor": ao.compile(ao.quantize(base, "int8-dynamic"), "inductor"),
        "prune 30% + inductor": ao.compile(ao.prune(base, 0.3), "inductor"),
        f"prune 30% + distill {args.distill_epochs} epochs + inductor": ao.compile(distilled, "inductor"),
        "ORT fp32": ao.compile(onnx_model, "onnxruntime"),
        "ORT int8-dynamic": ao.compile(ao.quantize(onnx_model, "int8-dynamic"), "onnxruntime"),
        "ORT int8-static (QDQ)": ao.compile(ao.quantize(onnx_model, "int8-static", data=train_batches[:8],
                                                        verbose=False), "onnxruntime"),
        "ORT int8-static per-tensor (QDQ)": ao.compile(ao.quantize(onnx_model, "int8-static", per_channel=False,
                                                                   data=train_batches[:8], verbose=False),
                                                       "onnxruntime"),
        # The composed recipe peers cannot offer: a smaller network (pruned, accuracy won back by
        # distillation) in int8 on ONNX Runtime.
        f"prune 30% + distill {args.distill_epochs} epochs + ORT int8-static": ao.compile(
            ao.quantize(ao.export(distilled, "onnx"), "int8-static", data=train_batches[:8], verbose=False),
            "onnxruntime"),
        "peer: ONNX Runtime quantize_static defaults": ort_static_defaults(onnx_model, train_batches[:8]),
    }
    for label, model in variants.items():
        model.name = label  # the figure labels its points as the table does
    report = ao.compare(base, *variants.values(), inputs=batches, iters=None, max_time=60, eval_fn=accuracy,
                        verbose=False)
    print(report)
    rows = []
    for label, entry in zip(variants, report.candidates):
        rows.append({"variant": label, **latency_fields(entry), "accuracy": entry.metric,
                     "top1_agreement": entry.fidelity.top1_agreement, "size_kb": entry.measurement.size_bytes / 1e3,
                     "params": entry.measurement.num_parameters})
    results = {**result_header("cnn_digits"), "train_seconds": train_seconds,
               "baseline": {"accuracy": report.baseline.metric, "p50_ms": report.baseline.measurement.median * 1e3,
                            "params": report.baseline.measurement.num_parameters},
               "batch_size": args.batch_size, "rows": rows, "warnings": report._warnings(),
               "report": report.to_dict()}
    lines = [f"# CNN on scikit-learn digits ({results['date']})", "",
             f"Trained here in {train_seconds:.0f} s; test set {len(x_test)} images, batch {args.batch_size}; "
             f"fp32 eager: accuracy {report.baseline.metric:.4f}, p50 {results['baseline']['p50_ms']:.2f} ms, "
             f"{results['baseline']['params']:,} parameters. {report.iters} interleaved rounds "
             f"({report.baseline.measurement.stop_reason}). Every variant here runs in one to two milliseconds: "
             "the ONNX Runtime rows move by up to 0.2x between runs of this script (each run's intervals are "
             "tight, the sessions' relative speed is not), so compare recipes within one run, and rerun "
             "before reading a few percent into any one of them.", ""]
    lines += markdown_table(
        ["variant", "latency vs fp32 eager", "95% CI", "p50 ms", "test accuracy", "top-1 agreement", "params",
         "size kB"],
        [[r["variant"], fmt_ratio(r["latency_ratio"]), fmt_ci(*r["ratio_ci95"]), f"{r['p50_ms']:.2f}",
          f"{r['accuracy']:.4f}", f"{r['top1_agreement']:.3f}", f"{r['params']:,}", f"{r['size_kb']:.0f}"]
         for r in rows])
    lines += [""] + [f"- warning: {w}" for w in results["warnings"]]
    print(write_results("cnn_digits", results, lines, args.results_dir, figures=[("cnn_digits.png", report)]))


if __name__ == "__main__":
    main()
