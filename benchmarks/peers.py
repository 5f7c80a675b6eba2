"""all-MiniLM-L6-v2: aigc_opt's recipes against the peers, timed interleaved in one process.

Peers: Hugging Face Optimum's ONNX export + its avx512_vnni dynamic per-channel int8 recipe
(optimum-onnx pins transformers < 4.58, which conflicts with ours, so it runs in its own virtual
environment, benchmarks/.venv-optimum, created here; its ONNX files are then loaded into this
process with ao.Model.from_onnx and timed beside ours), torchao's int8 config used directly
(what our int8-dynamic wraps) and plain ONNX Runtime dynamic quantization.

Models output the last hidden state (feature extraction); fidelity is the cosine of mean-pooled,
normalized sentence embeddings against fp32 eager on the 400 shipped reference sentences.
Writes peers.json, .md and .png (the report's figure) into benchmarks/results/ (or --results-dir).
    .venv/bin/python benchmarks/peers.py [--iters 30] [--batch-size 8] [--results-dir PATH]
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import aigc_opt as ao  # noqa: E402
from _common import (base_parser, optimum_python, fmt_ci, fmt_ratio, latency_fields, markdown_table,  # noqa: E402
                     result_header, write_results)
from aigc_opt.demo import minilm_dir, reference_sentences, sentence_batches  # noqa: E402

HERE = Path(__file__).parent
PEER_OUT = HERE / ".peer-artifacts"


def optimum_artifacts() -> dict:
    py = optimum_python()  # benchmarks/.venv-optimum, made or completed on first use
    PEER_OUT.mkdir(exist_ok=True)
    subprocess.run([str(py), str(HERE / "_optimum_peer.py"), str(PEER_OUT)], check=True)
    return json.loads((PEER_OUT / "peer.json").read_text())


def last_hidden(out) -> torch.Tensor:
    """The last hidden state, whatever the runtime returned (a tensor, a tuple, a ModelOutput)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def embeddings(model: ao.Model, batches: list[dict]) -> torch.Tensor:
    out = []
    for b in batches:
        hidden = last_hidden(model.run(b))
        mask = b["attention_mask"].unsqueeze(-1).float()
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1))
    return torch.cat(out)


def torchao_direct(base: ao.Model) -> ao.Model:
    """torchao used by hand, as its README shows: quantize_ + torch.compile, default config."""
    import copy

    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    module = copy.deepcopy(base.artifact)
    quantize_(module, Int8DynamicActivationInt8WeightConfig())
    compiled = torch.compile(module)
    model = ao.Model(compiled, example_inputs=base.example_inputs, name="torchao int8 dynamic + torch.compile (direct)")
    model.run(base.example_inputs)  # compile outside the timed rounds
    return model


def ort_defaults(onnx_model: ao.Model) -> ao.Model:
    """Plain ONNX Runtime dynamic quantization with its defaults (per-tensor weights), no fusions."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    PEER_OUT.mkdir(exist_ok=True)
    out = PEER_OUT / "ort_dynamic_defaults.onnx"
    quantize_dynamic(str(onnx_model.artifact.path), str(out), weight_type=QuantType.QInt8)
    model = ao.Model.from_onnx(out, example_inputs=onnx_model.example_inputs)
    model = ao.compile(model, "onnxruntime", transformer_fusions=False)
    model.name = "ORT quantize_dynamic defaults (per-tensor)"
    return model


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    peer = optimum_artifacts()
    base = ao.Model.from_hf(minilm_dir(), task="feature-extraction", batch_size=args.batch_size, seq_len=128)
    base.name = "fp32 eager (transformers)"
    batches = sentence_batches(base, batch_size=args.batch_size, seq_len=128, sentences=reference_sentences())
    ours_torch = ao.compile(ao.quantize(base, "int8-dynamic"), "inductor")
    ours_torch.name = "aigc_opt int8-dynamic + inductor"
    # calibrated on 8 batches that are not among the timed ones (fidelity is over all 400 sentences)
    ours_static = ao.compile(ao.quantize(base, "int8-static", data=batches[-8:], verbose=False), "inductor")
    ours_static.name = "aigc_opt int8-static (PT2E) + inductor"
    onnx_model = ao.export(base, "onnx")
    ours_ort = ao.compile(ao.quantize(onnx_model, "int8-dynamic"), "onnxruntime")
    ours_ort.name = "aigc_opt ONNX int8-dynamic + ORT"
    # Optimum's graphs run through the same ONNX Runtime adapter and session settings as ours, but
    # without aigc_opt's graph fusions: the rows compare the graphs each library produces.
    optimum_fp32 = ao.compile(ao.Model.from_onnx(peer["fp32"], name="Optimum ONNX fp32"), "onnxruntime",
                              transformer_fusions=False)
    optimum_fp32.name = "Optimum ONNX fp32 (ORT)"
    optimum_int8 = ao.compile(ao.Model.from_onnx(peer["int8"], name="Optimum int8"), "onnxruntime",
                              transformer_fusions=False)
    optimum_int8.name = "Optimum avx512_vnni int8 (ORT)"
    candidates = [ours_static, ours_torch, ours_ort, optimum_fp32, optimum_int8, torchao_direct(base), ort_defaults(onnx_model)]
    report = ao.compare(base, *candidates, inputs=batches[:8], iters=args.iters, output_fn=last_hidden, top1=False,
                        verbose=False)
    print(report)
    reference = embeddings(base, batches)
    rows = []
    for c, entry in zip(candidates, report.candidates):
        cos = torch.nn.functional.cosine_similarity(embeddings(c, batches), reference, dim=1)
        rows.append({"variant": c.name, **latency_fields(entry), "embedding_cosine_mean": float(cos.mean()),
                     "embedding_cosine_min": float(cos.min()), "size_mb": entry.measurement.size_bytes / 1e6})
    results = {**result_header("peers"), "batch_size": args.batch_size,
               "baseline_p50_ms": report.baseline.measurement.median * 1e3, "rows": rows,
               "warnings": report._warnings(), "optimum": peer, "report": report.to_dict()}
    lines = [f"# all-MiniLM-L6-v2: aigc_opt vs peers ({results['date']})", "",
             f"Batch {args.batch_size}, sequence 128, {report.iters} interleaved rounds in one process "
             f"(fp32 eager p50 {results['baseline_p50_ms']:.1f} ms); embedding cosine over the 400 reference "
             f"sentences. Optimum {peer['versions']['optimum-onnx']} ran in its own venv (transformers "
             f"{peer['versions']['transformers']}) to export and quantize; its ONNX files were timed here, through "
             "the same ONNX Runtime adapter and session settings as ours (no spin-wait; on CPU, ORT's "
             "SkipLayerNorm/BiasGelu fusions off) but without aigc_opt's graph fusions.", ""]
    lines += markdown_table(
        ["variant", "latency vs fp32 eager", "95% CI", "p50 ms", "embedding cosine mean", "min", "size MB"],
        [[r["variant"], fmt_ratio(r["latency_ratio"]), fmt_ci(*r["ratio_ci95"]), f"{r['p50_ms']:.1f}",
          f"{r['embedding_cosine_mean']:.4f}", f"{r['embedding_cosine_min']:.4f}", f"{r['size_mb']:.1f}"]
         for r in rows])
    lines += [""] + [f"- warning: {w}" for w in results["warnings"]]
    print(write_results("peers", results, lines, args.results_dir, figures=[("peers.png", report)]))


if __name__ == "__main__":
    main()
