"""Runs inside benchmarks/.venv-st (made by embed_corpus.py through ``_common.st_python``):
sentence-transformers' own ONNX and OpenVINO backends, measured as embed_corpus.py measures its rows.

    benchmarks/.venv-st/bin/python benchmarks/_st_peer.py JOB.json

JOB.json (written by embed_corpus.py's worker) names the ``variant`` (a key of ``VARIANTS``), the
model directory (a writable copy: the int8 exports save beside the model, as sentence-transformers
does), ``batches`` (an .npz of the worker's own tokenized, padded batches, so every row sees the
same tensors), ``passes``, ``threads``, ``calib`` (sentences for the static int8 export) and
``embeddings`` (where to save this row's outputs, batch order). It prints one line
``RESULT {json}``: prep_s, first_pass_s, steady_s, fp32_s (fp32 eager: the same SentenceTransformer
with ``backend="torch"``, in this process), details.

Each run is ``SentenceTransformer.forward`` on the batch's features (``sentence_embedding`` out:
the model's own mean pooling and Normalize, as the fp32 reference computes), under
``torch.inference_mode``, as ``encode`` runs it after tokenizing; tokenizing is left out, as in
every other row.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

_started = time.perf_counter()
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

IMPORT_S = time.perf_counter() - _started
PACKAGES = ("sentence-transformers", "transformers", "torch", "optimum", "optimum-onnx", "optimum-intel",
            "onnxruntime", "openvino", "nncf", "datasets")


def _onnx(model_dir: Path, threads: int, details: dict[str, Any],
          file_name: str | None = None) -> SentenceTransformer:
    """``backend="onnx"``: Optimum exports the model to ONNX on load (no ONNX file beside it yet);
    ONNX Runtime on the CPU provider with our thread count and without spin-waiting (as the Optimum row)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    kwargs: dict[str, Any] = {"provider": "CPUExecutionProvider", "session_options": options}
    kwargs.update({"file_name": file_name} if file_name else {})
    details["session"] = {"intra_op_num_threads": threads, "allow_spinning": "0", "file_name": file_name}
    return SentenceTransformer(str(model_dir), backend="onnx", device="cpu", model_kwargs=kwargs)


def _onnx_int8(model_dir: Path, threads: int, details: dict[str, Any],
               calib: list[str]) -> SentenceTransformer:
    """sentence-transformers' int8 recipe: ``export_dynamic_quantized_onnx_model(model, "avx512_vnni", dir)``
    (Optimum's dynamic avx512_vnni config), saved as ``onnx/model_qint8_avx512_vnni.onnx`` and loaded back."""
    from sentence_transformers import export_dynamic_quantized_onnx_model

    export_dynamic_quantized_onnx_model(_onnx(model_dir, threads, {}), "avx512_vnni", str(model_dir))
    return _onnx(model_dir, threads, details, "onnx/model_qint8_avx512_vnni.onnx")


def _openvino(model_dir: Path, threads: int, details: dict[str, Any],
              file_name: str | None = None) -> SentenceTransformer:
    """``backend="openvino"``: optimum-intel exports to OpenVINO IR on load; compiled with the LATENCY
    hint and our thread count (``ov_config``), precision left to OpenVINO (as the by-hand OpenVINO rows)."""
    ov_config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(threads)}
    kwargs: dict[str, Any] = {"ov_config": ov_config}
    kwargs.update({"file_name": file_name} if file_name else {})
    details["ov_config"] = {**ov_config, "file_name": file_name}
    return SentenceTransformer(str(model_dir), backend="openvino", device="cpu", model_kwargs=kwargs)


