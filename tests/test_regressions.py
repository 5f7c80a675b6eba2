"""Regression tests for bugs first recorded as strict-xfail reproducers in ``test_fuzz.py``.

Each test pins the behaviour chosen for the fix: the typed error, the words of its message
(the bad value and the fix), or the correct outputs.

- PT2E ``Quantize("int8-static")`` calibrated on batches of other shapes than the first;
- a ``torch.export`` program (or PT2E graph) run on inputs it was not exported for;
- ``Distill`` on a BatchNorm that sees one value per channel;
- ``Model.load`` of a Hugging Face model keeps its attention implementation;
- an ONNX model given inputs whose shared sizes disagree (ids and mask of different lengths).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn

import aigc_opt as ao
from aigc_opt.errors import ConfigError, InvalidInputError
from strategies import BertSpec, CNNSpec, ConvBlock, MLPSpec

pytestmark = pytest.mark.filterwarnings("ignore")


def _needs(*packages: str) -> None:
    for package in packages:
        pytest.importorskip(package)


# ------------------------------------------------------------------ PT2E int8-static calibration
def test_int8_static_calibration_batches_of_other_shapes() -> None:
    """A first calibration batch of size 1 used to pin the batch (torch.export guard, PassError)."""
    _needs("torchao")
    spec = MLPSpec(d_in=4, widths=(8, 3), batch=1)
    model = spec.build()
    q = ao.quantize(model, "int8-static", data=[spec.inputs(), spec.inputs(3)], verbose=False)
    assert q.history[-1].state["varying_axes"] == {"0": [0]}
    for batch in (spec.inputs(), spec.inputs(3)):  # the calibrated batches: within int8 rounding
        torch.testing.assert_close(q.run(batch), model.run(batch), atol=0.1, rtol=0.1)
    assert q.run(spec.inputs(5)).shape == (5, 3)  # and any other batch size runs
    with pytest.raises(ConfigError, match="calibration batch 1 has inputs of shapes"):
        ao.quantize(model, "int8-static", data=[spec.inputs(), spec.inputs()[0][None]], verbose=False)


def test_int8_static_calibration_on_a_size_the_model_fixes() -> None:
    """Spatial sizes that differ between batches are made dynamic, but a Flatten -> Linear head
    fixes them: the torch.export guard that fails in calibration is a ConfigError naming the batch."""
    _needs("torchao")
    spec = CNNSpec(dim=2, in_channels=2, blocks=(ConvBlock(4, 3),), head="flatten", spatial=6, batch=1)
    model = spec.build()
    with pytest.raises(ConfigError, match=r"calibration batch 1 has inputs of shapes \[\(1, 2, 8, 8\)\], which the "
                                          r"graph traced from batch 0 \(shapes \[\(1, 2, 6, 6\)\]\) cannot take: "
                                          r".* does not hold.*calibrate on batches of the shapes the model runs"):
        ao.quantize(model, "int8-static", data=[spec.inputs(), (torch.randn(1, 2, 8, 8),)], verbose=False)
    head = CNNSpec(dim=2, in_channels=2, blocks=(ConvBlock(4, 3),), head="gap", spatial=6, batch=1).build()
    q = ao.quantize(head, "int8-static", data=[head.example_inputs, (torch.randn(3, 2, 8, 8),)], verbose=False)
    assert q.history[-1].state["varying_axes"] == {"0": [0, 2, 3]}
    assert q.run((torch.randn(2, 2, 7, 7),)).shape == (2, 3)


def test_int8_static_calibration_batch_of_another_dtype() -> None:
    _needs("torchao")
    spec = MLPSpec(d_in=4, widths=(8, 3), batch=2)
    with pytest.raises(ConfigError, match=r"calibration batch 1 does not fit the graph traced from batch 0: "
                                          r"Input 'x' has dtype int64, but .* expects float32"):
        ao.quantize(spec.build(), "int8-static", data=[spec.inputs(), (torch.ones(2, 4, dtype=torch.long),)],
                    verbose=False)


def test_int8_static_result_on_another_batch_size() -> None:
    """Calibrated on batch 1 only: the batch axis stays dynamic (traced at 2); a feature width the
    graph was not exported for is an InvalidInputError naming the broken condition."""
    _needs("torchao")
    spec = MLPSpec(d_in=4, widths=(8, 3), batch=1)
    model = spec.build()
    q = ao.quantize(model, "int8-static", data=[spec.inputs()], verbose=False)
    torch.testing.assert_close(q.run(spec.inputs(3)), model.run(spec.inputs(3)), atol=0.1, rtol=0.1)
    with pytest.raises(InvalidInputError, match=r"exported \(torch.export\) for other input shapes: x.size\(\)\[1\] "
                                                r"== 4 does not hold .* \[\(2, 5\)\] \(it takes x: \(\*, 4\)"):
        q.run((torch.randn(2, 5),))
    with pytest.raises(InvalidInputError, match=r"Input 'x' has rank 1 \(shape \(4,\)\), .* expects rank 2"):
        q.run((torch.randn(4),))  # used to be an IndexError inside the graph
    with pytest.raises(InvalidInputError, match=r"Input 'x' has dtype int64, .* expects float32"):
        q.run((torch.ones(2, 4, dtype=torch.long),))  # used to be torchao's bare AssertionError
    torch.testing.assert_close(q.run({"x": spec.inputs(3)[0]}), q.run(spec.inputs(3)))  # by name, as eager


# ------------------------------------------------------------------ torch.export programs
def test_static_exported_program_on_another_batch_size() -> None:
    """Used to be a bare AssertionError from the program's shape guard."""
    spec = MLPSpec(d_in=4, widths=(8, 3), batch=2)
    program = ao.export(spec.build(), "torch.export", dynamic=False)
    with pytest.raises(InvalidInputError, match=r"size\(\)\[0\] == 2 does not hold .* \[\(3, 4\)\] "
                                                r"\(it takes x: \(2, 4\)\).*dynamic=True"):
        program.run(spec.inputs(3))


