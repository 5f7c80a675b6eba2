"""ao.tune with a generation workload (issue #20): decode ms/token against teacher-forced next-token
agreement on a tiny random-weight Llama (built from a config, no download), and early pruning of
prefixes that failed or were beyond max_drop."""

from __future__ import annotations

import pytest
import torch

import aigc_opt as ao
from aigc_opt.errors import ConfigError, InvalidInputError

pytest.importorskip("optuna")
pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

from aigc_opt.tune import evaluate as tune_evaluate  # noqa: E402
from aigc_opt.tune.space import build_candidates  # noqa: E402

VOCAB = 96


@pytest.fixture(autouse=True)
def _fast_timing(monkeypatch, tmp_path):
    monkeypatch.setenv("AIGC_OPT_MAX_ITERS", "6")
    monkeypatch.setenv("AIGC_OPT_TUNE_LOCK", str(tmp_path / "timing.lock"))


@pytest.fixture(scope="module")
def llama() -> ao.Model:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    module = transformers.LlamaForCausalLM(cfg).eval()
    return ao.Model(module, example_inputs={"input_ids": torch.randint(3, VOCAB, (1, 6))}, name="tiny-llama")


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # a shorter prompt, left-padded
    return ids, mask


def _mlp() -> ao.Model:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).eval()
    return ao.Model(net, example_inputs=(torch.randn(16, 32),), name="mlp")


def test_bad_generation_workloads_are_refused_with_the_fix():
    ids, mask = _ids()
    W = ao.tune.GenerationWorkload
    with pytest.raises(ConfigError, match="exactly one"):
        W()
    with pytest.raises(ConfigError, match="exactly one"):
        W(prompts=["a"], input_ids=ids)
    with pytest.raises(ConfigError, match="non-empty list"):
        W(prompts="hello")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        W(input_ids=ids, max_new_tokens=1)
    with pytest.raises(ConfigError, match="batch"):
        W(input_ids=ids, batch=0)
    with pytest.raises(ConfigError, match="objective"):
        W(input_ids=ids, objective="throughput")
    with pytest.raises(InvalidInputError, match="2-D int64"):
        W(input_ids=ids.float())
    with pytest.raises(InvalidInputError, match="shaped like input_ids"):
        W(input_ids=ids, attention_mask=mask[:, 1:])
    right = mask.flip(1)
    with pytest.raises(InvalidInputError, match="pad on the left"):
        W(input_ids=ids, attention_mask=right)
    wl = W(input_ids=ids, attention_mask=mask, max_new_tokens=4, batch=2)
    batches = wl.batches(_mlp())
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    assert torch.equal(batches[0]["attention_mask"], mask[:2])
    # A model that cannot generate is refused before any work
    with pytest.raises(ConfigError, match="causal LM"):
        ao.tune(_mlp(), workload=wl, budget="1m")
    with pytest.raises(ConfigError, match="no tokenizer"):
        ao.tune.GenerationWorkload(prompts=["hi"]).batches(_mlp())


def test_the_decoder_space_keeps_only_formats_that_generate(llama):
    from aigc_opt.tune.generation import filter_generation

    space = ao.tune.Space(quantize=("int4-weight-only", "int8-weight-only", "int8-dynamic"),
                          compile=("onnxruntime", "inductor", "openvino"))
    cands = build_candidates(space, llama, llama.target, have_data=False, varied_shapes=False,
                             have_eval=False, max_drop=0.02, keep=filter_generation)
    assert {"none", "onnx"} <= set(cands.routes)
    refused = dict(cands.refused)
    for r in ("openvino", "torch.export"):  # these formats cannot run generate here
        assert r not in cands.routes and "cannot generate" in refused[f"route {r}"]
    onnx_quant = {v.passes[0].method for v in cands.quantize["onnx"] if v.passes}
    assert {"int4-weight-only", "int8-weight-only"} <= onnx_quant
    int4 = next(v.passes[0] for v in cands.quantize["onnx"] if v.passes and v.passes[0].method == "int4-weight-only")
    assert int4.reuse_blocks  # GGUF blocks are reused when the model came from one
    assert "onnxruntime" in {v.passes[0].backend for v in cands.compile["onnx"] if v.passes}
    assert "int8-weight-only" in {v.passes[0].method for v in cands.quantize["none"] if v.passes}


def _held_out(n: int = 320) -> torch.Tensor:
    """Token ids standing for held-out text (the tiny model has no tokenizer)."""
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(7))


