"""Hugging Face transformers models as ao.Models (extra ``aigc-opt[hf]``).

Example:
    >>> import aigc_opt as ao
    >>> m = ao.Model.from_hf("path/to/all-MiniLM-L6-v2", task="sentence-embedding")  # doctest: +SKIP
    >>> batch = ao.hf.tokenize(m.tokenizer, ["a sentence", "another"], seq_len=32)  # doctest: +SKIP
    >>> m(**batch).shape                                                             # doctest: +SKIP
    torch.Size([2, 384])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._architecture import AIGC_MODULES, build_hf, hf_attn_implementation
from ._deps import quiet_import_logs, require
from ._registry import Registry
from .errors import ConfigError, UnsupportedModelError
from .model_sources import MODEL_SOURCES

from .target import Target

if TYPE_CHECKING:
    from .model import Model

__all__ = ["from_hf", "from_gguf", "tokenize", "SentenceEmbedder", "TASKS"]

# task -> the transformers Auto class that builds its model
TASKS: Registry[str] = Registry("task")
TASKS.register("feature-extraction", "AutoModel")
TASKS.register("sentence-embedding", "AutoModel")
TASKS.register("text-classification", "AutoModelForSequenceClassification")
TASKS.register("causal-lm", "AutoModelForCausalLM")


def _transformers() -> Any:
    return require("transformers", extra="hf", purpose="Loading a Hugging Face model")


class SentenceEmbedder(torch.nn.Module):
    """A transformer encoder with mean pooling over real tokens and L2 normalization, as
    sentence-transformers computes embeddings for all-MiniLM-L6-v2."""

    def __init__(self, encoder: torch.nn.Module, normalize: bool = True):
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1) if self.normalize else pooled

    def aigc_architecture(self) -> dict[str, Any]:
        return {"name": "sentence-embedder", "kwargs": {
            "encoder_class": type(self.encoder).__name__,
            "config": self.encoder.config.to_dict(),
            "attn_implementation": hf_attn_implementation(self.encoder.config),
            "normalize": self.normalize,
        }}


@AIGC_MODULES.register("sentence-embedder")
def _build_sentence_embedder(encoder_class: str, config: dict[str, Any], normalize: bool,
                             attn_implementation: str | None = None) -> SentenceEmbedder:
    return SentenceEmbedder(build_hf(encoder_class, config, attn_implementation), normalize=normalize).eval()


def tokenize(tokenizer: Any, texts: Sequence[str], *, seq_len: int = 128, pad_to_max: bool = True) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` into one batch of keyword inputs (padded to ``seq_len`` by default,
    so every batch has the same shape: compiled models then compile once)."""
    if isinstance(texts, str) or not texts:
        raise ConfigError(f"texts must be a non-empty list of strings, got {texts!r}.")
    encoded = tokenizer(list(texts), padding="max_length" if pad_to_max else True, truncation=True,
                        max_length=seq_len, return_tensors="pt")
    return dict(encoded)


