"""The bad-input matrix: every way a user can hand aigc_opt something wrong, one row each.

Each row names the call, the exact ``aigc_opt.errors`` type it must raise, the text that names
the bad value (a name, a path, a number, a shape) and, where the library offers one, the fix.
``docs/errors.md`` holds the same table; regenerate it after adding a row with

    python tests/test_bad_input_matrix.py > /tmp/matrix.md

Rows marked ``xfail`` describe the behaviour we want from code that is being changed
elsewhere; they turn into failures (strict) the moment the library meets them.

Everything here uses tiny models (a 32-wide MLP, a hand-built 4x3 ONNX MatMul), so the whole
matrix runs in seconds on a laptop CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import aigc_opt as ao
from aigc_opt import errors as E
from toy_models import ConvOnly, DictOut, make_mlp

# A built-in CPU target, so rows behave the same on a GPU machine as on a laptop.
CPU = "x86-avx512-vnni-server"
GOOD_TOML = 'name = "lab-box"\ndevice_type = "cpu"\narch = "x86_64-avx2"\nmemory_gb = 16\n'


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    category: str  # targets, models, inputs, pass settings, recipes, files
    bad_input: str  # what is wrong (for the docs table)
    call: Callable[[Path, pytest.MonkeyPatch], Any]  # (tmp_path, monkeypatch) -> must raise
    error: type[E.AigcOptError]  # the exact type raised
    names: tuple[str, ...]  # message parts naming the bad value; "{tmp}" stands for tmp_path
    fix: str | None = None  # message part saying what to do, where the library gives one
    says: str = ""  # what the message says (for the docs table)
    needs: tuple[str, ...] = ()  # optional packages the row needs
    xfail: str | None = None  # the library change this row waits for


# ---------------------------------------------------------------------------------- helpers
def _x(batch: int = 4) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(batch, 32)


def _mlp(**kwargs: Any) -> ao.Model:
    kwargs.setdefault("example_inputs", (_x(),))
    kwargs.setdefault("target", CPU)
    return ao.Model(make_mlp(), **kwargs)


def _toml(tmp: Path, text: str, name: str = "lab-box.toml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _from_toml(text: str) -> Callable[[Path, pytest.MonkeyPatch], Any]:
    return lambda tmp, mp: ao.Target.from_toml(_toml(tmp, text))


def _recipe(tmp: Path, text: str, name: str = "recipe.yaml") -> Any:
    path = tmp / name
    path.write_text(text)
    return ao.Pipeline.load(path)


def _onnx_file(tmp: Path, *, broken: bool = False) -> Path:
    """A 4 -> 3 MatMul with a dynamic batch axis; ``broken``: its node reads an undefined tensor."""
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], [0.1] * 12)
    node = helper.make_node("MatMul", ["x", "nothing" if broken else "W"], ["y"])
    graph = helper.make_graph(
        [node], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp / ("broken.onnx" if broken else "matmul.onnx")
    onnx.save(model, str(path))
    return path


def _onnx_model(tmp: Path, example_inputs: Any = None) -> ao.Model:
    return ao.Model.from_onnx(_onnx_file(tmp), example_inputs=example_inputs, target=CPU)


def _saved(tmp: Path, *, quantized: bool = False) -> Path:
    path = tmp / "saved"
    model = _mlp(factory=make_mlp)
    if quantized:  # int8 tensor subclasses: written with torch.save (weights.pt), not safetensors
        model = ao.quantize(model, "int8-dynamic")
    model.save(path)
    return path


def _weights_file(saved: Path) -> Path | None:
    """The weights file of a save, whatever format it was written in."""
    others = {"manifest.json", "example_inputs.pt", "module.pt"}
    found = [p for p in sorted(saved.iterdir()) if p.is_file() and p.name not in others] if saved.is_dir() else []
    return found[0] if len(found) == 1 else None


def _load_after(change: Callable[[Path], Any], *, quantized: bool = False) -> Callable[[Path, pytest.MonkeyPatch], Any]:
    """Save a model, damage the save with ``change(directory)``, then load it."""
    def call(tmp: Path, mp: pytest.MonkeyPatch) -> Any:
        path = _saved(tmp, quantized=quantized)
        change(path)
        return ao.Model.load(path, module=make_mlp(), trust=False)
    return call


def _truncate_weights(path: Path) -> None:
    weights = _weights_file(path)
    weights.write_bytes(weights.read_bytes()[:100])


def _flip_a_weight_byte(path: Path) -> None:
    weights = _weights_file(path)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))


def _edit_manifest(**changes: Any) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        manifest = json.loads((path / "manifest.json").read_text())
        manifest.update(changes)
        (path / "manifest.json").write_text(json.dumps(manifest))
    return change


def _truncate_and_resign(path: Path) -> None:
    """A weights file that was already damaged when its manifest was written: checksums match."""
    from aigc_opt._store import write_manifest

    _truncate_weights(path)
    manifest = json.loads((path / "manifest.json").read_text())
    for key in ("aigc_opt_manifest", "files", "manifest_sha256"):
        manifest.pop(key)
    write_manifest(path, manifest)


def _hide(module: str) -> Callable[[pytest.MonkeyPatch], None]:
    return lambda mp: mp.setitem(sys.modules, module, None)  # import of it raises ImportError


class _Picky(torch.nn.Module):
    """A model whose own forward refuses some inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x < 0).any():
            raise ValueError("_Picky takes non-negative inputs only")
        return self.fc(x)


