"""MiniLM at fixed shapes (8x128, 1x128): aigc_opt's OpenVINO int8 recipe vs OpenVINO + NNCF by hand.

Shapes: ``8x128`` and ``1x128`` are the reference sentences padded to 128 tokens (what a server
that pads to one length sends; the sentences are 8-40 tokens, so most columns are padding);
``8x128full`` joins sentences into texts longer than 128 tokens and cuts them at 128, so every
column is a real token and nothing can be trimmed: the engine-against-engine comparison.

The peer is what an OpenVINO user writes (the same as in embed_corpus.py): ``ov.convert_model`` on
the module, ``nncf.quantize(model_type=TRANSFORMER)`` on the demo sentences, ``compile_model`` with
the LATENCY hint and the same thread count, one infer request, outputs copied into torch tensors.
Ours: ``Export("openvino")`` -> ``Quantize("int8-static")`` (same calibration batches) ->
``Compile("openvino")`` with its defaults (dynamic shapes; ``trim_padding`` on once the compile has
checked that padding does not change MiniLM's outputs: columns that are padding in every row are
not computed), and with ``shapes="static"`` (the IR reshaped to the example's shape, no trimming).

Both run in OpenVINO in one process (one runtime family, so no other runtime's idle threads bias
either), interleaved by ``ao.compare`` (the peer wrapped as a torch module that calls its infer
request; the wrapper's cost, a ``torch.from_numpy``, is what our runtime pays too). The peer is the
baseline, so "latency vs baseline" is ours / peer, with its 95% interval. Prep seconds (convert,
quantize, compile) are reported per row. Cosine against fp32 eager on the same batches.
    .venv/bin/python benchmarks/encoder_fixed.py [--iters 60] [--shapes 8x128,1x128,8x128full]
"""

from __future__ import annotations

import os
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import aigc_opt as ao  # noqa: E402
from _common import (base_parser, describe_machine, fmt_ratio, machine_info, markdown_table,  # noqa: E402
                     openvino_settings, result_header, write_results)
from aigc_opt.demo import demo_sentences, load_minilm, reference_sentences, sentence_batches  # noqa: E402


SETTINGS = openvino_settings("dynamic shapes with trim_padding (or shapes=static where the row says so)")


class ByHand(torch.nn.Module):
    """The peer's compiled model behind a torch module, so ao.compare can time it beside ours."""

    def __init__(self, request: Any, names: list[str]) -> None:
        super().__init__()
        self.request, self.names = request, names

    def __deepcopy__(self, memo: dict) -> ByHand:  # an infer request cannot be copied; nothing here changes
        return self

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        self.request.infer({k: inputs[k].numpy() for k in self.names})
        return torch.from_numpy(self.request.get_output_tensor(0).data.copy())


