"""Static int8 for torch models: the PT2E flow (``torch.export`` -> ``prepare_pt2e`` -> calibrate
-> ``convert_pt2e``) with torchao's X86 or Arm inductor quantizer, chosen from the target.

The result is a ``GraphModule`` with int8 weights and quantize/dequantize pairs around each
Linear/Conv, which ``Compile('inductor')`` lowers to fused int8 kernels (eager runs it as
reference math). So that ``Model.load`` can rebuild it, the activation scales and zero points
(literal floats in the converted graph) are copied into buffers, unused float weights are
dropped, and ``restore`` replays export + prepare + convert on the skeleton from the input
shapes kept in the record; the saved state dict then fills in the calibrated values.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import torch

from .._deps import quiet_import_logs, require
from .._tree import normalize_inputs, split_inputs
from ..errors import ConfigError, InvalidInputError, UnsupportedModelError
from ._quant_registry import TORCHAO, quant_method
from ._quant_settings import Int8StaticSettings

if TYPE_CHECKING:
    from ..target import Target
    from .quantize import Quantize

__all__: list[str] = []

log = logging.getLogger("aigc_opt")

_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)


def quantizer_for(target_arch: str, settings: Quantize) -> tuple[Any, str]:
    """torchao's inductor quantizer for the target's CPU family, with skip/skip_types applied."""
    from torchao.quantization.pt2e.quantizer import arm_inductor_quantizer as arm
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    if target_arch.startswith(("aarch64", "arm")):
        quantizer, name = arm.ArmInductorQuantizer(), "ArmInductorQuantizer"
        quantizer.set_global(arm.get_default_arm_inductor_quantization_config())
    else:
        quantizer, name = x86.X86InductorQuantizer(), "X86InductorQuantizer"
        quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    annotate = quantizer.annotate

    def annotate_floats_only(model: Any) -> Any:
        model = annotate(model)
        _drop_integer_annotations(model)
        return model

    quantizer.annotate = annotate_floats_only  # this instance only
    return quantizer, name


def _drop_integer_annotations(model: Any) -> None:
    """Remove observers the quantizer asked for on integer tensors. torchao's x86 quantizer annotates
    binary ops by pattern, so a diffusion UNet's ``timestep * scale`` on int64 steps gets a
    histogram observer, which fails (``histc`` is not implemented for Long); int8 scales mean
    nothing for integer tensors anyway."""
    def integer(node: Any) -> bool:
        value = getattr(node, "meta", {}).get("val")
        return isinstance(value, torch.Tensor) and not value.dtype.is_floating_point

    for node in model.graph.nodes:
        annotation = node.meta.get("quantization_annotation")
        if annotation is None:
            continue
        for source in [n for n in annotation.input_qspec_map if integer(n)]:
            del annotation.input_qspec_map[source]
        if annotation.output_qspec is not None and integer(node):
            annotation.output_qspec = None


def _check_static(settings: Quantize, target: Target, fmt: str) -> None:
    if fmt == "torch" and settings.symmetric is not None:
        raise ConfigError(
            f"Quantize(method='int8-static') on a torch model does not take symmetric={settings.symmetric!r}: "
            "the inductor quantizers use asymmetric uint8 activations and symmetric per-channel int8 "
            "weights. Leave symmetric=None (or export to ONNX, whose int8-static honours it)."
        )


def _input_spec(batch: Any) -> dict[str, Any]:
    """Shapes and dtypes of one batch (JSON), enough to rebuild the graph in ``restore``."""
    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            raise UnsupportedModelError(f"Quantize('int8-static') takes tensor inputs, got {type(t).__name__}.")
        return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}

    if isinstance(batch, dict):
        return {"kind": "dict", "inputs": {k: one(v) for k, v in batch.items()}}
    return {"kind": "tuple", "inputs": [one(v) for v in batch]}


def _zeros_from_spec(spec: dict[str, Any]) -> Any:
    def one(s: dict[str, Any]) -> torch.Tensor:
        return torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"]))

    if spec["kind"] == "dict":
        return {k: one(v) for k, v in spec["inputs"].items()}
    return tuple(one(v) for v in spec["inputs"])


def _auto_dims(module: torch.nn.Module, example: Any, varying: dict[int, list[int]] | None = None) -> Any:
    """Batch (and token-sequence) axes dynamic, plus ``varying`` (input index -> axes whose size
    differs between calibration batches): Dim.AUTO, which keeps what it can symbolic."""
    from .export import dynamic_shapes_for

    spec = dynamic_shapes_for(module, example, True)
    auto = torch.export.Dim.AUTO
    specs = list(spec.values()) if isinstance(spec, dict) else list(spec)
    out = []
    for index, axes in enumerate(specs):
        axes = sorted(set(axes or ()) | set((varying or {}).get(index, ())))
        out.append({a: auto for a in axes} if axes else None)
    return dict(zip(spec, out)) if isinstance(spec, dict) else tuple(out)


def _shapes(batch: Any) -> list[tuple[int, ...]]:
    values = list(batch.values()) if isinstance(batch, dict) else list(batch)
    return [tuple(v.shape) if isinstance(v, torch.Tensor) else () for v in values]


def _varying_axes(batches: list[Any]) -> dict[int, list[int]]:
    """Input index -> axes whose size differs between the calibration batches (the rank and the
    number of inputs must agree: a ConfigError names the first batch that does not)."""
    first = _shapes(batches[0])
    varying: dict[int, set[int]] = {}
    for number, batch in enumerate(batches[1:], start=1):
        current = _shapes(batch)
        if len(current) != len(first) or any(len(a) != len(b) for a, b in zip(current, first)):
            raise ConfigError(
                f"Quantize('int8-static'): calibration batch {number} has inputs of shapes {current}, batch 0 "
                f"has {first}; every batch needs the same inputs with the same ranks.")
        for index, (a, b) in enumerate(zip(current, first)):
            varying.setdefault(index, set()).update(axis for axis, (x, y) in enumerate(zip(a, b)) if x != y)
    return {k: sorted(v) for k, v in varying.items() if v}


def _prepare(module: torch.nn.Module, example: Any, settings: Quantize, arch: str,
             varying: dict[int, list[int]] | None = None) -> tuple[Any, str]:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from .export import tracing_inputs

    dims = _auto_dims(module, example, varying)
    # A size-1 dynamic axis is traced at 2: torch.export would specialize it (pin the batch to 1).
    example = tracing_inputs(example, dims)
    args, kwargs = split_inputs(example)
    module.eval()
    program = torch.export.export(module, args, kwargs=kwargs or None, dynamic_shapes=dims)
    quantizer, name = quantizer_for(arch, settings)
    selected = set(settings.selected(module))
    for layer_name, layer in module.named_modules():
        if isinstance(layer, _LAYERS) and layer_name not in selected:
            quantizer.set_module_name_qconfig(layer_name, None)
    try:
        return prepare_pt2e(program.module(), quantizer), name
    except IndexError:
        # torchao 0.18's linear+activation fusion annotation fails on some graphs (a source
        # partition with no output node, e.g. Hugging Face's GELUActivation): annotate the
        # linears alone; inductor still fuses what it can when compiling.
        log.info("int8-static: torchao's linear+unary fusion annotation failed; annotating linears alone")
        quantizer._annotate_linear_unary = lambda *args, **kwargs: None  # this instance only
        program = torch.export.export(module, args, kwargs=kwargs or None, dynamic_shapes=dims)
        return prepare_pt2e(program.module(), quantizer), name + " (linear+unary fusion annotation off)"


def _convert(prepared: Any) -> Any:
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    converted = convert_pt2e(prepared)
    _drop_unused_attributes(converted)
    _scales_to_buffers(converted)
    # Model.load (and users) call .eval(): make that a no-op-safe call on the exported graph.
    return allow_exported_model_train_eval(converted)


def _act_qparam_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    ops = torch.ops.quantized_decomposed
    targets = (ops.quantize_per_tensor.default, ops.dequantize_per_tensor.default)
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def _scales_to_buffers(gm: torch.fx.GraphModule) -> None:
    """Copy the literal activation scales/zero points into buffers so the state dict holds them.

    The graph keeps them as literals (inductor's int8 fusion patterns match only that form);
    after ``load_state_dict`` a hook writes the loaded buffer values back into the graph.
    """
    for index, node in enumerate(_act_qparam_nodes(gm)):
        gm.register_buffer(f"_act_scale_{index}", torch.tensor(float(node.args[1]), dtype=torch.float32))
        gm.register_buffer(f"_act_zero_point_{index}", torch.tensor(int(node.args[2]), dtype=torch.int64))
    gm.register_load_state_dict_post_hook(_buffers_to_scales)


def _buffers_to_scales(gm: torch.nn.Module, incompatible_keys: Any) -> None:
    for index, node in enumerate(_act_qparam_nodes(gm)):  # type: ignore[arg-type]
        scale = float(getattr(gm, f"_act_scale_{index}"))
        zero_point = int(getattr(gm, f"_act_zero_point_{index}"))
        node.args = (node.args[0], scale, zero_point, *node.args[3:])
    gm.recompile()  # type: ignore[operator]


def _drop_unused_attributes(gm: torch.fx.GraphModule) -> None:
    """The float weights the int8 copies replaced are still attributes: delete them."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner_name, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            delattr(owner, attr)


def _calibrate(prepared: torch.nn.Module, number: int, batch: Any, first: Any) -> None:
    """Run one calibration batch through the observed graph traced from batch 0; a batch that graph
    cannot take (a dtype, or a size the model fixes) is a ConfigError naming the batch."""
    from ..runtime.exported_program import arrange_inputs, guard_failure

    args, kwargs = split_inputs(batch)
    try:
        args, kwargs = arrange_inputs(prepared, args, kwargs)
        prepared(*args, **kwargs)
    except InvalidInputError as e:
        raise ConfigError(f"Quantize('int8-static'): calibration batch {number} does not fit the graph "
                          f"traced from batch 0: {e}") from None
    except AssertionError as e:
        condition = guard_failure(e)
        if condition is None:
            raise
        raise ConfigError(
            f"Quantize('int8-static'): calibration batch {number} has inputs of shapes {_shapes(batch)}, "
            f"which the graph traced from batch 0 (shapes {_shapes(first)}) cannot take: {condition} does "
            "not hold. "
            "Sizes that differ between calibration batches are kept dynamic, but this model fixes this one "
            "(e.g. a Flatten before a Linear); calibrate on batches of the shapes the model runs."
        ) from None


def _calibration_batches(settings: Quantize) -> list[Any]:
    batches = [normalize_inputs(b, what="data") for b in settings.data]
    if not batches:
        raise ConfigError("Quantize('int8-static'): data= holds no batch; give at least one (8-32 is typical).")
    return batches


def _int8_static_onnx(model: Any, settings: Quantize) -> tuple[Any, dict[str, Any]]:
    from ._quant_onnx import int8_static_onnx

    return int8_static_onnx(model, settings)


def _restore_static(module: torch.nn.Module, settings: Quantize, state: dict[str, Any]) -> torch.nn.Module:
    """Same graph as at quantization time, built from zeros of the recorded input shapes; the
    saved state dict (int8 weights, scales, zero points) is loaded into it afterwards."""
    with quiet_import_logs("torchao.quantization.pt2e"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        example = _zeros_from_spec(state["input_spec"])
        varying = {int(k): v for k, v in state.get("varying_axes", {}).items()}
        prepared, _ = _prepare(module, example, settings, state.get("arch", "x86_64"), varying)
        args, kwargs = split_inputs(example)
        with torch.no_grad():
            prepared(*args, **kwargs)
        return _convert(prepared)



@quant_method(
    "int8-static",
    description="int8 weights per channel + int8 activations with scales calibrated on data= "
    "(torch: PT2E torch.export + X86/Arm inductor quantizer, fast after Compile('inductor'); "
    "ONNX: onnxruntime quantize_static, QDQ format, MinMax/Entropy/Percentile calibration)",
    target_dtype="int8",
    **TORCHAO,
    layer_types=_LAYERS,
    settings_type=Int8StaticSettings,
    onnx=_int8_static_onnx,
    needs_data=True,
    check=_check_static,
    restore=_restore_static,
    state_keys=("arch", "input_spec", "varying_axes", "inductor_config"),
    takes_target=True,
)
def _int8_static(module: torch.nn.Module, settings: Quantize,
                 target: Target | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    require("torchao", extra="quant", purpose="Quantize('int8-static')")
    from tqdm.auto import tqdm

    from ..target import Target

    batches = _calibration_batches(settings)
    arch = (target or Target.detect()).arch
    with quiet_import_logs("torchao.quantization.pt2e"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        varying = _varying_axes(batches)
        prepared, quantizer = _prepare(module, batches[0], settings, arch, varying)
        with torch.no_grad():
            for number, batch in enumerate(tqdm(batches, desc="calibrating int8-static", unit="batch",
                                                disable=not settings.verbose or None)):
                _calibrate(prepared, number, batch, batches[0])
        converted = _convert(prepared)
    quantized = [n for n in converted.graph.nodes
                 if n.op == "call_function" and "dequantize_per_channel" in str(n.target)]
    if not quantized:
        raise UnsupportedModelError("Quantize('int8-static'): the quantizer annotated no Linear/Conv layer; "
                                    "refusing to return an unquantized model.")
    selected = settings.selected(module)
    return converted, {
        "layers_quantized": len(quantized),
        "layers_skipped": sorted(n for n, m in module.named_modules()
                                 if isinstance(m, _LAYERS) and n not in selected),
        "calibration_batches": len(batches),
        "quantizer": quantizer,
        "arch": arch,
        "input_spec": _input_spec(batches[0]),
        "varying_axes": {str(k): v for k, v in varying.items()},  # made dynamic besides batch/sequence
        "kernel": "PT2E reference int8 graph (quantize/dequantize + float op); Compile('inductor') "
                  "fuses it into int8 kernels",
        "note": "Eager runs the reference math (slower than fp32); compile for speed.",
        # Inductor fuses the q/dq pattern into int8 kernels only with weights frozen as constants.
        "inductor_config": {"freezing": True},
    }