def _openvino_int8(model_dir: Path, threads: int, details: dict[str, Any],
                   calib: list[str]) -> SentenceTransformer:
    """sentence-transformers' int8 recipe for OpenVINO: ``export_static_quantized_openvino_model`` with its
    default ``OVQuantizationConfig()``, calibrated on ``calib`` (a local csv: its default, GLUE SST-2,
    is a Hub download), saved as ``openvino/openvino_model_qint8_quantized.xml`` and loaded back."""
    from sentence_transformers import export_static_quantized_openvino_model

    data = model_dir.parent / "calibration"
    data.mkdir(exist_ok=True)
    lines = ["sentence"] + ['"' + s.replace('"', '""') + '"' for s in calib]
    (data / "train.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    export_static_quantized_openvino_model(_openvino(model_dir, threads, {}), None, str(model_dir),
                                           dataset_name=str(data), dataset_config_name="default",
                                           dataset_split="train", column_name="sentence")
    details["calibration_sentences"] = len(calib)
    return _openvino(model_dir, threads, details, "openvino/openvino_model_qint8_quantized.xml")


# variant -> loader(model_dir, threads, details[, calib]); embed_corpus.py's rows are "peer-st-" + variant
VARIANTS: dict[str, Callable[..., SentenceTransformer]] = {
    "onnx": lambda d, t, details, calib: _onnx(d, t, details),
    "onnx-int8": _onnx_int8,
    "openvino": lambda d, t, details, calib: _openvino(d, t, details),
    "openvino-int8": _openvino_int8,
}


def _runner(model: SentenceTransformer) -> Callable[[dict], torch.Tensor]:
    def run(batch: dict) -> torch.Tensor:
        with torch.inference_mode():
            return model(dict(batch))["sentence_embedding"]  # forward adds keys: give it a copy

    return run


def _versions() -> dict[str, str]:
    found = {}
    for p in PACKAGES:
        try:
            found[p] = version(p)
        except PackageNotFoundError:
            pass
    return found


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One row: fp32 eager (``backend="torch"``) timed first when ``passes`` > 0, then the variant's
    load (prep), its first pass and the best of ``passes`` further passes."""
    torch.set_num_threads(job["threads"])
    stored = np.load(job["batches"])
    batches = [{k: torch.from_numpy(stored[f"{i}/{k}"]) for k in job["keys"]}
               for i in range(job["n_batches"])]
    model_dir = Path(job["model_dir"])

    def passes(run: Callable[[dict], torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        start = time.perf_counter()
        out = [run(b) for b in batches]
        return time.perf_counter() - start, out

    def steady(run: Callable[[dict], torch.Tensor]) -> float:
        return min(passes(run)[0] for _ in range(max(job["passes"], 1)))

    details: dict[str, Any] = {"import_s": IMPORT_S, "threads": job["threads"], "versions": _versions()}
    fp32_s, reference = float("nan"), None
    if job["passes"] > 0:
        fp32 = _runner(SentenceTransformer(str(model_dir), backend="torch", device="cpu"))
        reference = torch.cat(passes(fp32)[1])  # warm
        fp32_s = steady(fp32)
    start = time.perf_counter()
    model = VARIANTS[job["variant"]](model_dir, job["threads"], details, job["calib"])
    prep_s = time.perf_counter() - start
    run = _runner(model)
    first_s, outputs = passes(run)
    steady_s = steady(run) if job["passes"] > 0 else first_s
    emb = torch.cat(outputs).float()
    if reference is not None:  # the same pooling as the fp32 reference: ~1.0 for fp32 backends
        details["cosine_vs_st_torch_min"] = float(torch.nn.functional.cosine_similarity(emb, reference).min())
    request = getattr(model.transformers_model, "request", None)  # OpenVINO: the compiled model, once run
    if request is not None and hasattr(request, "get_property"):
        details["precision"] = str(request.get_property("INFERENCE_PRECISION_HINT"))
    np.save(job["embeddings"], emb.numpy())
    return {"prep_s": prep_s, "first_pass_s": first_s, "steady_s": steady_s, "fp32_s": fp32_s,
            "details": details}


if __name__ == "__main__":
    print("RESULT " + json.dumps(measure(json.loads(Path(sys.argv[1]).read_text()))), flush=True)
