"""``Quantize("auto")``: the method the target is best served by, and the reason, read from
the target's data (dtypes, features, arch), never from its name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import IncompatibleTargetError

if TYPE_CHECKING:
    from ..target import Target

__all__ = ["choose_method", "INT8_DOT_FEATURES"]

# CPU features that give int8 dot-product instructions (x86 VNNI/AMX, Arm dot product/i8mm).
INT8_DOT_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def choose_method(target: Target, fmt: str = "torch", *, decoder: bool = False,
                  calibrated: bool = False) -> tuple[str, str]:
    """``(method, reason)`` for ``target`` and model format ``fmt``; ``decoder``: an ONNX causal-LM
    step with its KV cache, whose decoding is bound by the bytes of weights read per token;
    ``calibrated``: calibration data was given (static methods become possible)."""
    dtypes = set(target.dtypes)
    if fmt == "openvino":  # NNCF's methods (passes/_quant_nncf.py); it has no dynamic int8
        if calibrated:
            return "int8-static", (f"OpenVINO model on {target.name!r} with calibration data: NNCF int8 "
                                   "weights and activations (measured 0.27x fp32 on MiniLM, docs/openvino.md)")
        return "int8-weight-only", (f"OpenVINO model on {target.name!r} without calibration data: NNCF int8 "
                                    "weight compression; give data= for int8 activations too")
    if fmt == "onnx" and decoder and target.device_type in ("cpu", "cuda"):
        # Measured on SmolLM2-135M (benchmarks/results/llm_decode.md): int8-dynamic (per-token int8
        # activations everywhere) left fp32's greedy path after ~5 tokens and decoded slower than fp32;
        # int8 weight-only MatMulNBits keeps the teacher-forced agreement >= 0.96 and reads 4x fewer bytes.
        return "int8-weight-only", (f"ONNX decoder on {target.name!r}: decoding is bound by weight bytes read per "
                                    "token, so int8 weight-only blocks (ONNX Runtime MatMulNBits); never "
                                    "int8-dynamic, which loses fp32's greedy path on LLMs")
    if fmt == "onnx":
        if "int8" in dtypes:
            return "int8-dynamic", f"ONNX model on {target.name!r} (int8 native): ONNX Runtime dynamic int8"
        if "fp16" in dtypes:
            return "fp16", f"ONNX model on {target.name!r}: no native int8, fp16 native"
    elif target.device_type == "cuda":
        if "fp8" in dtypes:
            return "fp8", f"{target.name!r} ({target.arch}) has fp8 tensor cores (sm_89+): fp8 weights and activations"
        if "bf16" in dtypes:
            return "bf16", f"{target.name!r} ({target.arch}) has bf16 tensor cores but no fp8"
        if "fp16" in dtypes:
            return "fp16", f"{target.name!r} ({target.arch}) has fp16 tensor cores only"
    elif target.device_type == "mps":
        if "fp16" in dtypes:
            return "fp16", f"{target.name!r} is Apple silicon (MPS): fp16 is its fast path"
    elif target.device_type == "cpu":
        dot = [f for f in INT8_DOT_FEATURES if target.has_feature(f)] or (
            ["vnni/amx in arch"] if any(k in target.arch for k in ("vnni", "amx")) else [])
        if "int8" in dtypes and dot:
            return "int8-dynamic", (f"{target.name!r} ({target.arch}) has int8 dot-product instructions "
                                    f"({', '.join(dot)}): torchao int8 dynamic, per-channel weights")
        if "int8" in dtypes:
            return "int8-weight-only", (f"{target.name!r} ({target.arch}) has no int8 dot-product instructions: "
                                        "int8 weight-only (4x smaller weights, float compute)")
        if "bf16" in dtypes:
            return "bf16", f"{target.name!r} runs bf16 natively but lists no int8"
    raise IncompatibleTargetError(
        f"Quantize('auto'): no quantization method fits target {target.name!r} ({target.device_type}, "
        f"arch {target.arch}, dtypes {list(target.dtypes)}) for a {fmt} model. Name a method explicitly "
        "or use another target."
    )
