"""Probe: torch decoding recipes on a GGUF LLM (default SmolLM2-135M Q4_1), batch 1, greedy.

For each recipe: the compile cost (graphs compiled during the first generate, dynamo's compile
seconds), decode ms/token ((t(N tokens) - t(1 token)) / (N - 1), median of --rounds), graphs compiled
by later calls (0 = the decode step never recompiled), and teacher-forced next-token agreement with
fp32 and perplexity over --windows x 256 tokens of aigc_opt's held-out text. A rough probe, not the
benchmark: recipes run one after another in one process (no interleaving).

    chrt -i 0 .venv/bin/python benchmarks/_torch_decode_probe.py [--model X.gguf] [--only int4 ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from typing import Any

import torch

import aigc_opt as ao
from aigc_opt.bench.llm import agreement, heldout_text, text_scores, text_windows
from aigc_opt.passes._quant_torch_int4cpu import int4_cpu_weight_only
from _common import tpot
from aigc_opt.runtime import torch_module
from llm_decode import QUESTIONS, default_model


@contextlib.contextmanager
def dynamic_cache_path():
    """The decode loop before the static cache: transformers' DynamicCache on the compiled forward."""
    old = torch_module._static_decode
    torch_module._static_decode = lambda artifact, module: None
    try:
        yield
    finally:
        torch_module._static_decode = old


def int4_model(base: ao.Model, group_size: int, skip: tuple[str, ...] = ()) -> ao.Model:
    module = copy.deepcopy(base.artifact)
    names = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and n not in skip]
    details = int4_cpu_weight_only(module, group_size, names)
    print("int4 details:", json.dumps(details)[:400])
    return ao.Model(module, example_inputs=base.example_inputs, name=f"int4 g{group_size}")


def timed(model: ao.Model, ids: torch.Tensor, new_tokens: int, rounds: int, old_path: bool) -> dict[str, Any]:
    ctx = dynamic_cache_path if old_path else contextlib.nullcontext
    with ctx():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        first = time.perf_counter() - start
        per_token = []
        for _ in range(rounds):
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1)
            one = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            per_token.append(tpot(time.perf_counter() - start, one, new_tokens))
    stats = dict(getattr(model.artifact, "decode_stats", {}))
    return {"first_generate_s": round(first, 2), "ms_per_token": round(1e3 * statistics.median(per_token), 2),
            "ms_per_token_all": [round(1e3 * t, 2) for t in per_token], "decode_stats": stats,
            "tokens": out[0, ids.shape[1]:].tolist()}


def interleaved(base: ao.Model, ids: torch.Tensor, new_tokens: int, rounds: int) -> None:
    """fp32 and int4 (lm_head fp32), eager and compiled, timed in turn within each round (rough, but
    the four see the same load); compile once per model: about 8 graphs per code object is dynamo's limit."""
    q = int4_model(base, 32, skip=("lm_head",))
    models = {"fp32 eager": base, "fp32 + inductor, static cache": ao.compile(base, "inductor"),
              "int4 g32 lm_head fp32, eager": q, "int4 g32 lm_head fp32 + inductor, static cache": ao.compile(q, "inductor")}
    for m in models.values():
        m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            start = time.perf_counter()
            m.generate(ids, max_new_tokens=1, min_new_tokens=1)
            one = time.perf_counter() - start
            start = time.perf_counter()
            m.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            times[name].append(1e3 * tpot(time.perf_counter() - start, one, new_tokens))
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.1f} | {[round(x, 1) for x in t]} | "
              f"{getattr(models[name].artifact, 'decode_stats', {}).get('graphs_per_call', '-')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--interleaved", action="store_true", help="only the fp32/int4 eager/compiled A/B")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = ao.Model.from_gguf(args.model or default_model())
    tok = base.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], tokenize=False,
                                     add_generation_prompt=True)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    if args.interleaved:
        return interleaved(base, ids, args.new_tokens, args.rounds)
    recipes = {
        "fp32 eager": lambda: base,
        "fp32 + inductor, DynamicCache (before)": lambda: ao.compile(base, "inductor"),
        "fp32 + inductor, static cache": lambda: ao.compile(base, "inductor"),
        "int8-weight-only + inductor, static cache": lambda: ao.compile(ao.quantize(base, "int8-weight-only"),
                                                                         "inductor"),
        "int4 CPU g32 + inductor, static cache": lambda: ao.compile(int4_model(base, 32), "inductor"),
        "int4 CPU g32, lm_head fp32 + inductor, static cache": lambda: ao.compile(
            int4_model(base, 32, skip=("lm_head",)), "inductor"),
    }
    windows = text_windows(tok, heldout_text(), window=256, count=args.windows)
    reference = text_scores(base, windows)
    rows = {}
    for name, build in recipes.items():
        if args.only and not any(k in name for k in args.only):
            continue
        start = time.perf_counter()
        model = build()
        built = time.perf_counter() - start
        row = timed(model, ids, args.new_tokens, args.rounds, old_path="before" in name)
        scores = text_scores(model, windows)
        row.update(build_s=round(built, 1), agreement=round(agreement(reference, scores), 4),
                   perplexity=round(scores.perplexity, 3), positions=scores.positions)
        rows[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
        del model
    fp32_tokens = rows.get("fp32 eager", {}).get("tokens")
    print("\n| recipe | ms/token | build s | first generate s | graphs (per call) | compile s | agreement | ppl | greedy = fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        st = r["decode_stats"]
        same = "" if fp32_tokens is None else sum(a == b for a, b in zip(r["tokens"], fp32_tokens))
        print(f"| {name} | {r['ms_per_token']} | {r['build_s']} | {r['first_generate_s']} | "
              f"{st.get('graphs_per_call', '')} | {st.get('compile_seconds', '')} | {r['agreement']} | "
              f"{r['perplexity']} | {same}/{len(r['tokens'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
