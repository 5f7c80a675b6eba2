"""A small GPT-2 trained here on Python's own docstrings, then generation benchmarked.

Everything is offline: the text is the standard library's docstrings, the tokenizer is a byte-
level BPE trained on them (tokenizers), the model a 4-layer GPT2LMHeadModel trained for
``--train-seconds``. Then ao.bench.generation times, interleaved in one process: fp32 eager,
torch.compile, aigc_opt's recipes (bf16, torch int8, ONNX export with KV cache in fp32 and int8)
and two peers run the same way (torchao used directly; ONNX Runtime's quantize_dynamic with its
defaults on the same exported graph): time to first token, time per output token, tokens/s and
greedy token agreement. Hugging Face Optimum (ORTModelForCausalLM, its avx512_vnni int8) runs in
its own venv and process (benchmarks/_optimum_gpt2_peer.py), timed against its own fp32 eager.

Writes gpt2_generation.json, .md and .png into benchmarks/results/ (or --results-dir).
    .venv/bin/python benchmarks/gpt2_generation.py [--train-seconds 120] [--no-optimum]
"""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import time
from pathlib import Path

import torch

import aigc_opt as ao
from aigc_opt.bench import generation
from _common import base_parser, optimum_python, result_header, tpot, write_results

HERE = Path(__file__).parent
PEER_OUT = HERE / ".peer-artifacts" / "gpt2"
MODULES = ["collections", "json", "os", "re", "pathlib", "argparse", "asyncio", "functools", "itertools",
           "inspect", "logging", "subprocess", "threading", "typing", "dataclasses", "textwrap", "shutil",
           "tempfile", "email", "http.client", "urllib.parse", "csv", "sqlite3", "unittest", "decimal"]


def docstrings() -> list[str]:
    texts = []
    for name in MODULES:
        module = importlib.import_module(name)
        for obj in [module, *vars(module).values()]:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)) else None
            if doc and len(doc) > 80:
                texts.append(doc)
    return sorted(set(texts))


