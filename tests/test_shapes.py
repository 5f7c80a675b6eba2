"""Compile(shapes=...): bucketed inputs keep one compiled graph per bucket, recompiles are counted,
and inputs past the largest bucket are refused with the length and the limit."""

from __future__ import annotations

import types

import pytest
import torch

import aigc_opt as ao
from aigc_opt.errors import ConfigError, InvalidInputError
from aigc_opt.passes._compile_shapes import choose_buckets

pytestmark = pytest.mark.slow  # compiles with inductor


class TinyEncoder(torch.nn.Module):
    """Token embedding, a layer that mixes positions under the mask, masked mean pooling:
    returns (pooled [B, H], hidden [B, L, H]), like a Hugging Face encoder's two outputs."""

    def __init__(self, vocab: int = 50, hidden: int = 16, positions: int = 64):
        super().__init__()
        self.config = types.SimpleNamespace(max_position_embeddings=positions)
        self.tok = torch.nn.Embedding(vocab, hidden)
        self.pos = torch.nn.Embedding(positions, hidden)
        self.mix = torch.nn.Linear(hidden, hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1]))
        m = attention_mask.unsqueeze(-1).float()
        context = (h * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)  # masked: padding-blind
        h = torch.relu(self.mix(h + context))
        return (h * m).sum(1) / m.sum(1).clamp(min=1), h


def batch(rows: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # a padded row
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.fixture(scope="module")
def bucketed() -> tuple[ao.Model, ao.Model]:
    torch.manual_seed(0)
    base = ao.Model(TinyEncoder().eval(), example_inputs=batch(4, 32), target="host")
    return base, ao.compile(base, "inductor", shapes="buckets", buckets=[16, 32], warmup_iters=1)


def test_buckets_compile_up_front_and_match_eager_at_every_length(bucketed):
    base, compiled = bucketed
    record = compiled.history[-1].details
    assert record["buckets"] == [16, 32] and record["graphs_compiled"] == 2
    assert record["recompiles_after_compile"] == 0
    for rows, length in [(4, 5), (3, 13), (4, 16), (2, 30), (9, 20)]:  # fewer and more rows than compiled
        inputs = batch(rows, length, seed=length)
        pooled, hidden = compiled(**inputs)
        want_pooled, want_hidden = base(**inputs)
        assert pooled.shape == want_pooled.shape and hidden.shape == want_hidden.shape == (rows, length, 16)
        torch.testing.assert_close(pooled, want_pooled, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(hidden * inputs["attention_mask"].unsqueeze(-1),
                                   want_hidden * inputs["attention_mask"].unsqueeze(-1), atol=1e-4, rtol=1e-4)
    assert compiled.artifact.recompiles == 0  # five new shapes, no compile


def test_input_longer_than_the_largest_bucket_is_refused(bucketed):
    _, compiled = bucketed
    with pytest.raises(InvalidInputError, match=r"length 40 .*largest compiled bucket, 32"):
        compiled(**batch(2, 40))


def test_static_policy_counts_the_recompile_a_new_shape_causes():
    torch.manual_seed(0)
    base = ao.Model(TinyEncoder().eval(), example_inputs=batch(2, 8), target="host")
    compiled = ao.compile(base, "inductor", shapes="static", warmup_iters=0)
    assert compiled.history[-1].details["graphs_compiled"] == 1
    compiled(**batch(2, 8, seed=1))
    assert compiled.artifact.recompiles == 0
    compiled(**batch(2, 12))
    assert compiled.artifact.recompiles == 1 and compiled.artifact.recompile_seconds > 0


def test_compare_reports_the_recompiles_during_the_run():
    torch.manual_seed(0)
    # shapes no other test compiles: dynamo's cache is per process and would serve them
    base = ao.Model(TinyEncoder().eval(), example_inputs=batch(3, 7), target="host")
    compiled = ao.compile(base, "inductor", shapes="static", warmup_iters=0)
    report = ao.compare(base, compiled, inputs=[batch(3, 7), batch(3, 11)], iters=2, warmup=0, memory=False,
                        top1=False, verbose=False)
    assert report.baseline.recompiles is None  # eager: nothing to count
    count, seconds = report.candidates[0].recompiles
    assert count == 1 and seconds > 0  # the 3x11 batch compiled a second graph, once
    assert "recompiles during run (s)" in str(report) and "1 graph(s) compiled during the run" in str(report)
    again = type(report).from_dict(report.to_dict())
    assert again.candidates[0].recompiles == (count, pytest.approx(seconds))


def test_bucket_past_the_models_positions_is_refused():
    base = ao.Model(TinyEncoder(positions=64).eval(), example_inputs=batch(2, 8), target="host")
    with pytest.raises(ConfigError, match="128 is longer than the model's 64 positions"):
        ao.compile(base, "inductor", shapes="buckets", buckets=[32, 128])


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="applies to shapes='buckets'"):
        ao.Compile("inductor", shapes="static", buckets=[16])
    with pytest.raises(ConfigError, match="not both"):
        ao.Compile("inductor", shapes="dynamic", dynamic=True)
    with pytest.raises(ConfigError, match="at most 8"):
        ao.Compile("inductor", shapes="buckets", buckets=list(range(1, 11)))
    with pytest.raises(ConfigError, match="shapes"):
        ao.Compile("inductor", shapes="bucket")


def test_default_buckets_follow_example_length_target_width_and_positions():
    assert choose_buckets(128, [9, 20], align=16, limit=512) == (16, 32, 64, 128)
    assert choose_buckets(128, [40, 60], align=16, limit=512) == (32, 64, 128)
    assert choose_buckets(1024, [3], align=16, limit=512) == (64, 128, 256, 512)


def test_saved_bucketed_model_reloads_with_its_buckets(bucketed, tmp_path):
    base, compiled = bucketed
    compiled.save(tmp_path / "m")
    loaded = ao.Model.load(tmp_path / "m", module=TinyEncoder())
    assert loaded.artifact.buckets == (16, 32)
    inputs = batch(4, 10)
    torch.testing.assert_close(loaded(**inputs)[0], base(**inputs)[0], atol=1e-4, rtol=1e-4)