def test_tune_times_decode_per_token_and_checks_teacher_forced_agreement_on_held_out_text(llama):
    from aigc_opt.bench.llm import text_scores

    ids, mask = _ids()
    # 300 positions asked, windows of 64 tokens (63 positions each): 5 windows, 315 positions
    wl = ao.tune.GenerationWorkload(input_ids=ids, attention_mask=mask, max_new_tokens=16, fidelity_positions=300,
                                    fidelity_window=64, fidelity_ids=_held_out())
    assert wl.positions == 315 and wl.windows_count == 5
    before = {k: v.clone() for k, v in llama.artifact.state_dict().items()}
    space = ao.tune.Space(routes=("none",), quantize=("int8-weight-only",), compile=(), prune=(), options={})
    result = ao.tune(llama, workload=wl, max_drop=0.5, budget="3m", space=space, time_per_trial=1, verbose=False)
    assert all(torch.equal(v, llama.artifact.state_dict()[k]) for k, v in before.items())  # input untouched
    assert result.metric_name == "next-token agreement" and result.baseline_metric == 1.0
    assert "16 new tokens" in result.workload and "decode" in result.workload and "315 positions" in result.workload
    done = [t for t in result.trials if t.state == "complete"]
    assert [t.recipe for t in result.trials] == ["Quantize(method='int8-weight-only')"]
    assert done, result.to_markdown()
    windows = _held_out()[:320].reshape(5, 64)
    base_scores = text_scores(llama, windows)
    for t in done:
        lo, mid, hi = t.latency_ratio[1], t.latency_ratio[0], t.latency_ratio[2]
        assert 0 < lo <= mid <= hi
        d = t.details
        assert d["decode_ms_per_token"] > 0 and d["baseline_decode_ms_per_token"] > 0
        assert d["ttft_ratio"][1] <= d["ttft_ratio"][0] <= d["ttft_ratio"][2]
        # the fidelity is teacher-forced agreement over the 315 held-out positions, recomputed here
        model = ao.Pipeline.from_dict({"passes": t.passes}).apply(llama, verbose=False)
        scores = text_scores(model, windows)
        same = int((scores.predictions == base_scores.predictions).sum())
        assert d["positions"] == 315 and abs(t.metric - same / 315) < 1e-9 and abs(t.drop - (1 - same / 315)) < 1e-9
        assert abs(d["perplexity_ratio"] - scores.perplexity / base_scores.perplexity) < 1e-6
        assert abs(d["perplexity"] - scores.perplexity) < 1e-6
    assert "next-token agreement" in result.to_markdown()


class _Fake:
    """Stands for a model in next_token_logits below: logits that predict the text's own next token,
    except at the ``flip`` positions ((window, column) of ``windows``)."""

    def __init__(self, windows: torch.Tensor, flip: tuple[tuple[int, int], ...] = ()):
        self.windows, self.flip = windows, flip


def _fake_logits(model, ids, mask):
    logits = torch.nn.functional.one_hot(torch.roll(ids, -1, dims=1), VOCAB).float()
    for row, window in enumerate(ids):  # text_scores reads one window per call
        w = next(i for i, x in enumerate(model.windows) if torch.equal(x, window))
        for c in [c for r, c in model.flip if r == w]:
            logits[row, c] = torch.nn.functional.one_hot((window[c + 1] + 1) % VOCAB, VOCAB).float()
    return logits


def test_one_differing_position_of_300_is_a_drop_of_one_in_300(monkeypatch):
    from aigc_opt.bench import llm
    from aigc_opt.tune.generation import GenerationData

    monkeypatch.setattr(llm, "next_token_logits", _fake_logits)
    ids, mask = _ids()
    wl = ao.tune.GenerationWorkload(input_ids=ids, attention_mask=mask, fidelity_positions=300, fidelity_window=61,
                                    fidelity_ids=_held_out())
    assert wl.positions == 300  # 5 windows of 61 tokens, 60 positions each
    windows = wl.fidelity_windows(_mlp())
    data = GenerationData(spec=wl, batches=[], pad_id=0, windows=windows, reference=llm.text_scores(_Fake(windows), windows))
    assert data.score(_Fake(windows))["metric"] == 1.0
    one = data.score(_Fake(windows, flip=((2, 17),)))
    assert one["positions"] == 300 and abs((1.0 - one["metric"]) - 1 / 300) < 1e-12  # not 1/16
    assert one["perplexity_ratio"] > 1.0  # the flipped position reads the text with less probability
    assert abs(1.0 - data.score(_Fake(windows, flip=((0, 0), (4, 59))))["metric"] - 2 / 300) < 1e-12


def test_bad_fidelity_settings_are_refused_with_the_fix(llama):
    ids, _ = _ids()
    W = ao.tune.GenerationWorkload
    with pytest.raises(ConfigError, match="fidelity_positions"):
        W(input_ids=ids, fidelity_positions=16)  # one token would be a drop of 1/16
    with pytest.raises(ConfigError, match="fidelity_window"):
        W(input_ids=ids, fidelity_window=1)
    with pytest.raises(ConfigError, match="fidelity_text"):
        W(input_ids=ids, fidelity_text="  ")
    with pytest.raises(ConfigError, match="not both"):
        W(input_ids=ids, fidelity_text="abc", fidelity_ids=_held_out())
    with pytest.raises(ConfigError, match="fidelity_ids"):
        W(input_ids=ids, fidelity_ids=_held_out().float())
    with pytest.raises(ConfigError, match="context"):  # the tiny model reads 128 positions
        ao.tune(llama, workload=W(input_ids=ids, fidelity_ids=_held_out(2000)), budget="1m")
    with pytest.raises(ConfigError, match="fidelity_ids has 320 tokens"):
        W(input_ids=ids, fidelity_window=64, fidelity_positions=1000, fidelity_ids=_held_out()).fidelity_windows(llama)
    with pytest.raises(ConfigError, match="no tokenizer"):  # the held-out text needs one to be read
        ao.tune(llama, workload=W(input_ids=ids, fidelity_window=64), budget="1m")


