"""Generation benchmark: TTFT, TPOT, tokens/s, greedy token agreement (tiny GPT-2, offline)."""

from __future__ import annotations

import pytest
import torch

import aigc_opt as ao
from aigc_opt.bench import generation
from aigc_opt.errors import ConfigError, UnsupportedModelError
from toy_models import make_mlp

transformers = pytest.importorskip("transformers", reason="the [hf] extra is part of `make test`")


@pytest.fixture(scope="module")
def tiny_gpt2():
    from aigc_opt.demo import minilm_dir

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())  # any offline tokenizer works
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128,
                                     vocab_size=tokenizer.vocab_size)
    lm = transformers.GPT2LMHeadModel(config).eval()
    enc = dict(tokenizer(["hello world"], return_tensors="pt"))
    model = ao.Model(lm, example_inputs={"input_ids": enc["input_ids"]}, name="tiny-gpt2")
    model.tokenizer = tokenizer
    return model


def test_generation_metrics_and_agreement(tiny_gpt2):
    prompts = ["the cat sat on the", "quantization makes models"]
    same = generation(tiny_gpt2, tiny_gpt2, prompts=prompts, max_new_tokens=6, rounds=3)
    cand = same.candidates[0]
    assert cand.token_agreement == 1.0 and cand.first_divergence is None
    assert len(cand.tokens) == 2 and all(len(t) == 6 for t in cand.tokens)
    b = same.baseline
    # One timing per round; TPOT is the rest of the full generate over the remaining tokens. (No
    # ttft < total check: they are separate calls, and a loaded machine can reorder them.)
    assert len(b.ttft) == len(b.total) == 3 and min(b.ttft) > 0 and min(b.total) > 0
    assert b.tpot == pytest.approx([(t - f) / 5 for t, f in zip(b.total, b.ttft)])
    assert b.tpot_p50 > 0 and b.tokens_per_second == pytest.approx(12 / (sorted(b.total)[1]))

    # Damage the candidate's output layer: its greedy tokens must diverge from the first one.
    broken = ao.Model(transformers.GPT2LMHeadModel(tiny_gpt2.artifact.config).eval(), name="random-gpt2")
    report = generation(tiny_gpt2, broken, prompts=prompts, max_new_tokens=6, rounds=2)
    assert report.candidates[0].token_agreement < 0.5 and report.candidates[0].first_divergence == 0
    text = str(report)
    for row in ("time to first token", "time per output token", "tokens/s", "greedy token agreement"):
        assert row in text
    assert report.to_dict()["candidates"][0]["token_agreement"] < 0.5


def test_int8_generation_runs_and_mostly_agrees(tiny_gpt2):
    q = ao.quantize(tiny_gpt2, "int8-dynamic")
    report = generation(tiny_gpt2, q, prompts=["a b c d"], max_new_tokens=4, rounds=2)
    assert 0.0 <= report.candidates[0].token_agreement <= 1.0
    assert report.candidates[0].tpot_ratio[1] <= report.candidates[0].tpot_ratio[2]


def test_generation_bad_input(tiny_gpt2):
    with pytest.raises(ConfigError, match="prompts"):
        generation(tiny_gpt2, prompts="just a string")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generation(tiny_gpt2, prompts=["x"], max_new_tokens=1)
    with pytest.raises(UnsupportedModelError, match="generate"):
        generation(ao.Model(make_mlp()), prompts=["x"])
    no_tok = ao.Model(tiny_gpt2.artifact)
    with pytest.raises(ConfigError, match="tokenizer"):
        generation(no_tok, prompts=["x"])


def test_generate_from_a_compiled_model_runs_the_compiled_forward(tiny_gpt2):
    """transformers' generate calls module.forward, which torch.compile's wrapper leaves eager."""
    from torch._dynamo.utils import counters

    compiled = ao.compile(tiny_gpt2, "inductor")
    ids = tiny_gpt2.example_inputs["input_ids"]
    expected = tiny_gpt2.generate(ids, max_new_tokens=3, min_new_tokens=3)
    frames = counters["frames"]["ok"]
    got = compiled.generate(ids, max_new_tokens=3, min_new_tokens=3)
    assert counters["frames"]["ok"] > frames  # dynamo compiled frames while generating
    assert torch.equal(got, expected)
    assert "forward" not in compiled.artifact._orig_mod.__dict__  # the class's forward again after generate
    # GPT-2 takes a static KV cache: transformers compiles the decode step once (runtime/torch_module.py)
    assert compiled.artifact.decode_stats["graphs_per_call"][0] >= 1
    compiled.generate(ids[:, :-1], max_new_tokens=4, min_new_tokens=4)
    assert compiled.artifact.decode_stats["graphs_per_call"][1] == 0  # same cache bucket: nothing recompiled


def test_teacher_forced_agreement_reads_the_baselines_continuation(tiny_gpt2):
    """Each model reads the baseline's continuation; its top-1 pick is compared position by position."""
    from aigc_opt.bench.generation import continuation_batch, next_token_logits

    prompts = ["the cat sat on the", "quantization"]
    same = generation(tiny_gpt2, tiny_gpt2, prompts=prompts, max_new_tokens=5, rounds=1)
    assert same.candidates[0].next_token_agreement == 1.0
    # The baseline's own teacher-forced picks are its greedy tokens (left padding and positions right).
    tok = tiny_gpt2.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True)
    seq = torch.cat([enc["input_ids"], torch.tensor(same.baseline.tokens)], dim=1)
    mask = torch.cat([enc["attention_mask"], torch.ones(2, 5, dtype=torch.long)], dim=1)
    picks = next_token_logits(tiny_gpt2, seq, mask)[:, enc["input_ids"].shape[1] - 1:-1].argmax(-1)
    assert picks.tolist() == same.baseline.tokens
    assert same.baseline.next_token_predictions == same.baseline.tokens  # kept in the report, for peers
    built = continuation_batch(enc["input_ids"], enc["attention_mask"], same.baseline.tokens)
    assert torch.equal(built[0], seq) and torch.equal(built[1], mask)
    # A model with a different (random, untied) output layer disagrees at most positions.
    import copy

    lm = copy.deepcopy(tiny_gpt2.artifact)
    torch.manual_seed(1)
    lm.lm_head = torch.nn.Linear(lm.config.n_embd, lm.config.vocab_size, bias=False)
    report = generation(tiny_gpt2, ao.Model(lm, name="other-head"), prompts=prompts, max_new_tokens=5, rounds=1)
    assert report.candidates[0].next_token_agreement < 0.5
    assert "next-token agreement (teacher-forced)" in str(report)


def test_generation_report_plot_and_markdown(tiny_gpt2, tmp_path):
    pytest.importorskip("matplotlib", reason="the [plot] extra is part of `make test`")
    report = generation(tiny_gpt2, tiny_gpt2, prompts=["the cat"], max_new_tokens=3, rounds=2)
    path = report.plot(tmp_path / "generation.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["generation.png"]  # no temporary file left
    md = report.to_markdown().splitlines()
    assert md[0] == "| metric | tiny-gpt2 | tiny-gpt2 #2 |" and len(md) == 2 + len(report.rows())  # told apart
    assert md[-1].startswith("| next-token agreement (teacher-forced) | 1 | 1.000 |")