def from_hf(
    path: str | os.PathLike[str],
    *,
    task: str | None = None,
    gguf_file: str | None = None,
    target: str | Target = "host",
    example_texts: Sequence[str] | None = None,
    batch_size: int = 8,
    seq_len: int = 128,
    name: str | None = None,
) -> Model:
    """Load a transformers model and its tokenizer from ``path`` (a local directory, or a hub
    id when online) and wrap it as an ao.Model with tokenizer-made example inputs.

    Args:
        task: ``"feature-extraction"`` (hidden states, the default), ``"sentence-embedding"`` (pooled,
            normalized embeddings), ``"text-classification"`` or ``"causal-lm"`` (the default
            with ``gguf_file``).
        gguf_file: the name of a GGUF file inside ``path`` (extra ``aigc-opt[llm]``): transformers
            dequantizes it to fp32 and builds the tokenizer and chat template from it; the file's
            quantization is recorded in ``model.architecture["source"]`` (see :mod:`aigc_opt.gguf`).
        example_texts: texts for the example batch (default: a fixed sentence repeated).
        batch_size, seq_len: shape of the example batch.

    The tokenizer is kept as ``model.tokenizer``; for ``"causal-lm"`` it pads on the left (and
    with the end token when it has no pad token), as generation needs.
    """
    from .model import Model

    task = task or ("causal-lm" if gguf_file else "feature-extraction")
    auto_name = TASKS.get(task)
    source = None
    if gguf_file is not None:
        from .gguf import inspect_gguf, require_llm_packages

        source = inspect_gguf(os.path.join(path, gguf_file))  # typed errors before any weight is read
        require_llm_packages()
    tokenizer, module = _pretrained(path, auto_name, gguf_file)
    if task == "causal-lm":  # decoder-only models continue from the right end: pad on the left
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if task == "sentence-embedding":
        module = SentenceEmbedder(module).eval()
    resolved = Target.get(target)
    if resolved.device_type == "cuda" and torch.cuda.is_available():
        module.to("cuda")  # run where the target is (inputs follow the module)
    texts = list(example_texts) if example_texts else ["aigc_opt makes models smaller and faster."] * batch_size
    example = tokenize(tokenizer, texts[:batch_size], seq_len=seq_len)
    model = Model(module, example_inputs=example, target=resolved,
                  name=name or os.path.basename(os.path.normpath(str(path))))
    model.tokenizer = tokenizer  # type: ignore[attr-defined]
    if source is not None:  # written to manifest.json with the architecture spec
        model.architecture = {**model.architecture, "source": source.record()}
    return model


def _pretrained(path: str | os.PathLike[str], auto_name: str, gguf_file: str | None) -> tuple[Any, torch.nn.Module]:
    """transformers' tokenizer and model (in eval mode) from ``path`` (or a GGUF file in it), local
    files only when ``path`` is a directory or the hub is offline; failures name the source."""
    transformers = _transformers()
    local = os.path.isdir(path) or os.environ.get("HF_HUB_OFFLINE") == "1"
    extra = {"gguf_file": gguf_file} if gguf_file is not None else {}
    try:
        with quiet_import_logs():  # transformers may import torchao while loading
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=local, **extra)
            module = getattr(transformers, auto_name).from_pretrained(path, local_files_only=local, **extra)
    except (OSError, ValueError, NotImplementedError, KeyError) as e:
        if gguf_file is None and not isinstance(e, (OSError, ValueError)):
            raise
        what = f"the GGUF file {gguf_file!r} in {str(path)!r}" if gguf_file else repr(str(path))
        hint = ("transformers could not convert it (an unsupported quantization or tensor layout): upgrade "
                "transformers and gguf, or use a GGUF of another quantization type (Q4_0, Q4_1, Q8_0, F16...)."
                if gguf_file else "Give a directory with config.json, the weights and the tokenizer files.")
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnsupportedModelError(f"Could not load a transformers model from {what}: {first} {hint}") from e
    return tokenizer, module.eval()


def from_gguf(path: str | os.PathLike[str], *, target: str | Target = "host",
              example_texts: Sequence[str] | None = None, batch_size: int = 1, seq_len: int = 32,
              name: str | None = None) -> Model:
    """A GGUF LLM as a ``causal-lm`` Model: transformers' fp32 model dequantized from the file, its
    tokenizer (``model.tokenizer``, left padding) with the file's chat template, and the GGUF's
    quantization recorded in ``model.architecture["source"]``. See :func:`aigc_opt.gguf.inspect_gguf` for
    what is refused before any weight is read."""
    path = Path(path)
    return from_hf(path.parent, task="causal-lm", gguf_file=path.name, target=target, example_texts=example_texts,
                   batch_size=batch_size, seq_len=seq_len, name=name or path.stem)


MODEL_SOURCES.register("hf", from_hf)
MODEL_SOURCES.register("gguf", from_gguf)
