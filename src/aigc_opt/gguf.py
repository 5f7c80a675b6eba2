"""LLMs from GGUF files, as llama.cpp users have them (extra ``aigc-opt[llm]``).

``Model.from_gguf(path)`` reads the file's header first (with the ``gguf`` package: a memory map,
no weights loaded), refuses what transformers cannot load with a typed error naming the file,
then lets transformers dequantize the weights into its own fp32 model class and build the
tokenizer and chat template from the same file. The GGUF's quantization (its ``general.file_type``
and the count of tensors per ggml type) is recorded in the Model's architecture spec, so it is
written to ``manifest.json`` by ``save`` and travels with the Model through its passes.

Example:
    >>> lm = ao.Model.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")             # doctest: +SKIP
    >>> lm.architecture["source"]["file_type"]                                  # doctest: +SKIP
    'MOSTLY_Q4_1'
    >>> chat = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ._deps import require
from .errors import UnsupportedModelError

__all__ = ["GgufInfo", "inspect_gguf", "require_llm_packages", "GGUF_MAGIC"]

GGUF_MAGIC = b"GGUF"


@dataclasses.dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file's header says: enough to refuse it early and to record where a Model came from."""

    path: Path
    architecture: str  # general.architecture, as llama.cpp names it ("llama", "qwen2", "gemma3", ...)
    file_type: str  # general.file_type as gguf's LlamaFileType names it ("MOSTLY_Q4_1"), or "unknown"
    tensor_types: dict[str, int]  # ggml type name -> number of tensors ("Q4_1": 210, "F32": 61, ...)
    parameters: int
    size_bytes: int
    has_tokenizer: bool
    has_chat_template: bool
    tied_embeddings: bool  # no separate output.weight: the lm_head reuses token_embd

    def record(self) -> dict[str, Any]:
        """The JSON the Model keeps under ``architecture["source"]`` (and so in manifest.json)."""
        return {"format": "gguf", "file": self.path.name, "architecture": self.architecture,
                "file_type": self.file_type, "tensor_types": dict(self.tensor_types),
                "parameters": self.parameters, "size_bytes": self.size_bytes,
                "tied_embeddings": self.tied_embeddings,
                "dequantized_to": "float32 (transformers' GGUF loader)"}


def _transformers_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]


def _as_transformers_name(architecture: str) -> str:
    """llama.cpp's architecture name as transformers' GGUF loader looks it up (its own renames)."""
    renames = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
               "t5encoder": "t5"}
    return renames.get(architecture, architecture.replace("-", "_"))


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    value = field.parts[field.data[0]]
    if getattr(field.types[0], "name", "") == "STRING":
        return bytes(value).decode("utf-8", errors="replace")
    return value.tolist()[0] if hasattr(value, "tolist") else value


def inspect_gguf(path: str | os.PathLike[str]) -> GgufInfo:
    """Read ``path``'s GGUF header and tensor table (no weights) and check transformers can load it.

    Raises:
        UnsupportedModelError: the file is missing, not GGUF, truncated or corrupt, of an
            architecture transformers does not read from GGUF, or without a tokenizer.
        MissingDependencyError: ``gguf`` is not installed (``pip install "aigc-opt[llm]"``).
    """
    path = Path(path)
    if not path.is_file():
        raise UnsupportedModelError(f"GGUF file {str(path)!r} does not exist (or is not a file).")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UnsupportedModelError(
            f"{str(path)!r} is not a GGUF file: it starts with {magic!r}, a GGUF file with {GGUF_MAGIC!r}. "
            "Give the .gguf file llama.cpp or the model's hub page provides.")
    gguf = require("gguf", extra="llm", purpose="Reading a GGUF file")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path))
        tensors = list(reader.tensors)
        # A truncated file can still parse its header: every tensor's data must lie inside the file.
        end = max((int(t.data_offset) + int(t.n_bytes) for t in tensors), default=0)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on damaged files
        raise UnsupportedModelError(
            f"{str(path)!r} is truncated or corrupt: the GGUF reader failed with {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''} Download the file again (compare its sha256 with "
            "the publisher's).") from None
    if end > size or not tensors:
        raise UnsupportedModelError(
            f"{str(path)!r} is truncated: its tensor table needs {end} bytes, the file has {size}"
            + (" (no tensors at all)" if not tensors else "") + ". Download the file again.")
    architecture = _checked_architecture(path, reader)
    file_type = _field(reader, "general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(int(file_type)).name if file_type is not None else "unknown"
    except ValueError:
        file_type_name = f"unknown ({file_type})"
    types = Counter(t.tensor_type.name for t in tensors)
    return GgufInfo(path=path.absolute(), architecture=architecture, file_type=file_type_name,
                    tensor_types=dict(types.most_common()), parameters=int(sum(int(t.n_elements) for t in tensors)),
                    size_bytes=size, has_tokenizer=True,
                    has_chat_template=_field(reader, "tokenizer.chat_template") is not None,
                    tied_embeddings=all(t.name != "output.weight" for t in tensors))


def _checked_architecture(path: Path, reader: Any) -> str:
    """The GGUF's architecture, refused unless transformers reads it from GGUF and a tokenizer is embedded."""
    architecture = _field(reader, "general.architecture")
    if not isinstance(architecture, str):
        raise UnsupportedModelError(f"{str(path)!r} has no general.architecture field, so no loader knows how to "
                                    "read it; it is not a model GGUF (or it is damaged).")
    try:
        supported = _transformers_architectures()
    except ImportError:
        supported = None  # transformers missing: from_gguf's own require() says what to install
    if supported is not None and _as_transformers_name(architecture) not in supported:
        raise UnsupportedModelError(
            f"{str(path)!r} holds a {architecture!r} model, an architecture this transformers "
            f"cannot load from GGUF (it reads {', '.join(sorted(supported))}). Upgrade transformers, or "
            "convert the original checkpoint to a Hugging Face directory and use Model.from_hf(dir).")
    if _field(reader, "tokenizer.ggml.model") is None or "tokenizer.ggml.tokens" not in reader.fields:
        raise UnsupportedModelError(
            f"{str(path)!r} has no tokenizer (no tokenizer.ggml.* fields), so its text cannot be encoded or "
            "decoded. Use a GGUF that embeds its tokenizer (llama.cpp's convert_hf_to_gguf.py writes it), or "
            "load the Hugging Face directory with Model.from_hf(dir).")
    return architecture


def require_llm_packages() -> None:
    """transformers' GGUF loader needs ``gguf`` and ``accelerate`` beside transformers (extra ``llm``)."""
    for package in ("transformers", "gguf", "accelerate"):
        require(package, extra="llm", purpose="Loading a GGUF model")

