"""A small GPT-2 trained here on Python's own docstrings, then generation benchmarked.

Everything is offline: the text is the standard library's docstrings, the tokenizer is a byte-
level BPE trained on them (tokenizers), the model a 4-layer GPT2LMHeadModel trained for
``--train-seconds``. Then ao.bench.generation compares fp32 eager with int8-dynamic: time to
first token, time per output token, tokens/s and greedy token agreement.

Writes benchmarks/results/gpt2_generation.json and .md.
    .venv/bin/python benchmarks/gpt2_generation.py [--train-seconds 120]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import time
from pathlib import Path

import torch

import aigc_opt as ao
from aigc_opt._deps import library_versions
from aigc_opt.bench import generation

RESULTS = Path(__file__).parent / "results"
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-seconds", type=float, default=120)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    texts = docstrings()
    tokenizer = build_tokenizer(texts)
    lm, training = train(texts, tokenizer, args.train_seconds)
    # GPT-2 stores its projections as transformers' Conv1D; the equivalent nn.Linear layers are
    # what int8 kernels (and most tools) take.
    from aigc_opt.passes._prune_hf import convert_conv1d

    convert_conv1d(lm)
    prompts = ["Return a new", "Create a temporary", "Parse the command line", "This module provides",
               "Raise an exception if", "Open the file and", "The default value is", "Convert the string"]
    enc = dict(tokenizer(prompts[:1], return_tensors="pt"))
    base = ao.Model(lm, example_inputs={"input_ids": enc["input_ids"]}, name="fp32 eager")
    base.tokenizer = tokenizer
    int8 = ao.quantize(base, "int8-dynamic", skip=("lm_head",))
    int8.name = "int8-dynamic"
    weight_only = ao.quantize(base, "int8-weight-only", skip=("lm_head",))
    weight_only.name = "int8-weight-only"
    bf16 = ao.quantize(base, "bf16")
    bf16.name = "bf16"
    report = generation(base, int8, weight_only, bf16, prompts=prompts, max_new_tokens=args.max_new_tokens,
                        rounds=args.rounds)
    print(report)
    sample = tokenizer.decode(report.baseline.tokens[0])
    results = {"benchmark": "gpt2_generation", "date": time.strftime("%Y-%m-%d"), "training": training,
               "prompts": prompts, "sample_continuation": sample, "report": report.to_dict(),
               "versions": library_versions()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpt2_generation.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Small GPT-2 generation ({results['date']})", "",
             f"GPT-2 (4 layers, 256 wide, {training['params']:,} parameters) trained here for "
             f"{args.train_seconds:.0f} s ({training['steps']} steps, final loss {training['final_loss']:.2f}) on "
             f"{training['tokens']:,} tokens of Python standard-library docstrings, with a byte-level BPE "
             f"tokenizer trained on them. Batch of {len(prompts)} prompts, {args.max_new_tokens} greedy tokens, "
             f"{args.rounds} interleaved rounds. The int8 variants leave lm_head in float.", "",
             "| metric | " + " | ".join([report.baseline.name, *[c.name for c in report.candidates]]) + " |",
             "|---|" + "---|" * (1 + len(report.candidates))]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in report.rows()]
    lines += ["", f"Sample (fp32, prompt {prompts[0]!r}): {sample!r}", ""]
    (RESULTS / "gpt2_generation.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
