"""Runs inside benchmarks/.venv-optimum (made by peers.py): Hugging Face Optimum's ONNX Runtime
path for a causal LM, on the small GPT-2 that gpt2_generation.py trained and saved.

    python _optimum_gpt2_peer.py MODEL_DIR OUT_DIR PROMPTS_JSON MAX_NEW_TOKENS ROUNDS [CONTINUATION_JSON]

Exports the model with its KV cache (ORTModelForCausalLM, use_cache=True), quantizes it with
Optimum's avx512_vnni dynamic int8 recipe, and times greedy ``generate`` of fp32 eager torch (this
venv's transformers), ORT fp32 and ORT int8 interleaved, in the same protocol as
aigc_opt.bench.generation: per round, a 1-token generate (time to first token) then a full one;
time per output token = (full - first) / (N - 1). Writes OUT_DIR/gpt2_peer.json with raw
timings, greedy tokens and versions; agreement is computed by the caller against its own fp32.
With CONTINUATION_JSON (the caller's fp32 continuation: sequences, attention_mask, prompt_len),
each model also reads that continuation in one forward pass and its top-1 prediction at every
generated position is saved, for the teacher-forced agreement.
"""

import inspect
import json
import os
import random
import sys
import time
from importlib.metadata import version

os.environ["HF_HUB_OFFLINE"] = "1"

import onnxruntime  # noqa: E402
import torch  # noqa: E402
from optimum.onnxruntime import ORTModelForCausalLM, ORTQuantizer  # noqa: E402
from optimum.onnxruntime.configuration import AutoQuantizationConfig  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

model_dir, out, prompts_json, new_tokens, rounds = sys.argv[1:6]
new_tokens, rounds = int(new_tokens), int(rounds)
prompts = json.loads(prompts_json)

start = time.perf_counter()
ORTModelForCausalLM.from_pretrained(model_dir, export=True, use_cache=True).save_pretrained(f"{out}/fp32")
export_seconds = time.perf_counter() - start
start = time.perf_counter()
ORTQuantizer.from_pretrained(f"{out}/fp32", file_name="model.onnx").quantize(
    save_dir=f"{out}/int8", quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True))
quantize_seconds = time.perf_counter() - start

# The same session settings as aigc_opt's ORT adapter: no spin-waiting (on 2 cores a spinning
# pool slows whatever runs next), all graph optimizations.
options = onnxruntime.SessionOptions()
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
options.add_session_config_entry("session.inter_op.allow_spinning", "0")
options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
# tokenizer.json only: the tokenizer class name transformers 5 saves is unknown to this venv's 4.57.
tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json", eos_token="<|endoftext|>")
tokenizer.padding_side = "left"
tokenizer.pad_token = tokenizer.eos_token
models = {
    "fp32 eager (peer venv)": AutoModelForCausalLM.from_pretrained(model_dir).eval(),
    "Optimum ORT fp32": ORTModelForCausalLM.from_pretrained(f"{out}/fp32", use_cache=True, session_options=options,
                                                            provider="CPUExecutionProvider"),
    "Optimum ORT int8": ORTModelForCausalLM.from_pretrained(f"{out}/int8", file_name="model_quantized.onnx",
                                                            use_cache=True, session_options=options,
                                                            provider="CPUExecutionProvider"),
}
enc = dict(tokenizer(prompts, return_tensors="pt", padding=True, return_token_type_ids=False))
prompt_len = enc["input_ids"].shape[1]


def generate(model, n):
    with torch.inference_mode():
        return model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id)


timings = {name: {"ttft": [], "total": [], "tokens": None} for name in models}
for model in models.values():
    generate(model, 2)  # warm-up
order = list(models)
shuffle = random.Random(0)
for _ in range(rounds):
    shuffle.shuffle(order)  # like ao.compare: no model always follows the same neighbour
    for name in order:
        t0 = time.perf_counter()
        generate(models[name], 1)
        timings[name]["ttft"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ids = generate(models[name], new_tokens)
        timings[name]["total"].append(time.perf_counter() - t0)
        timings[name]["tokens"] = ids[:, prompt_len:].tolist()

if len(sys.argv) > 6:
    continuation = json.loads(open(sys.argv[6]).read())
    seq, mask = torch.tensor(continuation["sequences"]), torch.tensor(continuation["attention_mask"])
    first = continuation["prompt_len"] - 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0).masked_fill(mask == 0, 1)  # transformers' rule
    for name, model in models.items():
        kwargs = {"input_ids": seq, "attention_mask": mask}
        if "position_ids" in inspect.signature(model.forward).parameters:
            kwargs["position_ids"] = positions
        with torch.inference_mode():
            logits = model(**kwargs).logits
        timings[name]["teacher_forced_predictions"] = logits[:, first:-1].argmax(-1).tolist()

json.dump({"export_seconds": export_seconds, "quantize_seconds": quantize_seconds, "new_tokens": new_tokens,
           "rounds": rounds, "batch_size": len(prompts), "timings": timings,
           "onnx": {"fp32": f"{out}/fp32/model.onnx", "int8": f"{out}/int8/model_quantized.onnx"},
           "versions": {p: version(p) for p in ("optimum", "optimum-onnx", "onnxruntime", "transformers", "torch")}},
          open(f"{out}/gpt2_peer.json", "w"), indent=2)