def build_tokenizer(texts: list[str]):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=2048, min_frequency=2, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def train(texts: list[str], tokenizer, seconds: float, seq: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel

    ids = torch.tensor(tokenizer("<|endoftext|>".join(texts))["input_ids"])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=4, n_embd=256, n_positions=seq * 2,
                                       vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                                       eos_token_id=tokenizer.eos_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start, steps, loss = time.perf_counter(), 0, float("nan")
    while time.perf_counter() - start < seconds:
        offsets = torch.randint(0, len(ids) - seq - 1, (16,))
        batch = torch.stack([ids[o:o + seq] for o in offsets])
        out = model(input_ids=batch, labels=batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        steps, loss = steps + 1, float(out.loss)
    return model.eval(), {"tokens": len(ids), "steps": steps, "final_loss": loss,
                          "params": sum(p.numel() for p in model.parameters())}


def torchao_direct(base: ao.Model) -> ao.Model:
    """torchao used by hand, as its README shows: quantize_ (default config, every Linear, lm_head
    included) + torch.compile."""
    import copy

    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    module = copy.deepcopy(base.artifact)
    quantize_(module, Int8DynamicActivationInt8WeightConfig())
    # generate() calls module.forward, so that is what gets compiled (transformers' recipe for
    # compiled generation: model.forward = torch.compile(model.forward)).
    module.forward = torch.compile(module.forward)
    return ao.Model(module, example_inputs=base.example_inputs,
                    name="peer: torchao int8 dynamic + torch.compile (direct)")


def ort_defaults(onnx_model: ao.Model) -> ao.Model:
    """ONNX Runtime's quantize_dynamic with its defaults (per-tensor weights) on the same exported decoder."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from aigc_opt.runtime.onnxruntime import OnnxArtifact

    PEER_OUT.mkdir(parents=True, exist_ok=True)
    out = PEER_OUT / "ort_dynamic_defaults.onnx"
    quantize_dynamic(str(onnx_model.artifact.path), str(out), weight_type=QuantType.QInt8)
    model = ao.Model.from_onnx(out, example_inputs=onnx_model.example_inputs)
    model.artifact = OnnxArtifact(path=out, generation=onnx_model.artifact.generation)  # same loop as ours
    model.name = "peer: ORT quantize_dynamic defaults"
    return model


def optimum_peer(model_dir: Path, prompts: list[str], new_tokens: int, rounds: int, continuation: dict) -> dict:
    """Optimum's ORTModelForCausalLM in its own venv (it pins transformers < 4.58): export, int8, generate."""
    py = optimum_python()  # benchmarks/.venv-optimum, made or completed on first use
    out = PEER_OUT / "optimum"
    out.mkdir(parents=True, exist_ok=True)
    (out / "continuation.json").write_text(json.dumps(continuation))
    subprocess.run([str(py), str(HERE / "_optimum_gpt2_peer.py"), str(model_dir), str(out), json.dumps(prompts),
                    str(new_tokens), str(rounds), str(out / "continuation.json")], check=True,
                   stderr=subprocess.DEVNULL)
    return json.loads((out / "gpt2_peer.json").read_text())


def peer_rows(peer: dict, reference: list[list[int]], reference_predictions: list[list[int]]) -> list[dict]:
    import numpy as np

    from aigc_opt.bench.measurement import ratio_ci

    n = peer["new_tokens"]
    timings = peer["timings"]
    base_name = next(k for k in timings if k.startswith("fp32 eager"))
    base = timings[base_name]
    rows = []
    for name, t in timings.items():
        per_token = [tpot(total, first, n) for total, first in zip(t["total"], t["ttft"])]
        base_tpot = [tpot(total, first, n) for total, first in zip(base["total"], base["ttft"])]
        same = np.asarray(t["tokens"]) == np.asarray(reference)
        rows.append({"name": name, "ttft_p50": float(np.median(t["ttft"])), "tpot_p50": float(np.median(per_token)),
                     "ttft_ratio": None if name == base_name else list(ratio_ci(base["ttft"], t["ttft"])),
                     "tpot_ratio": None if name == base_name else list(ratio_ci(base_tpot, per_token)),
                     "tokens_per_second": n * peer["batch_size"] / float(np.median(t["total"])),
                     "token_agreement_with_our_fp32": float(same.mean()),
                     "next_token_agreement_with_our_fp32": float(np.mean(
                         np.asarray(t["teacher_forced_predictions"]) == np.asarray(reference_predictions)))})
    return rows


def baseline_continuation(tokenizer, prompts: list[str], baseline) -> dict:
    """Our fp32 continuation as the Optimum peer reads it, and fp32's own teacher-forced picks
    (``baseline``: the report's GenerationStats of fp32)."""
    from aigc_opt.bench.generation import continuation_batch

    enc = tokenizer(prompts, return_tensors="pt", padding=True)  # left-padded, as bench.generation set it
    seq, mask = continuation_batch(enc["input_ids"], enc["attention_mask"], baseline.tokens)
    return {"sequences": seq.tolist(), "attention_mask": mask.tolist(), "prompt_len": enc["input_ids"].shape[1],
            "predictions": baseline.next_token_predictions}


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--train-seconds", type=float, default=120)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-optimum", action="store_true", help="skip the Optimum peer (its own venv)")
    args = parser.parse_args()
    texts = docstrings()
    tokenizer = build_tokenizer(texts)
    lm, training = train(texts, tokenizer, args.train_seconds)
    model_dir = PEER_OUT / "model"
    lm.save_pretrained(model_dir)  # the Optimum peer loads the same weights
    tokenizer.save_pretrained(model_dir)
    # GPT-2 stores its projections as transformers' Conv1D; the equivalent nn.Linear layers are
    # what int8 kernels (and most tools) take.
    from aigc_opt.passes._prune_hf import convert_conv1d

    convert_conv1d(lm)
    prompts = ["Return a new", "Create a temporary", "Parse the command line", "This module provides",
               "Raise an exception if", "Open the file and", "The default value is", "Convert the string"]
    enc = dict(tokenizer(prompts[:1], return_tensors="pt"))
    base = ao.Model(lm, example_inputs={"input_ids": enc["input_ids"]}, name="fp32 eager")
    base.tokenizer = tokenizer

    def named(model: ao.Model, name: str) -> ao.Model:
        model.name = name
        return model

    onnx_fp32 = ao.export(base, "onnx")
    candidates = [
        named(ao.compile(base, "inductor"), "fp32 + torch.compile"),
        named(ao.quantize(base, "bf16"), "bf16"),
        named(ao.compile(ao.quantize(base, "int8-dynamic", skip=("lm_head",)), "inductor"), "int8-dynamic + inductor"),
        named(ao.compile(ao.quantize(base, "int8-weight-only", skip=("lm_head",)), "inductor"),
              "int8-weight-only + inductor"),
        named(ao.compile(onnx_fp32, "onnxruntime"), "ONNX fp32 + ORT"),
        named(ao.compile(ao.quantize(onnx_fp32, "int8-dynamic"), "onnxruntime"), "ONNX int8-dynamic + ORT"),
        torchao_direct(base),
        ort_defaults(onnx_fp32),
    ]
    report = generation(base, *candidates, prompts=prompts, max_new_tokens=args.max_new_tokens, rounds=args.rounds)
    print(report)
    optimum = None
    if not args.no_optimum:
        continuation = baseline_continuation(tokenizer, prompts, report.baseline)
        peer = optimum_peer(model_dir, prompts, args.max_new_tokens, args.rounds, continuation)
        optimum = {"rows": peer_rows(peer, report.baseline.tokens, continuation["predictions"]),
                   "versions": peer["versions"],
                   "export_seconds": peer["export_seconds"], "quantize_seconds": peer["quantize_seconds"]}
    sample = tokenizer.decode(report.baseline.tokens[0])
    results = {**result_header("gpt2_generation"), "training": training, "prompts": prompts,
               "sample_continuation": sample, "report": report.to_dict(), "optimum_peer": optimum}
    lines = [f"# Small GPT-2 generation ({results['date']})", "",
             f"GPT-2 (4 layers, 256 wide, {training['params']:,} parameters) trained here for "
             f"{args.train_seconds:.0f} s ({training['steps']} steps, final loss {training['final_loss']:.2f}) on "
             f"{training['tokens']:,} tokens of Python standard-library docstrings, with a byte-level BPE "
             f"tokenizer trained on them. Batch of {len(prompts)} left-padded prompts, {args.max_new_tokens} greedy "
             f"tokens, {args.rounds} rounds in a shuffled order per round; ratios with 95% bootstrap intervals "
             "over the paired rounds. The torch int8 variants leave lm_head in float; compiled rows run "
             "transformers' generate with the compiled forward. The ONNX rows are "
             "Export('onnx') of the causal LM (a decoder step taking and returning its KV cache) driven by "
             "aigc_opt's greedy loop in ONNX Runtime (Model.generate); the ORT-defaults peer is the same graph "
             "quantized by quantize_dynamic with its defaults. Greedy token agreement compares free-running "
             "continuations, where one early near-tie changes everything after it; the teacher-forced "
             "next-token agreement has every model read fp32's continuation and compares top-1 picks "
             "position by position, which is the steadier fidelity number on a model this small.", "",
             report.to_markdown()]
    if optimum:
        fmt = lambda r: f"{r[0]:.2f}x [{r[1]:.2f}, {r[2]:.2f}]" if r else "1.00x"  # noqa: E731
        lines += ["", "## Peer: Hugging Face Optimum (own venv and process)", "",
                  f"optimum-onnx {optimum['versions']['optimum-onnx']}, transformers "
                  f"{optimum['versions']['transformers']}, onnxruntime {optimum['versions']['onnxruntime']}: "
                  "ORTModelForCausalLM.from_pretrained(export=True, use_cache=True), ORTQuantizer with "
                  "AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True), sessions without "
                  "spin-waiting like ours, generate() with the same prompts and protocol. Ratios are against "
                  "fp32 eager timed interleaved in that process (its transformers version, which may be slower "
                  "or faster than ours); the last column divides its median by our fp32 eager median from the "
                  "table above (measured a minute apart on the same machine, not paired).", "",
                  "| model | TTFT p50 (ms) | TTFT vs its fp32 eager | TPOT p50 (ms) | TPOT vs its fp32 eager "
                  "| tokens/s | token agreement with our fp32 | next-token agreement (teacher-forced) "
                  "| TPOT / our fp32 eager TPOT |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['ttft_p50'] * 1e3:.2f} | {fmt(r['ttft_ratio'])} | {r['tpot_p50'] * 1e3:.2f} | "
                  f"{fmt(r['tpot_ratio'])} | {r['tokens_per_second']:.1f} | {r['token_agreement_with_our_fp32']:.3f} "
                  f"| {r['next_token_agreement_with_our_fp32']:.3f} | {r['tpot_p50'] / report.baseline.tpot_p50:.2f}x |" for r in optimum["rows"]]
    lines += ["", f"Sample (fp32, prompt {prompts[0]!r}): {sample!r}"]
    print(write_results("gpt2_generation", results, lines, args.results_dir,
                        figures=[("gpt2_generation.png", report)]))


if __name__ == "__main__":
    main()
