"""``Quantize("auto")``: the method the target is best served by, and the reason.

The choice is a table (``AUTO_RULES``), read top to bottom: the first rule whose conditions the
target's data meets (device type, native dtypes, CPU features), for the model's format, wins. No
rule names a target: a new target gets the method its data earns. Each rule says why, and the
reason is recorded with the result (``details["auto_reason"]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import IncompatibleTargetError

if TYPE_CHECKING:
    from ..target import Target
    from ._quant_settings import QuantFormat

__all__ = ["choose_method", "AutoRule", "AUTO_RULES", "INT8_DOT_FEATURES"]

# CPU features that give int8 dot-product instructions (x86 VNNI/AMX, Arm dot product/i8mm).
INT8_DOT_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
# Older target files name VNNI/AMX only in their arch string.
_INT8_DOT_ARCH_WORDS = ("vnni", "amx")


@dataclass(frozen=True)
class AutoRule:
    """``method`` for a model in one of ``formats`` on a target that has every dtype in ``dtypes``,
    at least one of ``features`` (when given) and a device type in ``devices`` (when given).
    ``decoder``/``calibrated``: only for an ONNX causal-LM step / when calibration data was given
    (None: either). ``reason`` may use {target}, {arch} and {features}."""

    method: str
    reason: str
    formats: tuple[QuantFormat, ...] = ("torch",)
    devices: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    decoder: bool | None = None
    calibrated: bool | None = None

    def matched_features(self, target: Target) -> list[str] | None:
        """The features of ``features`` the target has (None: the rule does not match on them)."""
        if not self.features:
            return []
        found = [f for f in self.features if target.has_feature(f)]
        if not found and self.features == INT8_DOT_FEATURES:
            found = [f"{w} in arch" for w in _INT8_DOT_ARCH_WORDS if w in target.arch][:1]
        return found or None

    def applies(self, target: Target, fmt: str, *, decoder: bool, calibrated: bool) -> list[str] | None:
        if fmt not in self.formats or (self.devices and target.device_type not in self.devices):
            return None
        if not set(self.dtypes) <= set(target.dtypes):
            return None
        if (self.decoder is not None and self.decoder != decoder) or (
                self.calibrated is not None and self.calibrated != calibrated):
            return None
        return self.matched_features(target)


AUTO_RULES: tuple[AutoRule, ...] = (
    # OpenVINO models: NNCF's methods (passes/_quant_nncf.py); NNCF has no dynamic int8.
    AutoRule("int8-static", "OpenVINO model on {target!r} with calibration data: NNCF int8 weights and "
             "activations (measured 0.27x fp32 on MiniLM, docs/openvino.md)", formats=("openvino",), calibrated=True),
    AutoRule("int8-weight-only", "OpenVINO model on {target!r} without calibration data: NNCF int8 weight "
             "compression; give data= for int8 activations too", formats=("openvino",), calibrated=False),
    # Measured on SmolLM2-135M (benchmarks/results/llm_decode.md): int8-dynamic (per-token int8
    # activations everywhere) left fp32's greedy path after ~5 tokens and decoded slower than fp32;
    # int8 weight-only MatMulNBits keeps the teacher-forced agreement >= 0.96 and reads 4x fewer bytes.
    AutoRule("int8-weight-only", "ONNX decoder on {target!r}: decoding is bound by weight bytes read per token, "
             "so int8 weight-only blocks (ONNX Runtime MatMulNBits); never int8-dynamic, which loses fp32's "
             "greedy path on LLMs", formats=("onnx",), devices=("cpu", "cuda"), decoder=True),
    AutoRule("int8-dynamic", "ONNX model on {target!r} (int8 native): ONNX Runtime dynamic int8",
             formats=("onnx",), dtypes=("int8",)),
    AutoRule("fp16", "ONNX model on {target!r}: no native int8, fp16 native", formats=("onnx",), dtypes=("fp16",)),
    AutoRule("fp8", "{target!r} ({arch}) has fp8 tensor cores (sm_89+): fp8 weights and activations",
             devices=("cuda",), dtypes=("fp8",)),
    AutoRule("bf16", "{target!r} ({arch}) has bf16 tensor cores but no fp8", devices=("cuda",), dtypes=("bf16",)),
    AutoRule("fp16", "{target!r} ({arch}) has fp16 tensor cores only", devices=("cuda",), dtypes=("fp16",)),
    AutoRule("fp16", "{target!r} is Apple silicon (MPS): fp16 is its fast path", devices=("mps",), dtypes=("fp16",)),
    AutoRule("int8-dynamic", "{target!r} ({arch}) has int8 dot-product instructions ({features}): torchao int8 "
             "dynamic, per-channel weights", devices=("cpu",), dtypes=("int8",), features=INT8_DOT_FEATURES),
    AutoRule("int8-weight-only", "{target!r} ({arch}) has no int8 dot-product instructions: int8 weight-only "
             "(4x smaller weights, float compute)", devices=("cpu",), dtypes=("int8",)),
    AutoRule("bf16", "{target!r} runs bf16 natively but lists no int8", devices=("cpu",), dtypes=("bf16",)),
)


def choose_method(target: Target, fmt: str = "torch", *, decoder: bool = False,
                  calibrated: bool = False) -> tuple[str, str]:
    """``(method, reason)`` for ``target`` and model format ``fmt``: the first of ``AUTO_RULES``
    that applies. ``decoder``: an ONNX causal-LM step with its KV cache, whose decoding is bound by
    the bytes of weights read per token; ``calibrated``: calibration data was given."""
    for rule in AUTO_RULES:
        features = rule.applies(target, fmt, decoder=decoder, calibrated=calibrated)
        if features is not None:
            return rule.method, rule.reason.format(target=target.name, arch=target.arch,
                                                   features=", ".join(features))
    raise IncompatibleTargetError(
        f"Quantize('auto'): no quantization method fits target {target.name!r} ({target.device_type}, "
        f"arch {target.arch}, dtypes {list(target.dtypes)}) for a {fmt} model. Name a method explicitly "
        "or use another target."
    )