class _Two(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize(("inputs", "words"), [
    ((torch.randn(2, 3),), r"takes inputs \(a, b\); got \{0: \(2, 3\) float32 on cpu\} \(missing \['b'\]\). Pass one "
                           r"batch as at export, by position or by name"),
    ((torch.randn(2, 3),) * 3, r"takes inputs \(a, b\); got .*\(1 positional too many\)"),
    ({"a": torch.randn(2, 3), "c": torch.randn(2, 3)}, r"takes inputs \(a, b\); got .*\(missing \['b'\]; unknown \['c'\]\)"),
    ((torch.randn(2, 3), torch.randn(3)), r"Input 'b' has rank 1 \(shape \(3,\)\), but the model exported "
                                          r"\(torch.export\) expects rank 2"),
    ((torch.randn(2, 3), torch.ones(2, 3, dtype=torch.int32)), r"Input 'b' has dtype int32, but the model "
                                                                r"exported \(torch.export\) expects float32"),
    ((torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64)), r"Input 'b' has dtype float64"),
    ((torch.randn(2, 3), 2.0), r"Input 'b' is float 2.0, but the model exported \(torch.export\) takes a tensor"),
], ids=["missing", "extra", "unknown-key", "rank", "int-for-float", "float64", "not-a-tensor"])
def test_exported_program_refuses_inputs_it_cannot_take(dynamic: bool, inputs: Any, words: str) -> None:
    """Wrong arguments, ranks or dtypes used to surface as torch's ValueError/IndexError/RuntimeError."""
    model = ao.Model(_Two().eval(), example_inputs=(torch.randn(2, 3), torch.randn(2, 3)))
    program = ao.export(model, "torch.export", dynamic=dynamic)
    with pytest.raises(InvalidInputError, match=words):
        program.run(inputs)


def test_exported_program_takes_inputs_by_name_or_position_and_casts_integer_ids() -> None:
    model = ao.Model(_Two().eval(), example_inputs=(torch.randn(2, 3), torch.randn(2, 3)))
    program = ao.export(model, "torch.export")
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    expected = model.run((a, b))
    for inputs in ((a, b), {"a": a, "b": b}, {"b": b, "a": a}):
        torch.testing.assert_close(program.run(inputs), expected)
    _needs("transformers")
    spec = BertSpec(batch=2, seq=4, mask=True)
    bert = spec.build()
    exported = ao.export(bert, "torch.export")
    ids = spec.inputs()
    as_int32 = {k: v.to(torch.int32) for k, v in ids.items()}  # an eager BERT takes int32 ids too
    torch.testing.assert_close(exported.run(as_int32).last_hidden_state, bert.run(ids).last_hidden_state)
    positional = (ids["input_ids"], ids["attention_mask"])  # as BertModel(input_ids, attention_mask)
    torch.testing.assert_close(exported.run(positional).last_hidden_state, bert.run(ids).last_hidden_state)