def _relu_model() -> ao.Model:
    return ao.Model(torch.nn.ReLU().eval(), example_inputs=(_x(),), target=CPU)


# ---------------------------------------------------------------------------------- the matrix
C = Case
CASES: list[Case] = [
    # ------------------------------------------------------------------ targets
    C("target-unknown-name", "targets", 'unknown target name `"nvidia-h1000"`',
      lambda tmp, mp: ao.Target.get("nvidia-h1000"), E.UnknownNameError,
      ("'nvidia-h1000'",), "Did you mean 'nvidia-h100-sxm'",
      "the name, the closest built-in names and the full list"),
    C("target-unknown-name-in-model", "targets", '`ao.Model(..., target="tpu-v9")`',
      lambda tmp, mp: ao.Model(make_mlp(), target="tpu-v9"), E.UnknownNameError,
      ("'tpu-v9'",), "Did you mean 'tpu-v5e'", "the name and the closest built-in names"),
    C("target-not-a-name", "targets", "`Target.get(42)` (not a str or Target)",
      lambda tmp, mp: ao.Target.get(42), E.ConfigError,
      ("int", "42"), "a name (str) or an ao.Target", "the type and value"),
    C("toml-missing-file", "targets", "`Target.from_toml` of a path that does not exist",
      lambda tmp, mp: ao.Target.from_toml(tmp / "nope.toml"), E.ConfigError,
      ("{tmp}/nope.toml", "does not exist"), None, "the path and that it does not exist"),
    C("toml-is-a-directory", "targets", "`Target.from_toml` of a directory",
      lambda tmp, mp: ao.Target.from_toml(tmp), E.ConfigError,
      ("'{tmp}'", "is a directory"), "path of a .toml file", "the path"),
    C("toml-malformed", "targets", "malformed TOML (`name = [broken`)",
      _from_toml("name = [broken\n"), E.ConfigError,
      ("{tmp}/lab-box.toml", "not valid TOML", "line 1"), None, "the path, 'not valid TOML' and the parser's line/column"),
    C("toml-not-utf8", "targets", "TOML file that is not UTF-8 text",
      lambda tmp, mp: ao.Target.from_toml((tmp / "bin.toml", (tmp / "bin.toml").write_bytes(b'name = "\xff"\n'))[0]),
      E.ConfigError, ("{tmp}/bin.toml", "not UTF-8"), "must be UTF-8", "the path and the byte offset"),
    C("toml-missing-fields", "targets", "TOML without `arch` and `memory_gb`",
      _from_toml('name = "lab-box"\ndevice_type = "cpu"\n'), E.ConfigError,
      ("{tmp}/lab-box.toml", "['arch', 'memory_gb']"), "every target needs name, device_type, arch, memory_gb",
      "the path, the missing fields and the required ones"),
    C("toml-unknown-field", "targets", "TOML with an unknown field `colour`",
      _from_toml(GOOD_TOML + 'colour = "red"\n'), E.ConfigError,
      ("['colour']",), "known fields:", "the unknown field and the known fields"),
    C("toml-bad-device-type", "targets", '`device_type = "gpu"`',
      _from_toml(GOOD_TOML.replace('"cpu"', '"gpu"')), E.ConfigError,
      ("device_type 'gpu'",), "'cuda'", "the value and the allowed device types"),
    C("toml-memory-string", "targets", '`memory_gb = "lots"` (wrong type)',
      _from_toml(GOOD_TOML.replace("16", '"lots"')), E.ConfigError,
      ("memory_gb", "'lots'"), "positive number", "the field, the value"),
    C("toml-memory-bool", "targets", "`memory_gb = true` (a bool is not a number)",
      _from_toml(GOOD_TOML.replace("16", "true")), E.ConfigError,
      ("memory_gb", "True"), "positive number", "the field, the value"),
    C("toml-memory-negative", "targets", "`memory_gb = -8`",
      _from_toml(GOOD_TOML.replace("16", "-8")), E.ConfigError,
      ("memory_gb", "-8"), "positive number", "the field, the value"),
    C("toml-cores-string", "targets", '`cores = "many"`',
      _from_toml(GOOD_TOML + 'cores = "many"\n'), E.ConfigError,
      ("cores", "'many'"), "positive integer", "the field, the value"),
    C("toml-name-int", "targets", "`name = 5`",
      _from_toml(GOOD_TOML.replace('"lab-box"', "5")), E.ConfigError,
      ("name", "int 5"), "non-empty string", "the field, the type and value"),
    C("toml-dtypes-string", "targets", '`dtypes = "fp32"` (a string, not a list)',
      _from_toml(GOOD_TOML + 'dtypes = "fp32"\n'), E.ConfigError,
      ("dtypes", "'fp32'"), "write dtypes = ['fp32']", "the field and value"),
    C("toml-dtypes-unknown", "targets", '`dtypes = ["fp64"]`',
      _from_toml(GOOD_TOML + 'dtypes = ["fp64"]\n'), E.ConfigError,
      ("['fp64']",), "use names from", "the unknown dtype and the known ones"),
    C("toml-backends-string", "targets", '`backends = "torch"` (a string, not a list)',
      _from_toml(GOOD_TOML + 'backends = "torch"\n'), E.ConfigError,
      ("backends", "'torch'"), "write backends = ['torch']", "the field and value"),
    C("toml-peaks-not-a-table", "targets", "`peak_tflops = 5` (not a table)",
      _from_toml(GOOD_TOML + "peak_tflops = 5\n"), E.ConfigError,
      ("peak_tflops", "int 5"), "peak_tflops = {fp32 = 19.5}", "the field and value"),
    C("toml-peak-string", "targets", '`peak_tflops = {fp32 = "fast"}`',
      _from_toml(GOOD_TOML + 'peak_tflops = {fp32 = "fast"}\n'), E.ConfigError,
      ("{'fp32': 'fast'}",), "numbers >= 0", "the bad entries"),
    C("toml-sources-list", "targets", "`sources = [1, 2]` (not a table)",
      _from_toml(GOOD_TOML + "sources = [1, 2]\n"), E.ConfigError,
      ("sources", "[1, 2]"), "table of name = value", "the field and value"),
    # ------------------------------------------------------------------ models
    C("model-is-a-function", "models", "`ao.Model(lambda x: x)`",
      lambda tmp, mp: ao.Model(lambda x: x), E.UnsupportedModelError,
      ("got function",), "torch.nn.Module", "the type given"),
    C("model-is-a-string", "models", '`ao.Model("bert-base-uncased")`',
      lambda tmp, mp: ao.Model("bert-base-uncased"), E.UnsupportedModelError,
      ("'bert-base-uncased'",), "Model.from_hf", "the string given"),
    C("model-is-a-model", "models", "`ao.Model(an_ao_model)`",
      lambda tmp, mp: ao.Model(_mlp()), E.UnsupportedModelError,
      ("already an ao.Model",), "use it directly", "that it is already an ao.Model"),
    C("model-weights-on-meta", "models", "module whose weights are on the `meta` device (no data)",
      lambda tmp, mp: ao.Model(make_mlp().to("meta"), example_inputs=(_x(),), target=CPU),
      E.UnsupportedModelError, ("meta",), "load_state_dict", "the device"),
    C("model-no-linear-quantize", "models", '`Quantize("int8-dynamic")` on a module with no parameters (`nn.ReLU`)',
      lambda tmp, mp: ao.quantize(_relu_model(), "int8-dynamic"), E.UnsupportedModelError,
      ("no nn.Linear layer",), "unchanged model", "that no layer of the kind it quantizes was found"),
    C("model-no-params-prune", "models", "structured `Prune(0.3)` on a module with no parameters",
      lambda tmp, mp: ao.prune(_relu_model(), 0.3), E.UnsupportedModelError,
      ("cannot trace ReLU",), "structured=False", "the module class and why it cannot be traced",
      needs=("torch_pruning",)),
    C("model-no-params-prune-unstructured", "models", "unstructured `Prune` on a module with no parameters",
      lambda tmp, mp: ao.prune(_relu_model(), 0.3, structured=False), E.UnsupportedModelError,
      ("found no linear or conv layer",), "ignore=", "that no prunable layer exists outside `ignore`"),
    C("model-forward-raises", "models", "example inputs that make the model's own forward raise",
      lambda tmp, mp: ao.Model(_Picky(), example_inputs=(-torch.ones(2, 4),)), E.InvalidInputError,
      ("(2, 4) float32", "ValueError: _Picky takes non-negative inputs only"), "Pass one batch exactly",
      "the inputs' shapes/dtypes and the model's own error"),
    C("model-forward-shape-mismatch", "models", "example inputs of the wrong width (4x7 into a 32-wide MLP)",
      lambda tmp, mp: ao.Model(make_mlp(), example_inputs=(torch.randn(4, 7),)), E.InvalidInputError,
      ("(4, 7)", "MLP", "mat1 and mat2"), "Pass one batch exactly", "the shapes, the model and torch's error"),
    C("model-target-lacks-device-quantize", "models", '`Quantize("int8-dynamic")` for a TPU target',
      lambda tmp, mp: ao.Quantize("int8-dynamic").check(_mlp(target="tpu-v5e")), E.IncompatibleTargetError,
      ("'tpu-v5e'", "tpu device"), None, "the target, its device type and the ones the method runs on"),
    C("model-target-lacks-device-compile", "models", '`Compile("inductor")` for an FPGA target',
      lambda tmp, mp: ao.Compile("inductor").check(_mlp(target="amd-alveo-u250")), E.IncompatibleTargetError,
      ("'amd-alveo-u250'", "fpga device"), "export-based backend", "the target and its device type"),
    C("model-target-lacks-tensorrt", "models", '`Compile("tensorrt")` for a CPU target',
      lambda tmp, mp: ao.Pipeline([ao.Export("onnx"), ao.Compile("tensorrt")]).check(_mlp()),
      E.IncompatibleTargetError, (f"'{CPU}'", "cpu device"), "Use Compile('onnxruntime')",
      "the target and what to use instead", needs=("onnx",)),
    C("model-target-lacks-dtype", "models", '`Quantize("fp8")` for a T4 (no native fp8)',
      lambda tmp, mp: ao.Quantize("fp8").check(_mlp(target="nvidia-t4")), E.IncompatibleTargetError,
      ("'nvidia-t4'", "sm_75", "fp8"), "method='auto'", "the target, its arch and the dtypes it has"),
    C("model-factory-lambda", "models", "`factory=lambda: ...` (cannot be imported again)",
      lambda tmp, mp: ao.Model(make_mlp(), factory=lambda: make_mlp()), E.ConfigError,
      ("<lambda>",), "move it into an importable module", "the factory and why it cannot be re-imported"),
    C("model-no-example-inputs-prune", "models", "`Prune(0.3)` on a Model built without example inputs",
      lambda tmp, mp: ao.Prune(0.3).check(ao.Model(make_mlp(), target=CPU)), E.UnsupportedModelError,
      ("Prune(ratio=0.3)",), "example_inputs=", "the pass and that it traces the example inputs",
      needs=("torch_pruning",)),
    C("model-not-wrapped-benchmark", "models", "`ao.benchmark(nn_module)` (not an ao.Model)",
      lambda tmp, mp: ao.benchmark(make_mlp()), E.UnsupportedModelError,
      ("is a MLP",), "ao.Model(module, example_inputs=...)", "the type given and how to wrap it"),
    # ------------------------------------------------------------------ inputs
    C("input-wrong-dtype", "inputs", "int64 example inputs for a float model",
      lambda tmp, mp: _mlp(example_inputs=(torch.randint(0, 5, (4, 32)),)), E.InvalidInputError,
      ("(4, 32) int64", "Long and Float"), "Pass one batch exactly", "the inputs' shape/dtype and torch's error"),
    C("input-wrong-dtype-onnx", "inputs", "int64 input to a float ONNX model",
      lambda tmp, mp: _onnx_model(tmp, (torch.ones(2, 4, dtype=torch.int64),)), E.InvalidInputError,
      ("'x'", "int64", "tensor(float)"), None, "the input name, its dtype and the declared one", needs=("onnx",)),
    C("input-wrong-rank", "inputs", "a 2-D input to a Conv2d model",
      lambda tmp, mp: ao.Model(ConvOnly().eval(), example_inputs=(torch.randn(3, 8),)), E.InvalidInputError,
      ("(3, 8)", "conv2d"), "Pass one batch exactly", "the shape and torch's error"),
    C("input-wrong-rank-onnx", "inputs", "a 1-D input to a rank-2 ONNX input",
      lambda tmp, mp: _onnx_model(tmp, (torch.ones(4),)), E.InvalidInputError,
      ("'x'", "rank 1", "rank 2"), None, "the input, its rank and shape, and the declared ones", needs=("onnx",)),
    C("input-wrong-size-onnx-call", "inputs", "`onnx_model(x)` with a 5-wide x where 4 is declared",
      lambda tmp, mp: _onnx_model(tmp)(torch.ones(2, 5)), E.InvalidInputError,
      ("(2, 5)", "dimension 1 is 5, expected 4"), None, "the input's shape and the declared one, per dimension",
      needs=("onnx",)),
    C("input-empty-batch-example", "inputs", "example inputs with batch size 0",
      lambda tmp, mp: _mlp(example_inputs=(torch.randn(0, 32),)), E.InvalidInputError,
      ("(0, 32)",), "at least one", "the empty shape"),
    C("input-empty-batch-benchmark", "inputs", "`ao.benchmark(m, inputs=(torch.randn(0, 32),))`",
      lambda tmp, mp: ao.benchmark(_mlp(), inputs=(torch.randn(0, 32),), iters=1, warmup=0),
      E.InvalidInputError, ("empty batch", "(0, 32)"), "at least one sample", "the empty shape"),
    C("input-empty-list-benchmark", "inputs", "`ao.benchmark(m, inputs=[])`",
      lambda tmp, mp: ao.benchmark(_mlp(), inputs=[], iters=1), E.InvalidInputError,
      ("empty list",), "at least one batch", "that the list is empty"),
    C("input-dict-missing-key", "inputs", "dict inputs without the required `features`",
      lambda tmp, mp: ao.Model(DictOut().eval(), example_inputs={"scale": torch.ones(1)}), E.InvalidInputError,
      ("{scale: (1,) float32", "'features'"), "dict for model(**kwargs)", "the keys given and the missing argument"),
    C("input-dict-unknown-key", "inputs", "dict inputs with a misspelt key `feature`",
      lambda tmp, mp: ao.Model(DictOut().eval(), example_inputs={"feature": torch.ones(2, 16)}),
      E.InvalidInputError, ("'feature'",), "dict for model(**kwargs)", "the unexpected keyword"),
    C("input-dict-missing-key-onnx", "inputs", "dict inputs to an ONNX model without its input `x`",
      lambda tmp, mp: _onnx_model(tmp, {"y": torch.ones(2, 4)}), E.InvalidInputError,
      ("missing ['x']", "unknown ['y']"), None, "the declared inputs, the missing and the unknown keys",
      needs=("onnx",)),
    C("input-dict-non-str-keys", "inputs", "dict inputs with non-string keys `{0: x}`",
      lambda tmp, mp: _mlp(example_inputs={0: _x()}), E.InvalidInputError,
      ("[0]",), "argument names (str)", "the bad keys"),
    C("input-not-a-tensor-str", "inputs", '`example_inputs="hello"`',
      lambda tmp, mp: _mlp(example_inputs="hello"), E.InvalidInputError,
      ("got str",), "Wrap a single tensor x as (x,)", "the type given and the accepted forms"),
    C("input-not-a-tensor-list", "inputs", "a Python list of floats where a tensor is expected",
      lambda tmp, mp: _mlp(example_inputs=([1.0] * 32,)), E.InvalidInputError,
      ("(no tensors)", "not list"), "Pass one batch exactly", "that no tensor was given, and torch's error"),
    C("input-not-a-tensor-onnx", "inputs", 'a string given to an ONNX model',
      lambda tmp, mp: _onnx_model(tmp, ("abc",)), E.InvalidInputError,
      ("input 0 is str 'abc'",), "Pass torch tensors", "the position, type and value", needs=("onnx",)),
    C("input-positional-and-keyword", "inputs", "`model(x, scale=s)` (both forms at once)",
      lambda tmp, mp: _mlp()(_x(), scale=_x()), E.InvalidInputError,
      ("not both",), None, "to pass either positional or keyword inputs"),
    C("input-benchmark-wrong-shape", "inputs", "benchmark inputs that do not run the model",
      lambda tmp, mp: ao.benchmark(_mlp(), inputs=[_x(), torch.randn(2, 5)], iters=1), E.InvalidInputError,
      ("inputs[1]", "(2, 5)"), None, "which batch, its shapes and the model's error"),
    # ------------------------------------------------------------------ pass settings
    C("prune-ratio-above-1", "pass settings", "`Prune(1.5)` (out of range)",
      lambda tmp, mp: ao.Prune(1.5), E.ConfigError,
      ("ratio=1.5",), "strictly between 0 and 1", "the value and the allowed range"),
    C("prune-ratio-negative", "pass settings", "`Prune(-0.1)` (out of range)",
      lambda tmp, mp: ao.Prune(-0.1), E.ConfigError,
      ("ratio=-0.1",), "strictly between 0 and 1", "the value and the allowed range"),
    C("prune-ratio-string", "pass settings", '`Prune("half")` (wrong type)',
      lambda tmp, mp: ao.Prune("half"), E.ConfigError,
      ("ratio='half'",), "a number strictly between 0 and 1", "the value and what a ratio is"),
    C("prune-unknown-importance", "pass settings", '`Prune(0.3, importance="l3")` (unknown name)',
      lambda tmp, mp: ao.Prune(0.3, importance="l3"), E.ConfigError,
      ("importance='l3'",), "Did you mean 'l2'", "the value, the closest and the allowed names"),
    C("prune-bad-pattern", "pass settings", '`Prune(pattern="5:4")`',
      lambda tmp, mp: ao.Prune(pattern="5:4"), E.ConfigError,
      ("pattern='5:4'",), "0 < N < M <= 32", "the value and the N:M rule"),
    C("prune-ratio-contradicts-pattern", "pass settings", '`Prune(0.3, pattern="2:4")` (incompatible)',
      lambda tmp, mp: ao.Prune(0.3, pattern="2:4"), E.ConfigError,
      ("ratio=0.3", "pattern='2:4'"), "leave ratio out", "both values and what the pattern removes"),
    C("prune-round-to-zero", "pass settings", "`Prune(0.3, round_to=0)`",
      lambda tmp, mp: ao.Prune(0.3, round_to=0), E.ConfigError,
      ("round_to=0",), "int >= 1", "the value and the allowed range"),
    C("prune-structured-not-bool", "pass settings", '`Prune(0.3, structured="yes")` (wrong type)',
      lambda tmp, mp: ao.Prune(0.3, structured="yes"), E.ConfigError,
      ("structured", "'yes'"), "True or False", "the field and value"),
    C("prune-ignore-not-a-list", "pass settings", "`Prune(0.3, ignore=5)` (wrong type)",
      lambda tmp, mp: ao.Prune(0.3, ignore=5), E.ConfigError,
      ("ignore", "5"), "module-name patterns", "the field and value"),
    C("prune-missing-extra", "pass settings", "structured `Prune` without `torch-pruning` installed",
      lambda tmp, mp: (_hide("torch_pruning")(mp), ao.Prune(0.3).check(_mlp())), E.MissingDependencyError,
      ("'torch-pruning'",), 'pip install "aigc-opt[prune]"', "the package and the exact pip line"),
    C("quantize-unknown-method", "pass settings", '`Quantize("int9-dynamic")` (unknown method name)',
      lambda tmp, mp: ao.Quantize("int9-dynamic"), E.UnknownNameError,
      ("'int9-dynamic'",), "Did you mean 'int8-dynamic'", "the name, the closest and all method names"),
    C("quantize-method-not-str", "pass settings", "`Quantize(8)` (wrong type)",
      lambda tmp, mp: ao.Quantize(8), E.ConfigError,
      ("got 8",), "must be a string", "the value"),
    C("quantize-skip-not-a-list", "pass settings", "`Quantize(skip=5)` (wrong type)",
      lambda tmp, mp: ao.Quantize(skip=5), E.ConfigError,
      ("skip", "5"), "module-name patterns", "the field and value"),
    C("quantize-per-channel-not-bool", "pass settings", '`Quantize(per_channel="yes")` (wrong type)',
      lambda tmp, mp: ao.Quantize(per_channel="yes"), E.ConfigError,
      ("per_channel", "'yes'"), "True or False", "the field and value"),
    C("quantize-group-size-negative", "pass settings", '`Quantize("int4-weight-only", group_size=-4)`',
      lambda tmp, mp: ao.Quantize("int4-weight-only", group_size=-4), E.ConfigError,
      ("got -4",), "typical: 32, 64, 128", "the value and typical ones"),
    C("quantize-unknown-calibration", "pass settings", '`Quantize(calibration_method="maxmin")`',
      lambda tmp, mp: ao.Quantize(calibration_method="maxmin"), E.ConfigError,
      ("calibration_method='maxmin'",), "Did you mean 'minmax'", "the value, the closest and the allowed names"),
    C("quantize-static-without-data", "pass settings", '`Quantize("int8-static")` without `data=`',
      lambda tmp, mp: ao.Quantize("int8-static").check(_mlp()), E.ConfigError,
      ("int8-static", "needs data="), "8-32 batches", "the method and what data it needs"),
    C("compile-unknown-backend", "pass settings", '`Compile("turbo")` (unknown backend)',
      lambda tmp, mp: ao.Compile("turbo"), E.UnknownNameError,
      ("'turbo'",), "Known compile backends: inductor", "the name and the known backends"),
    C("compile-unknown-mode", "pass settings", '`Compile(mode="fastest")`',
      lambda tmp, mp: ao.Compile(mode="fastest"), E.ConfigError,
      ("mode='fastest'",), "Allowed: ['default'", "the value and the allowed modes"),
    C("compile-setting-of-other-backend", "pass settings", '`Compile("inductor", threads=4)` (incompatible)',
      lambda tmp, mp: ao.Compile("inductor", threads=4), E.ConfigError,
      ("threads=4", "backend onnxruntime", "'inductor'"), None, "the setting, the backend it belongs to, and this backend's settings"),
    C("compile-warmup-float", "pass settings", "`Compile(warmup_iters=1.5)` (wrong type)",
      lambda tmp, mp: ao.Compile(warmup_iters=1.5), E.ConfigError,
      ("got 1.5",), "int >= 0", "the value"),
    C("export-unknown-format", "pass settings", '`Export("tflite")` (unknown format)',
      lambda tmp, mp: ao.Export("tflite"), E.UnknownNameError,
      ("'tflite'",), "Known export formats: onnx", "the name and the known formats"),
    C("export-opset-out-of-range", "pass settings", '`Export("onnx", opset=99)`',
      lambda tmp, mp: ao.Export("onnx", opset=99), E.ConfigError,
      ("got 99",), "between 7 and 30", "the value and the allowed range"),
    C("distill-negative-temperature", "pass settings", "`Distill(temperature=-1)`",
      lambda tmp, mp: ao.Distill(temperature=-1), E.ConfigError,
      ("temperature=-1",), "number > 0", "the value and the allowed range"),
    C("pipeline-structural-after-compile", "pass settings", "`Pipeline([Compile(), Quantize()])` (structural pass after Compile)",
      lambda tmp, mp: ao.Pipeline([ao.Compile("inductor"), ao.Quantize("int8-dynamic")]).check(_mlp()),
      E.UnsupportedModelError, ("Quantize(method='int8-dynamic')", "cannot follow a compiling pass"),
      "put it before Compile", "the pass and where to put it"),
    C("pipeline-prune-after-export", "pass settings", "`Pipeline([Export(\"onnx\"), Prune(0.3)])`",
      lambda tmp, mp: ao.Pipeline([ao.Export("onnx"), ao.Prune(0.3)]).check(_mlp()), E.UnsupportedModelError,
      ("Prune(ratio=0.3)", "format 'onnx'"), "Prune before Export", "the pass, the format it would see, and the order to use",
      needs=("onnx",)),
    C("pipeline-not-passes", "pass settings", '`Pipeline(["Quantize"])` (strings, not passes)',
      lambda tmp, mp: ao.Pipeline(["Quantize"]), E.ConfigError,
      ("['Quantize']",), "ao.Quantize(...)", "what was given and an example"),
    C("pipeline-single-pass", "pass settings", "`Pipeline(Quantize())` (a pass, not a list)",
      lambda tmp, mp: ao.Pipeline(ao.Quantize()), E.ConfigError,
      ("single pass Quantize(method='int8-dynamic')",), "ao.Pipeline([Quantize(method='int8-dynamic')])",
      "the pass and the list to write"),
    C("benchmark-iters-zero", "pass settings", "`ao.benchmark(m, iters=0)`",
      lambda tmp, mp: ao.benchmark(_mlp(), iters=0), E.ConfigError,
      ("got 0",), "or None to measure until stable", "the value and the alternatives"),
    # ------------------------------------------------------------------ recipes
    C("recipe-unknown-pass", "recipes", "recipe with the pass `Quantise`",
      lambda tmp, mp: ao.Pipeline.from_dict({"passes": [{"Quantise": {}}]}), E.RecipeError,
      ("pass 1", "'Quantise'"), "Did you mean 'Quantize'", "where, the name, the closest and the known passes"),
    C("recipe-unknown-setting", "recipes", "recipe with `Quantize: {methd: ...}`",
      lambda tmp, mp: ao.Pipeline.from_dict({"passes": [{"Quantize": {"methd": "int8-dynamic"}}]}), E.RecipeError,
      ("pass 1", "['methd']"), "its settings are", "where, the unknown key and the known settings"),
    C("recipe-unknown-top-level-key", "recipes", "recipe with a top-level key `steps`",
      lambda tmp, mp: ao.Pipeline.from_dict({"passes": [], "steps": []}), E.RecipeError,
      ("['steps']",), "allowed: aigc_opt_recipe, passes", "the key and the allowed ones"),
    C("recipe-wrong-version", "recipes", "`aigc_opt_recipe: 2`",
      lambda tmp, mp: _recipe(tmp, "aigc_opt_recipe: 2\npasses: []\n"), E.RecipeError,
      ("{tmp}/recipe.yaml", "version 2"), "reads version 1", "the file, the version and the one supported",
      needs=("yaml",)),
    C("recipe-malformed-yaml", "recipes", "malformed YAML",
      lambda tmp, mp: _recipe(tmp, "passes: [\n  - Quantize: {method: int8\n"), E.RecipeError,
      ("{tmp}/recipe.yaml", "not valid YAML", "line 2"), None, "the file and the parser's position", needs=("yaml",)),
    C("recipe-malformed-json", "recipes", "malformed JSON",
      lambda tmp, mp: _recipe(tmp, '{"passes": [}', "recipe.json"), E.RecipeError,
      ("{tmp}/recipe.json", "not valid JSON", "line 1 column 13"), None, "the file and the parser's position"),
    C("recipe-missing-file", "recipes", "`Pipeline.load` of a missing file",
      lambda tmp, mp: ao.Pipeline.load(tmp / "nope.yaml"), E.RecipeError,
      ("{tmp}/nope.yaml", "does not exist"), None, "the path"),
    C("recipe-is-a-directory", "recipes", "`Pipeline.load` of a directory",
      lambda tmp, mp: ao.Pipeline.load(tmp), E.RecipeError,
      ("'{tmp}'", "is a directory"), ".yaml or .json recipe file", "the path"),
    C("recipe-not-utf8", "recipes", "recipe file that is not UTF-8 text",
      lambda tmp, mp: ao.Pipeline.load((tmp / "r.yaml", (tmp / "r.yaml").write_bytes(b"\xff\xfe\x00"))[0]),
      E.RecipeError, ("{tmp}/r.yaml", "not UTF-8"), "YAML or JSON text file", "the path and the byte offset"),
    C("recipe-passes-not-a-list", "recipes", "`passes: {Quantize: {}}` (a mapping, not a list)",
      lambda tmp, mp: ao.Pipeline.from_dict({"passes": {"Quantize": {}}}), E.RecipeError,
      ("'passes' must be a list", "got dict"), None, "the type found"),
    C("recipe-top-level-list", "recipes", "a YAML list instead of a mapping",
      lambda tmp, mp: _recipe(tmp, "- Quantize\n- Compile\n"), E.RecipeError,
      ("['Quantize', 'Compile']",), "a mapping with a 'passes' list", "what was found and the expected form",
      needs=("yaml",)),
    C("recipe-value-out-of-range", "recipes", "`Prune: {ratio: 1.5}` in a recipe",
      lambda tmp, mp: ao.Pipeline.from_dict({"passes": [{"Prune": {"ratio": 1.5}}]}), E.RecipeError,
      ("pass 1", "ratio=1.5"), "strictly between 0 and 1", "where, the value and the allowed range"),
    C("recipe-unknown-method", "recipes", "`Quantize: {method: int9}` in a recipe",
      lambda tmp, mp: ao.Pipeline.from_dict({"passes": [{"Quantize": {"method": "int9"}}]}), E.RecipeError,
      ("pass 1", "'int9'"), "Known quantization methods", "where, the name and the known methods"),
    C("recipe-runtime-setting", "recipes", "`Quantize: {data: [...]}` (run-time data in a recipe)",
      lambda tmp, mp: ao.Pipeline.from_dict({"passes": [{"Quantize": {"data": [1, 2]}}]}), E.RecipeError,
      ("['data']",), "given at run time", "the key"),
    C("recipe-yaml-missing", "recipes", "YAML recipe without `pyyaml` installed",
      lambda tmp, mp: (_hide("yaml")(mp), _recipe(tmp, "passes: []\n")), E.MissingDependencyError,
      ("'pyyaml'",), "pip install pyyaml", "the package and the pip line"),
    # ------------------------------------------------------------------ files
    C("load-missing-path", "files", "`Model.load` of a path that does not exist",
      lambda tmp, mp: ao.Model.load(tmp / "nope"), E.NotASavedModelError,
      ("{tmp}/nope",), "written by Model.save", "the path"),
    C("load-a-file", "files", "`Model.load` of a file",
      lambda tmp, mp: ao.Model.load(_toml(tmp, "x", "weights.bin")), E.NotASavedModelError,
      ("{tmp}/weights.bin", "is not a directory"), "written by Model.save", "the path"),
    C("load-not-a-saved-model", "files", "`Model.load` of a directory that is not a saved Model",
      lambda tmp, mp: (_toml(tmp, "x", "notes.txt"), ao.Model.load(tmp)), E.NotASavedModelError,
      ("'{tmp}'", "no manifest.json"), "written by Model.save", "the path and the missing manifest"),
    C("load-truncated-weights", "files", "truncated weights file",
      _load_after(_truncate_weights), E.IntegrityError,
      ("'{weights}'", "{tmp}/saved", "sha256"), "Save the model again", "the file, the directory and both checksums"),
    C("load-tampered-weights", "files", "weights file with one byte changed (sha256 mismatch)",
      _load_after(_flip_a_weight_byte), E.IntegrityError,
      ("'{weights}'", "was changed after saving"), "restore the file", "the file and both checksums"),
    C("load-tampered-manifest", "files", "`manifest.json` edited by hand",
      _load_after(_edit_manifest(name="renamed")), E.IntegrityError,
      ("{tmp}/saved/manifest.json", "changed after it was saved"), "Save the model again", "the manifest's path"),
    C("load-manifest-not-json", "files", "`manifest.json` that is not JSON",
      _load_after(lambda p: (p / "manifest.json").write_text("{not json")), E.IntegrityError,
      ("{tmp}/saved/manifest.json", "not valid JSON"), "the save is damaged", "the path and the parser's error"),
    C("load-manifest-newer-version", "files", "manifest written by a newer aigc_opt (version 99)",
      _load_after(_edit_manifest(aigc_opt_manifest=99)), E.NotASavedModelError,
      ("manifest version 99",), "Upgrade aigc-opt", "the version found and the one read"),
    C("load-listed-file-missing", "files", "a file listed in the manifest was deleted",
      _load_after(lambda p: (p / "example_inputs.pt").unlink()), E.IntegrityError,
      ("'example_inputs.pt'", "{tmp}/saved"), None, "the missing file and the directory"),
    C("load-damaged-weights-consistent-manifest", "files",
      "weights file damaged before its checksum was written (checksums match)",
      _load_after(_truncate_and_resign), E.IntegrityError,
      ("{tmp}/saved/{weights}",), None, "the file and that it cannot be read"),
    C("load-damaged-torch-save-weights", "files",
      "`weights.pt` (torch.save, e.g. int8 weights) damaged before its checksum was written",
      _load_after(_truncate_and_resign, quantized=True), E.IntegrityError,
      ("{tmp}/saved/weights.pt",), "Save the model again", "the file and that it is damaged (not 'use trust=True')"),
    C("save-into-unrelated-directory", "files", "`model.save(dir)` where dir holds other files",
      lambda tmp, mp: (_toml(tmp, "x", "notes.txt"), _mlp().save(tmp)), E.NotASavedModelError,
      ("'{tmp}'", "not a saved Model"), "Choose a new or empty directory", "the path and what to do"),
    C("save-onto-a-file", "files", "`model.save(path)` where path is a file",
      lambda tmp, mp: _mlp().save(_toml(tmp, "x", "model.bin")), E.NotASavedModelError,
      ("{tmp}/model.bin", "is a file"), None, "the path"),
    C("onnx-fails-checker", "files", "an ONNX file whose node reads an undefined tensor",
      lambda tmp, mp: ao.Model.from_onnx(_onnx_file(tmp, broken=True)), E.UnsupportedModelError,
      ("{tmp}/broken.onnx", "fails the ONNX checker", "nothing"), None, "the path and the checker's first line",
      needs=("onnx",)),
    C("onnx-not-onnx", "files", "a text file given to `Model.from_onnx`",
      lambda tmp, mp: ao.Model.from_onnx(_toml(tmp, "hello, not protobuf", "model.onnx")), E.UnsupportedModelError,
      ("{tmp}/model.onnx", "ONNX"), None, "the path and why it is not a valid ONNX model", needs=("onnx",)),
    C("onnx-missing-file", "files", "`Model.from_onnx` of a missing path",
      lambda tmp, mp: ao.Model.from_onnx(tmp / "nope.onnx"), E.UnsupportedModelError,
      ("{tmp}/nope.onnx", "does not exist"), None, "the path", needs=("onnx",)),
]