def by_hand(base: ao.Model, calib: list[dict]) -> tuple[ao.Model, float]:
    import nncf
    import openvino as ov

    start = time.perf_counter()
    with torch.no_grad():
        ov_model = ov.convert_model(base.artifact, example_input=dict(base.example_inputs))
    q = nncf.quantize(ov_model, nncf.Dataset(calib, lambda b: {k: v.numpy() for k, v in b.items()}),
                      model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
    compiled = ov.Core().compile_model(q, "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                  "INFERENCE_NUM_THREADS": str(torch.get_num_threads())})
    names = [p.get_any_name() for p in compiled.inputs]
    seconds = time.perf_counter() - start
    peer = ao.Model(ByHand(compiled.create_infer_request(), names), example_inputs=base.example_inputs,
                    target=base.target, name="peer: OpenVINO + NNCF int8 (by hand)")
    return peer, seconds


def ours(base: ao.Model, calib: list[dict], **compile_options: Any) -> tuple[ao.Model, float]:
    start = time.perf_counter()
    q = ao.quantize(ao.export(base, "openvino"), "int8-static", data=calib)
    label = "ours: OpenVINO int8" + (f" (shapes={compile_options['shapes']})" if compile_options else "")
    m = ao.compile(q, "openvino", name=label, **compile_options)
    return m, time.perf_counter() - start


def long_texts(count: int) -> list[str]:
    """``count`` texts, each several reference sentences joined (far more than 128 tokens)."""
    sentences = reference_sentences()
    return [" ".join(sentences[(i * 12 + j) % len(sentences)] for j in range(12)) for i in range(count)]


def measure(rows: int, length: int, iters: int, full: bool) -> dict[str, Any]:
    base = load_minilm(batch_size=rows, seq_len=length)
    texts = long_texts(8 * rows) if full else reference_sentences()
    batches = sentence_batches(base, batch_size=rows, seq_len=length, sentences=texts)[:8]
    padding = 1 - float(sum(b["attention_mask"].float().mean() for b in batches) / len(batches))
    tok = base.tokenizer
    calib = [dict(tok(demo_sentences()[s:s + 8], padding=True, return_tensors="pt"))
             for s in range(0, len(demo_sentences()), 8)]
    with torch.inference_mode():
        reference = [base(**b) for b in batches]
    peer, peer_s = by_hand(base, calib)
    dyn, dyn_s = ours(base, calib)
    static, static_s = ours(base, calib, shapes="static")
    report = ao.compare(peer, dyn, static, inputs=batches, iters=iters, top1=False, memory=False, verbose=False)
    models = [peer, dyn, static]
    out = []
    for m, prep, entry in zip(models, [peer_s, dyn_s, static_s], report.entries):
        with torch.inference_mode():
            got = [m(**b) for b in batches]
        cos = torch.cat([torch.nn.functional.cosine_similarity(g.float(), r.float(), dim=-1)
                         for g, r in zip(got, reference)])
        x = entry.measurement
        out.append({"label": x.name, "prep_s": prep, "median_ms": x.median * 1e3,
                    "ci_ms": [x.median_ci95[0] * 1e3, x.median_ci95[1] * 1e3],
                    "vs_peer": list(entry.latency_ratio) if entry.latency_ratio else [1.0, 1.0, 1.0],
                    "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())})
    return {"shape": f"{rows}x{length}" + (" (all real tokens)" if full else " (padded)"), "padding_fraction": padding,
            "rows": out, "report": report.to_dict()}


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--shapes", default="8x128,1x128,8x128full")
    args = parser.parse_args()
    results = []
    for shape in args.shapes.split(","):
        rows, length = (int(v) for v in shape.removesuffix("full").split("x"))
        print(f"--- {shape}", flush=True)
        results.append(measure(rows, length, args.iters, full=shape.endswith("full")))
        for r in results[-1]["rows"]:
            print(f"    {r['label']}: {r['median_ms']:.2f} ms, {fmt_ratio(*r['vs_peer'])} of the peer, "
                  f"cos {r['cosine_mean']:.4f}", flush=True)
    machine = machine_info()
    lines = ["# MiniLM at fixed shapes: aigc_opt's OpenVINO int8 vs OpenVINO + NNCF int8 by hand", "",
             f"Machine: {describe_machine(machine)}. One process, OpenVINO "
             "only, interleaved rounds (ao.compare); the peer is the baseline, so the ratio is ours / peer "
             "(target <= 0.90x at cosine >= 0.99). Cosine per sentence against fp32 eager.", "", SETTINGS, ""]
    table = [[f"{res['shape']}, {100 * res['padding_fraction']:.0f}% padding", r["label"], f"{r['median_ms']:.2f}", f"{r['ci_ms'][0]:.2f}-{r['ci_ms'][1]:.2f}",
              fmt_ratio(*r["vs_peer"]), f"{r['prep_s']:.1f}", f"{r['cosine_mean']:.4f}", f"{r['cosine_min']:.4f}"]
             for res in results for r in res["rows"]]
    lines += markdown_table(["shape", "row", "p50 ms", "95% CI", "vs peer", "prep s", "cos mean", "cos min"], table)
    data = {**result_header("encoder_fixed"), "machine": machine, "results": results}
    print(write_results("encoder_fixed", data, lines, args.results_dir))


if __name__ == "__main__":
    main()
