"""Transformers-specific rewriting for structured pruning (used by ``passes/prune.py``).

Torch-Pruning removes rows and columns of weight matrices; a Hugging Face attention module also
keeps its head count and sizes as plain attributes (``BertSelfAttention.num_attention_heads`` /
``all_head_size``, ``GPT2Attention.num_heads`` / ``split_size``) and reads them in ``forward``.
An :class:`AttentionAdapter` knows, for one family of attention modules:

- which linear layers hold the heads (q, k, v), so Torch-Pruning removes *whole heads* from all
  three together instead of head dimensions (which breaks the module's reshape);
- how to bring the module into a form Torch-Pruning can trace (``prepare``: GPT-2's fused
  ``Conv1D`` c_attn becomes three ``nn.Linear`` layers) and back (``finish``: one fused linear);
- how to rewrite the attributes after pruning (``update``).

The FFN width that ends up uniform across layers is written into the model's config
(``intermediate_size`` / ``n_inner``). The head count is *not*: BERT and GPT-2 derive the head
size as ``hidden_size / num_attention_heads``, so a config saying 8 heads would rebuild 8 heads of
48 dimensions instead of 8 of 32. Pruned heads live in the modules and in the PassRecord, from
which ``Model.load`` replays them. Nothing here imports transformers: modules are recognized by
their attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._registry import Registry

__all__ = ["AttentionAdapter", "ATTENTION_ADAPTERS", "FusedQKV", "find_attention", "convert_conv1d",
           "is_conv1d", "update_config", "head_snapshot", "removed_heads"]


@dataclass(frozen=True, kw_only=True)
class AttentionAdapter:
    """How one family of attention modules keeps its heads."""

    name: str
    matches: Callable[[nn.Module], bool]
    head_layers: Callable[[nn.Module], list[nn.Linear]]
    num_heads: Callable[[nn.Module], int]
    head_dim: Callable[[nn.Module], int]
    update: Callable[[nn.Module], None]
    prepare: Callable[[nn.Module], bool] | None = None  # True when it changed the module
    finish: Callable[[nn.Module], None] | None = None


ATTENTION_ADAPTERS: Registry[AttentionAdapter] = Registry("attention adapter")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out)."""
    return (type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")
            and hasattr(module, "nf") and hasattr(module, "nx"))


def _linear_from(weight_out_in: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_features, in_features = weight_out_in.shape
    with torch.device("meta"):
        linear = nn.Linear(in_features, out_features, bias=bias is not None)
    linear.weight = nn.Parameter(weight_out_in.detach().contiguous().clone())
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone())
    return linear


def _conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    return _linear_from(conv.weight.t(), conv.bias)


def convert_conv1d(root: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace transformers ``Conv1D`` layers (all, or those named) by equivalent ``nn.Linear``."""
    converted = []
    for name, module in list(root.named_modules()):
        if is_conv1d(module) and (names is None or name in names):
            _set_submodule(root, name, _conv1d_to_linear(module))
            converted.append(name)
    return converted


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


class FusedQKV(nn.Module):
    """GPT-2's fused ``c_attn`` as three ``nn.Linear`` layers whose outputs are concatenated in
    c_attn's order, so Torch-Pruning sees q, k and v and removes the same heads from each."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear):
        super().__init__()
        self.q, self.k, self.v = q, k, v

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.q(hidden), self.k(hidden), self.v(hidden)), dim=-1)


# ------------------------------------------------------------------------------ BERT family
def _bert_matches(m: nn.Module) -> bool:
    return (all(hasattr(m, a) for a in ("query", "key", "value", "num_attention_heads",
                                         "attention_head_size", "all_head_size"))
            and all(isinstance(getattr(m, a), nn.Linear) for a in ("query", "key", "value")))


def _bert_update(m: nn.Module) -> None:
    sizes = {m.query.out_features, m.key.out_features, m.value.out_features}
    if len(sizes) != 1 or m.query.out_features % m.attention_head_size:
        raise RuntimeError(f"q/k/v widths {sorted(sizes)} are not whole heads of {m.attention_head_size}")
    m.num_attention_heads = m.query.out_features // m.attention_head_size
    m.all_head_size = m.query.out_features
    # Whole heads are removed, so attention_head_size and the 1/sqrt(head size) scaling stay.


ATTENTION_ADAPTERS.register("bert-self-attention", AttentionAdapter(
    name="bert-self-attention", matches=_bert_matches,
    head_layers=lambda m: [m.query, m.key, m.value],
    num_heads=lambda m: m.num_attention_heads, head_dim=lambda m: m.attention_head_size,
    update=_bert_update,
))


# ------------------------------------------------------------------------------ GPT-2 family
def _gpt2_matches(m: nn.Module) -> bool:
    return (all(hasattr(m, a) for a in ("c_attn", "c_proj", "num_heads", "head_dim", "split_size"))
            and not getattr(m, "is_cross_attention", False)
            and (is_conv1d(m.c_attn) or isinstance(m.c_attn, (FusedQKV, nn.Linear))))