def _param(case: Case) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input_raises_a_typed_error_that_names_it(case: Case, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for module in case.needs:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}")
    with pytest.raises(Exception) as info:
        case.call(tmp_path, monkeypatch)
    error = info.value
    message = str(error)
    assert type(error) is case.error, (
        f"expected {case.error.__name__}, got {type(error).__module__}.{type(error).__name__}: {message}"
    )
    weights = _weights_file(tmp_path / "saved")
    for part in case.names:
        part = part.replace("{tmp}", str(tmp_path)).replace("{weights}", weights.name if weights else "?")
        assert part in message, f"the message does not name {part!r}: {message}"
    if case.fix:
        assert case.fix in message, f"the message does not give the fix {case.fix!r}: {message}"


def _check_matrix_shape() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert {c.category for c in CASES} == {"targets", "models", "inputs", "pass settings", "recipes", "files"}


_check_matrix_shape()


def markdown_table() -> str:
    """The matrix as the markdown table in docs/errors.md."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| Category | Bad input | Error type | What the message says |", "|---|---|---|---|"]
    for c in CASES:
        says = c.says + (f"; e.g. “{c.fix}”" if c.fix else "")
        if c.xfail:
            says += " *(planned: not yet raised)*"
        rows.append(f"| {c.category} | {cell(c.bad_input)} | `{c.error.__name__}` | {cell(says)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