# ------------------------------------------------------------------ Distill
def test_distill_with_batchnorm_on_one_value_per_channel() -> None:
    spec = CNNSpec(dim=1, in_channels=1, blocks=(ConvBlock(1, 3, padding=False, batchnorm=True),), spatial=3, d_out=1,
                   batch=1)
    model = spec.build()
    before = {k: v.clone() for k, v in model.artifact.state_dict().items()}
    with pytest.raises(InvalidInputError, match=r"BatchNorm layer 'features.1' gets one value per channel "
                                                r"\(input shape \(1, 1, 1\)\) at epoch 1, batch 1.*batches of 2 or more"):
        ao.distill(model, model, [spec.inputs(), spec.inputs(seed=1)], verbose=False)
    assert not [m for m in model.artifact.modules() if m._forward_pre_hooks]  # the guards are removed
    assert all(torch.equal(v, model.artifact.state_dict()[k]) for k, v in before.items())
    assert not model.artifact.training and not model.history


def test_distill_with_batchnorm_on_a_later_batch_of_one() -> None:
    """The second batch has one sample: refused naming batch 2; batches of 2 or more train."""
    spec = CNNSpec(dim=1, in_channels=1, blocks=(ConvBlock(1, 3, padding=False, batchnorm=True),), spatial=3, d_out=1,
                   batch=2)
    model = spec.build()
    with pytest.raises(InvalidInputError, match=r"'features.1' .* at epoch 1, batch 2"):
        ao.distill(model, model, [spec.inputs(), spec.inputs(1, seed=1)], verbose=False)
    trained = ao.distill(model, model, [spec.inputs(), spec.inputs(seed=1)], verbose=False)
    assert trained.history[-1].details["steps"] == 2


# ------------------------------------------------------------------ Hugging Face attention implementation
def test_hf_load_keeps_the_attention_implementation(tmp_path: Any) -> None:
    """config.to_dict() drops _attn_implementation: an "eager" model used to load as "sdpa"."""
    _needs("transformers")
    model = BertSpec(attn="eager").build()
    model.save(tmp_path / "m")
    loaded = ao.Model.load(tmp_path / "m")
    assert loaded.artifact.config._attn_implementation == model.artifact.config._attn_implementation == "eager"
    torch.testing.assert_close(loaded.run(model.example_inputs).last_hidden_state,
                               model.run(model.example_inputs).last_hidden_state)


def test_hf_architecture_without_attention_implementation_or_with_one_that_cannot_run(
        caplog: pytest.LogCaptureFixture) -> None:
    """Saves from before the fix have no "attn_implementation": transformers' default. One that
    cannot run here (flash-attn not installed) loads with the default, and says so."""
    _needs("transformers")
    from aigc_opt._architecture import build_architecture, describe_architecture

    spec = describe_architecture(BertSpec(attn="eager").build().artifact)
    assert spec["attn_implementation"] == "eager"
    old = {k: v for k, v in spec.items() if k != "attn_implementation"}
    assert build_architecture(old, trust=False).config._attn_implementation == "sdpa"
    flash = {**spec, "attn_implementation": "flash_attention_2"}
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    with caplog.at_level(logging.WARNING, logger="aigc_opt"):
        module = build_architecture(flash, trust=False)
    assert module.config._attn_implementation == "sdpa"
    assert "saved with attn_implementation='flash_attention_2', which cannot run here" in caplog.text
    # a value this transformers does not know (a newer one's kernel): the same
    assert build_architecture({**spec, "attn_implementation": "bogus"}, trust=False).config._attn_implementation == "sdpa"


@pytest.mark.parametrize("ids_shape, mask_shape, words", [
    ((2, 6), (2, 7), "'attention_mask' has size 7 on axis 1, but 'input_ids' has 6"),
    ((3, 6), (2, 6), "ONNX Runtime"),
])
def test_onnx_inputs_whose_shared_sizes_disagree(ids_shape: tuple[int, int], mask_shape: tuple[int, int],
                                                 words: str) -> None:
    """Used to fail inside ONNX Runtime's kernels (IndexError / a bare onnxruntime Fail)."""
    _needs("transformers", "onnxruntime", "onnxscript")
    onnx_model = ao.export(BertSpec().build(), "onnx")
    with pytest.raises(InvalidInputError, match=words.replace("(", r"\(")):
        onnx_model(input_ids=torch.randint(0, 50, ids_shape), attention_mask=torch.ones(mask_shape, dtype=torch.long))


def test_onnx_int8_static_calibration_batch_missing_an_input() -> None:
    """Used to be a PassError wrapping a KeyError."""
    _needs("transformers", "onnxruntime", "onnxscript")
    onnx_model = ao.export(BertSpec().build(), "onnx")
    with pytest.raises(ConfigError, match=r"lacks inputs \['attention_mask'\]"):
        ao.quantize(onnx_model, "int8-static", data=[{"input_ids": torch.randint(0, 50, (2, 6))}])
