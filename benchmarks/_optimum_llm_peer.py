"""Hugging Face Optimum's side of benchmarks/llm_decode.py, run with benchmarks/.venv-optimum's python
(optimum-onnx pins a transformers older than ours, so it runs in its own venv and process).

Reads one JSON job on stdin, writes one JSON result on stdout:
  {"model": PATH.gguf, "out": DIR, "threads": N, "prompt": [ids], "new_tokens": N, "rounds": N,
   "windows": [[ids], ...]}
-> {"models": {name: {"ttft": [s], "total": [s], "tokens": [ids], "predictions": [[ids]], "nll": [[nats]],
                      "file_bytes": N}}, "export_seconds": s, "quantize_seconds": s, "versions": {...}}

The GGUF is read by this venv's own transformers (``gguf_file=``, dequantized to fp32 as ours is) and
saved, so the exported config is the one this transformers writes; ``ORTModelForCausalLM`` exports it with
its KV cache, and Optimum's ``avx512_vnni`` dynamic int8 recipe quantizes it (Optimum's documented CPU
path; it has no weight-only int4 for ONNX). Timing: the llama.cpp peer's protocol (per round, from a fresh
generate, a 1-token then an N-token greedy generate; the two models interleaved, order shuffled per
round), ONNX Runtime with its defaults (spinning threads, all graph optimizations) and ``threads`` intra-op
threads: alone in its process, as our "alone" column and llama.cpp run. Fidelity: each window of token ids in
one forward pass, the positions the parent scores.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402
from optimum.onnxruntime import ORTModelForCausalLM, ORTQuantizer  # noqa: E402
from optimum.onnxruntime.configuration import AutoQuantizationConfig  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def build(gguf: Path, out: Path) -> tuple[float, float]:
    """fp32 HF folder -> Optimum ONNX export (KV cache) -> Optimum dynamic int8; seconds of each step."""
    hf = out / "hf"
    AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(hf)
    start = time.perf_counter()
    ORTModelForCausalLM.from_pretrained(hf, export=True, use_cache=True).save_pretrained(out / "fp32")
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    ORTQuantizer.from_pretrained(out / "fp32", file_name="model.onnx").quantize(
        save_dir=out / "int8", quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True))
    return export_s, time.perf_counter() - start


def generate(model, prompt: torch.Tensor, n: int, eos: int) -> list[int]:
    with torch.inference_mode():
        ids = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=eos)
    return ids[0, prompt.shape[1]:].tolist()


def score(model, windows: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
    predictions, nll = [], []
    for ids in windows:
        x = torch.tensor([ids])
        with torch.inference_mode():
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, :-1].double()
        predictions.append(logits.argmax(-1).tolist())
        nll.append(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none").tolist())
    return predictions, nll


def main() -> None:
    job = json.load(sys.stdin)
    out = Path(job["out"])
    export_s, quantize_s = build(Path(job["model"]), out)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = job["threads"]
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    load = dict(use_cache=True, session_options=options, provider="CPUExecutionProvider")
    models = {"Optimum ORT fp32": ORTModelForCausalLM.from_pretrained(out / "fp32", **load),
              "Optimum ORT int8-dynamic (avx512_vnni)": ORTModelForCausalLM.from_pretrained(
                  out / "int8", file_name="model_quantized.onnx", **load)}
    files = {"Optimum ORT fp32": out / "fp32", "Optimum ORT int8-dynamic (avx512_vnni)": out / "int8"}
    eos = models["Optimum ORT fp32"].config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    prompt = torch.tensor([job["prompt"]])
    result = {name: {"ttft": [], "total": [], "tokens": [],
                     "file_bytes": sum(f.stat().st_size for f in files[name].glob("*.onnx*"))} for name in models}
    for model in models.values():
        generate(model, prompt, 2, eos)  # warm-up
    order, shuffle = list(models), random.Random(0)
    for _ in range(job["rounds"]):
        shuffle.shuffle(order)
        for name in order:
            start = time.perf_counter()
            generate(models[name], prompt, 1, eos)
            result[name]["ttft"].append(time.perf_counter() - start)
            start = time.perf_counter()
            result[name]["tokens"] = generate(models[name], prompt, job["new_tokens"], eos)
            result[name]["total"].append(time.perf_counter() - start)
    for name, model in models.items():
        result[name]["predictions"], result[name]["nll"] = score(model, job["windows"])
        flat = [x for row in result[name]["nll"] for x in row]
        result[name]["perplexity"] = math.exp(float(np.mean(flat))) if flat else None
    json.dump({"models": result, "export_seconds": export_s, "quantize_seconds": quantize_s,
               "versions": {p: version(p) for p in ("optimum", "optimum-onnx", "onnxruntime", "transformers", "torch")}},
              sys.stdout)


if __name__ == "__main__":
    main()