def _gpt2_prepare(m: nn.Module) -> bool:
    if isinstance(m.c_attn, FusedQKV):
        return False
    weight = m.c_attn.weight.t() if is_conv1d(m.c_attn) else m.c_attn.weight  # (3 * width, hidden)
    width = weight.shape[0] // 3
    parts = [_linear_from(weight[i * width:(i + 1) * width], m.c_attn.bias[i * width:(i + 1) * width])
             for i in range(3)]
    m.c_attn = FusedQKV(*parts)
    if is_conv1d(m.c_proj):
        m.c_proj = _conv1d_to_linear(m.c_proj)
    return True


def _gpt2_update(m: nn.Module) -> None:
    qkv = m.c_attn
    sizes = {qkv.q.out_features, qkv.k.out_features, qkv.v.out_features}
    if len(sizes) != 1 or qkv.q.out_features % m.head_dim:
        raise RuntimeError(f"q/k/v widths {sorted(sizes)} are not whole heads of {m.head_dim}")
    m.num_heads = qkv.q.out_features // m.head_dim
    m.split_size = qkv.q.out_features  # forward splits c_attn's output into q, k, v of this width


def _gpt2_finish(m: nn.Module) -> None:
    """Fuse q, k, v back into one linear (one GEMM, as GPT-2 computes it)."""
    qkv = m.c_attn
    if isinstance(qkv, FusedQKV):
        weight = torch.cat([qkv.q.weight, qkv.k.weight, qkv.v.weight], dim=0)
        bias = torch.cat([qkv.q.bias, qkv.k.bias, qkv.v.bias], dim=0)
        m.c_attn = _linear_from(weight, bias)


ATTENTION_ADAPTERS.register("gpt2-attention", AttentionAdapter(
    name="gpt2-attention", matches=_gpt2_matches,
    head_layers=lambda m: [m.c_attn.q, m.c_attn.k, m.c_attn.v],
    num_heads=lambda m: m.num_heads, head_dim=lambda m: m.head_dim,
    update=_gpt2_update, prepare=_gpt2_prepare, finish=_gpt2_finish,
))


def find_attention(root: nn.Module) -> dict[str, AttentionAdapter]:
    """Attention modules of known families, by name."""
    found = {}
    for name, module in root.named_modules():
        for adapter_name in ATTENTION_ADAPTERS:
            adapter = ATTENTION_ADAPTERS.get(adapter_name)
            if adapter.matches(module):
                found[name] = adapter
                break
    return found


# ------------------------------------------------------------------------------ heads removed
def head_snapshot(root: nn.Module, attention: dict[str, AttentionAdapter]) -> dict[str, torch.Tensor]:
    """The q weight of each attention module before pruning (to find which heads were removed)."""
    return {name: adapter.head_layers(root.get_submodule(name))[0].weight.detach().clone()
            for name, adapter in attention.items()}


def removed_heads(before: torch.Tensor, after: torch.Tensor, head_dim: int) -> list[int]:
    """Indices of the heads of ``before`` (q weight, heads x head_dim rows) missing from ``after``."""
    old = before.reshape(-1, head_dim * before.shape[1])
    new = after.detach().reshape(-1, head_dim * after.shape[1])
    if new.shape[1] != old.shape[1]:  # the hidden width changed too: heads cannot be matched
        return []
    kept = {int((old == row).all(dim=1).nonzero()[0]) for row in new if (old == row).all(dim=1).any()}
    return [h for h in range(old.shape[0]) if h not in kept]


# ------------------------------------------------------------------------------ config
# FFN modules whose width has a config key: (class-name suffix, layer holding the width, key).
_FFN_WIDTHS: tuple[tuple[str, str, str], ...] = (
    ("Intermediate", "dense", "intermediate_size"),  # BERT family
    ("MLP", "c_fc", "n_inner"),  # GPT-2
)


def update_config(root: nn.Module) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Write the FFN width into each Hugging Face config when every layer has the same one.

    Returns ``({module path: {key: value}}, notes)``; the first part is replayed by ``restore``.
    """
    changes: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    seen: set[int] = set()
    for path, module in root.named_modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "to_dict") or id(config) in seen:
            continue
        seen.add(id(config))
        for suffix, layer, key in _FFN_WIDTHS:
            widths = {m.get_submodule(layer).out_features for m in module.modules()
                      if type(m).__name__.endswith(suffix) and isinstance(getattr(m, layer, None), nn.Linear)}
            if not widths or not hasattr(config, key):
                continue
            if len(widths) == 1:
                width = widths.pop()
                if getattr(config, key) != width:
                    setattr(config, key, width)
                    changes.setdefault(path, {})[key] = width
            else:
                notes.append(f"{path or 'model'}: FFN widths differ per layer {sorted(widths)}; "
                             f"config.{key} left as is (the PassRecord holds each layer's size).")
    return changes, notes


def apply_config(root: nn.Module, changes: dict[str, dict[str, Any]]) -> None:
    for path, values in changes.items():
        config = root.get_submodule(path).config
        for key, value in values.items():
            setattr(config, key, value)
