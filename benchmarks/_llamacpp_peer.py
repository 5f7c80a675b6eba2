"""llama.cpp's side of benchmarks/llm_decode.py, run with the llama-cpp-python venv's own python.

Reads one JSON job on stdin, writes one JSON result on stdout:
  {"model": PATH, "threads": N, "prompt": [ids], "new_tokens": N, "rounds": N, "windows": [[ids], ...],
   "use_extra_bufts": true|false (optional; false: no weight repacking into extra buffer types such as AMX)}
-> {"ttft": [s per round], "total": [s per round], "tokens": [ids], "predictions": [[ids]], "nll": [[nats]],
    "peak_rss_bytes": N, "version": "..."}

Timing: per round, a 1-token greedy generate (prefill + one step) and a ``new_tokens`` one, from a
reset context, as aigc_opt's ``bench.generation`` times its models. Fidelity: each window of token
ids evaluated in one batch with ``logits_all=True``, the same positions the parent scores.
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np


def _peak_rss() -> int:
    """VmHWM (ru_maxrss would carry the forked parent's peak across exec on Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def generate(llm, prompt: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def main() -> None:
    import llama_cpp

    job = json.load(sys.stdin)
    if not job.get("use_extra_bufts", True):
        # llama.cpp's model params have no Python argument for it in llama-cpp-python: set it on the defaults
        # that Llama() starts from.
        import llama_cpp.llama_cpp as low_level

        defaults = low_level.llama_model_default_params

        def without_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params

        low_level.llama_model_default_params = without_extra_bufts
    window = max(len(w) for w in job["windows"]) if job["windows"] else 0
    n_ctx = max(len(job["prompt"]) + job["new_tokens"] + 8, window + 8, 512)
    llm = llama_cpp.Llama(model_path=job["model"], n_ctx=n_ctx, n_batch=n_ctx, n_threads=job["threads"],
                          n_threads_batch=job["threads"], logits_all=False, verbose=False)
    generate(llm, job["prompt"], 2)  # warm-up
    ttft, total, tokens = [], [], []
    for _ in range(job["rounds"]):
        start = time.perf_counter()
        generate(llm, job["prompt"], 1)
        ttft.append(time.perf_counter() - start)
        start = time.perf_counter()
        tokens = generate(llm, job["prompt"], job["new_tokens"])
        total.append(time.perf_counter() - start)
    del llm
    scorer = llama_cpp.Llama(model_path=job["model"], n_ctx=n_ctx, n_batch=n_ctx, n_threads=job["threads"],
                             n_threads_batch=job["threads"], logits_all=True, verbose=False)
    predictions, nll = [], []
    for ids in job["windows"]:
        scorer.reset()
        scorer.eval(ids)
        logits = np.asarray(scorer.scores[:len(ids) - 1], dtype=np.float64)
        predictions.append(logits.argmax(-1).tolist())
        top = logits.max(-1, keepdims=True)
        logz = (top[:, 0] + np.log(np.exp(logits - top).sum(-1)))
        nll.append((logz - logits[np.arange(len(ids) - 1), ids[1:]]).tolist())
    json.dump({"ttft": ttft, "total": total, "tokens": tokens, "predictions": predictions, "nll": nll,
               "peak_rss_bytes": _peak_rss(),
               "version": getattr(llama_cpp, "__version__", "?"), "use_extra_bufts": job.get("use_extra_bufts", True),
               "perplexity": math.exp(float(np.mean([x for row in nll for x in row]))) if nll else None},
              sys.stdout)


if __name__ == "__main__":
    main()