def test_a_recipe_beyond_max_drop_rules_out_its_compiled_extensions_only(llama):
    ids, mask = _ids()
    wl = ao.tune.GenerationWorkload(input_ids=ids, attention_mask=mask, max_new_tokens=4, fidelity_window=64,
                                    fidelity_positions=256, fidelity_ids=_held_out())
    from aigc_opt.tune.generation import GenerationData

    ctx = tune_evaluate.EvalContext(workload=[], max_drop=-1.0, baseline_metric=1.0, generation=GenerationData.prepare(
        wl, llama), time_per_trial=0.5)
    out = tune_evaluate.evaluate(llama, (ao.Quantize("int8-weight-only"),), ctx)
    assert out["state"] == "over-budget" and out["dead_prefix"] == "Quantize(method='int8-weight-only')"
    assert "latency_ratio" not in out  # never timed


def _broken_quant(name: str):
    """A quantization method whose ONNX implementation always raises (a real pass failure)."""
    from aigc_opt.passes._quant_registry import quant_method

    def fail(model, settings):
        raise RuntimeError("this method always fails")

    quant_method(name, description="always fails", device_types=("cpu",), onnx=fail)(lambda module, s: {})


def test_a_failed_prefix_is_never_extended(monkeypatch):
    _broken_quant("test-broken")
    built: list[str] = []
    real_build = tune_evaluate.build

    def recording_build(base, passes, ctx, info=None):
        built.append(" + ".join(p.describe() for p in passes))
        return real_build(base, passes, ctx, info)

    monkeypatch.setattr(tune_evaluate, "build", recording_build)
    try:
        m = _mlp()
        space = ao.tune.Space(routes=("onnx",), quantize=("test-broken", "int8-dynamic"), compile=("onnxruntime",),
                              prune=(), options={})
        result = ao.tune(m, workload=[torch.randn(16, 32)], max_drop=1.0, budget="3m", space=space,
                         time_per_trial=0.5, verbose=False)
    finally:
        ao.QUANT_METHODS.unregister("test-broken")
    broken = [b for b in built if "test-broken" in b]
    assert len(broken) == 1, built  # the first build with the broken method; its extension is never built
    failed = next(t for t in result.trials if t.state == "failed")
    prefix = "Export(to='onnx') + Quantize(method='test-broken')"
    assert failed.details["dead_prefix"] == prefix and "always fails" in failed.error
    assert result.dead_prefixes == [(prefix, failed.number, "failed")]
    assert result.skipped_recipes == 1
    skipped = [t for t in result.trials if t.state == "skipped"]
    assert all(t.recipe.startswith(prefix + " + ") and f"trial {failed.number}" in t.error for t in skipped)
    # the rest of the space was still searched to the end
    assert {"Export(to='onnx') + Quantize(method='int8-dynamic')",
            "Export(to='onnx') + Quantize(method='int8-dynamic') + Compile(backend='onnxruntime')"} <= set(built)
    assert "ruled out by a failed prefix" in result.stop_reason
    assert "Early pruning: 1 recipes" in result.to_markdown()


def test_pruning_off_builds_every_recipe(monkeypatch):
    _broken_quant("test-broken2")
    built: list[str] = []
    real_build = tune_evaluate.build
    monkeypatch.setattr(tune_evaluate, "build", lambda b, p, c, i=None: built.append(p) or real_build(b, p, c, i))
    try:
        space = ao.tune.Space(routes=("onnx",), quantize=("test-broken2",), compile=("onnxruntime",), prune=(),
                              options={})
        result = ao.tune(_mlp(), workload=[torch.randn(16, 32)], max_drop=1.0, budget="3m", space=space,
                         time_per_trial=0.5, prune_prefixes=False, verbose=False)
    finally:
        ao.QUANT_METHODS.unregister("test-broken2")
    assert sum(any(getattr(p, "method", None) == "test-broken2" for p in passes) for passes in built) == 2
    assert result.skipped_recipes == 0 and not result.dead_prefixes


def test_cli_prompt_makes_a_generation_workload(tmp_path, capsys):
    from aigc_opt.cli import main

    _mlp().save(tmp_path / "in")
    rc = main(["tune", str(tmp_path / "in"), "--trust", "--prompt", "def fib(n):", "--new-tokens", "8",
               "--budget", "1m", "-o", str(tmp_path / "out")])
    assert rc == 2 and "causal LM" in capsys.readouterr().err  # the MLP cannot generate: refused before any work
