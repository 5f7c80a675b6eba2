"""Hypothesis strategies: random small models wrapped in ``ao.Model``, with example inputs.

A strategy draws a *spec* (a frozen dataclass: cheap to draw, shrink and print), and the test
calls ``spec.build()`` to get the ``ao.Model``. A failing example therefore prints as a
constructor call that can be pasted into ``@example(spec=...)`` as a regression case.

Families:

- :class:`MLPSpec`: 1-4 ``nn.Linear`` layers of width 1-64, ReLU/GELU/Tanh/SiLU, with or without
  bias, on (batch, features) or (batch, seq, features) inputs.
- :class:`CNNSpec`: ``Conv1d`` or ``Conv2d`` blocks (groups 1, grouped or depthwise, optional
  BatchNorm, max/avg pooling), then global pooling or flatten, and a ``nn.Linear``.
- :class:`AttentionSpec`: 1-2 attention blocks (``nn.MultiheadAttention`` or hand-written
  attention, written with BERT-like attribute names or plain ones) with a residual connection,
  LayerNorm and an optional FFN.
- :class:`BertSpec` / :class:`GPT2Spec`: tiny Hugging Face models built from a config (no
  download), called with ``input_ids`` (and ``attention_mask``) as keyword inputs.

Every module and input is built under ``torch.random.fork_rng`` from a drawn seed: the same
spec gives the same weights and inputs, and the caller's RNG state is left alone. Models are
in eval mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

import aigc_opt as ao

__all__ = ["Spec", "MLPSpec", "CNNSpec", "ConvBlock", "AttentionSpec", "BertSpec", "GPT2Spec",
           "FuzzMLP", "FuzzCNN", "FuzzAttention", "mlp_specs", "cnn_specs", "attention_specs",
           "bert_specs", "gpt2_specs", "hf_specs", "torch_specs", "model_specs", "SEEDS"]

SEEDS = st.integers(min_value=0, max_value=2**16 - 1)
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}
VOCAB = 100


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """A private RNG scope: build under ``seed`` without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class Spec:
    """What every spec offers: the module, inputs of any batch size, and the wrapped Model."""

    family: str = "?"
    seed: int
    batch: int

    def module(self) -> nn.Module:
        raise NotImplementedError

    def _inputs(self, batch: int, seq: int | None) -> Any:
        raise NotImplementedError

    def inputs(self, batch: int | None = None, *, seed: int = 0, seq: int | None = None) -> Any:
        """One batch (a tuple or a dict, as the module is called); ``seed`` picks other values."""
        with _seeded(self.seed * 1009 + seed + 1):
            return self._inputs(self.batch if batch is None else batch, seq)

    def other_batch(self, *, vary_seq: bool = True) -> Any:
        """Inputs of another batch size (1 <-> 3) and, with ``vary_seq``, sequence length."""
        seq = getattr(self, "seq", None)
        if seq is not None and vary_seq:
            seq = seq + 1 if seq < 6 else seq - 2
        return self.inputs(1 if self.batch > 1 else 3, seed=7, seq=seq)

    def build(self) -> ao.Model:
        with _seeded(self.seed):
            module = self.module().eval()
        return ao.Model(module, example_inputs=self.inputs(), target="host", name=self.family)


# ------------------------------------------------------------------------------------ MLP
class FuzzMLP(nn.Module):
    def __init__(self, d_in: int, widths: tuple[int, ...], activation: str, bias: bool):
        super().__init__()
        layers: list[nn.Module] = []
        prev = d_in
        for i, w in enumerate(widths):
            layers.append(nn.Linear(prev, w, bias=bias))
            if i < len(widths) - 1:
                layers.append(ACTIVATIONS[activation]())
            prev = w
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass(frozen=True)
class MLPSpec(Spec):
    """``widths`` are the output widths of the Linear layers (the last one is the output)."""

    d_in: int
    widths: tuple[int, ...]
    activation: str = "relu"
    bias: bool = True
    batch: int = 2
    seq: int | None = None
    seed: int = 0
    family = "mlp"

    def module(self) -> nn.Module:
        return FuzzMLP(self.d_in, self.widths, self.activation, self.bias)

    def _inputs(self, batch: int, seq: int | None) -> Any:
        shape = (batch, self.d_in) if self.seq is None else (batch, seq or self.seq, self.d_in)
        return (torch.randn(shape),)


@st.composite
def mlp_specs(draw: Any, max_width: int = 64) -> MLPSpec:
    depth = draw(st.integers(1, 4))
    return MLPSpec(
        d_in=draw(st.integers(1, max_width)),
        widths=tuple(draw(st.lists(st.integers(1, max_width), min_size=depth, max_size=depth))),
        activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
        bias=draw(st.booleans()),
        batch=draw(st.integers(1, 4)),
        seq=draw(st.none() | st.integers(1, 6)),
        seed=draw(SEEDS),
    )


# ------------------------------------------------------------------------------------ CNN
@dataclass(frozen=True)
class ConvBlock:
    out_channels: int
    kernel: int
    groups: int = 1
    padding: bool = True
    batchnorm: bool = False
    pool: str | None = None  # "max", "avg" or None
    activation: str = "relu"


class FuzzCNN(nn.Module):
    def __init__(self, dim: int, in_channels: int, blocks: tuple[ConvBlock, ...], head: str, spatial: int,
                 d_out: int):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[dim]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dim]
        pools = {"max": {1: nn.MaxPool1d, 2: nn.MaxPool2d}[dim], "avg": {1: nn.AvgPool1d, 2: nn.AvgPool2d}[dim]}
        layers: list[nn.Module] = []
        channels, size = in_channels, spatial
        for b in blocks:
            layers.append(conv(channels, b.out_channels, b.kernel, padding=b.kernel // 2 if b.padding else 0,
                               groups=b.groups))
            size = size if b.padding else size - b.kernel + 1
            if b.batchnorm:
                layers.append(norm(b.out_channels))
            layers.append(ACTIVATIONS[b.activation]())
            if b.pool:
                layers.append(pools[b.pool](2))
                size //= 2
            channels = b.out_channels
        self.features = nn.Sequential(*layers)
        self.head_kind = head
        self.pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}[dim](1) if head == "gap" else nn.Identity()
        self.classifier = nn.Linear(channels * (1 if head == "gap" else size ** dim), d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@dataclass(frozen=True)
class CNNSpec(Spec):
    dim: int
    in_channels: int
    blocks: tuple[ConvBlock, ...]
    head: str = "gap"  # "gap" (global average pooling) or "flatten"
    spatial: int = 8
    d_out: int = 3
    batch: int = 2
    seed: int = 0
    family = "cnn"

    def module(self) -> nn.Module:
        return FuzzCNN(self.dim, self.in_channels, self.blocks, self.head, self.spatial, self.d_out)

    def _inputs(self, batch: int, seq: int | None) -> Any:
        return (torch.randn(batch, self.in_channels, *[self.spatial] * self.dim),)


@st.composite
def conv_blocks(draw: Any, in_channels: int, spatial: int, depth: int) -> tuple[tuple[ConvBlock, ...], int]:
    blocks, channels, size = [], in_channels, spatial
    for _ in range(depth):
        kind = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
        if kind == "depthwise":
            groups = channels
            out = channels * draw(st.integers(1, 2))
        elif kind == "grouped":
            groups = draw(st.sampled_from([g for g in range(1, channels + 1) if channels % g == 0]))
            out = groups * draw(st.integers(1, max(1, 16 // groups)))
        else:
            groups, out = 1, draw(st.integers(1, 16))
        kernel = draw(st.sampled_from([1, 3, 5]))
        padding = draw(st.booleans()) if size >= kernel else True
        size = size if padding else size - kernel + 1
        pool = draw(st.sampled_from([None, "max", "avg"])) if size >= 2 else None
        size = size // 2 if pool else size
        blocks.append(ConvBlock(out, kernel, groups, padding, draw(st.booleans()), pool,
                                draw(st.sampled_from(sorted(ACTIVATIONS)))))
        channels = out
    return tuple(blocks), size


@st.composite
def cnn_specs(draw: Any) -> CNNSpec:
    dim = draw(st.sampled_from([1, 2]))
    in_channels = draw(st.integers(1, 4))
    spatial = draw(st.integers(3, 16 if dim == 2 else 24))
    blocks, _ = draw(conv_blocks(in_channels, spatial, draw(st.integers(1, 3))))
    return CNNSpec(dim=dim, in_channels=in_channels, blocks=blocks, head=draw(st.sampled_from(["gap", "flatten"])),
                   spatial=spatial, d_out=draw(st.integers(1, 10)), batch=draw(st.integers(1, 4)),
                   seed=draw(SEEDS))


# ------------------------------------------------------------------------------------ attention
class BertLikeSelfAttention(nn.Module):
    """Hand-written multi-head attention with BERT's attribute names (query/key/value,
    num_attention_heads, attention_head_size, all_head_size)."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = width // heads
        self.all_head_size = width
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = ((lin(x).view(b, t, self.num_attention_heads, self.attention_head_size).transpose(1, 2))
                   for lin in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.attention_head_size)
        if self.causal:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        out = scores.softmax(-1) @ v
        return out.transpose(1, 2).reshape(b, t, self.all_head_size)


class PlainSelfAttention(nn.Module):
    """Hand-written multi-head attention (q/k/v/o projections, scaled_dot_product_attention)."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.head_dim, self.causal = heads, width // heads, causal
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = ((lin(x).view(b, t, self.heads, self.head_dim).transpose(1, 2))
                   for lin in (self.q_proj, self.k_proj, self.v_proj))
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)


class TorchMHA(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.mha = nn.MultiheadAttention(width, heads, batch_first=True)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1) if self.causal else None
        return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0]


ATTENTION_KINDS = {"mha": TorchMHA, "bert-like": BertLikeSelfAttention, "plain": PlainSelfAttention}


class AttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, kind: str, causal: bool, ffn: int, norm_first: bool):
        super().__init__()
        self.attention = ATTENTION_KINDS[kind](width, heads, causal)
        self.output = nn.Linear(width, width)  # the output projection (MHA has its own as well)
        self.norm1 = nn.LayerNorm(width)
        self.norm_first = norm_first
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Linear(ffn, width)) if ffn else None
        self.norm2 = nn.LayerNorm(width) if ffn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = x + self.output(self.attention(self.norm1(x)))
            if self.ffn is not None:
                x = x + self.ffn(self.norm2(x))
            return x
        x = self.norm1(x + self.output(self.attention(x)))
        if self.ffn is not None:
            x = self.norm2(x + self.ffn(x))
        return x


class FuzzAttention(nn.Module):
    def __init__(self, d_in: int, width: int, heads: int, kind: str, layers: int, causal: bool, ffn: int,
                 norm_first: bool, pool: bool, d_out: int):
        super().__init__()
        self.embed = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(AttentionBlock(width, heads, kind, causal, ffn, norm_first)
                                    for _ in range(layers))
        self.pool = pool
        self.head = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1) if self.pool else h)


@dataclass(frozen=True)
class AttentionSpec(Spec):
    d_in: int
    width: int
    heads: int
    kind: str = "mha"  # "mha", "bert-like" or "plain"
    layers: int = 1
    causal: bool = False
    ffn: int = 0  # FFN width, 0 for none
    norm_first: bool = False
    pool: bool = False
    d_out: int = 4
    batch: int = 2
    seq: int = 5
    seed: int = 0
    family = "attention"

    def module(self) -> nn.Module:
        return FuzzAttention(self.d_in, self.width, self.heads, self.kind, self.layers, self.causal, self.ffn,
                             self.norm_first, self.pool, self.d_out)

    def _inputs(self, batch: int, seq: int | None) -> Any:
        return (torch.randn(batch, seq or self.seq, self.d_in),)


@st.composite
def attention_specs(draw: Any) -> AttentionSpec:
    heads = draw(st.sampled_from([1, 2, 4]))
    # Head size 8 or 16: LayerNorm over 2 or 4 features is close to a sign function, which no
    # low-precision method can be expected to follow.
    width = heads * draw(st.sampled_from([8, 16]))
    return AttentionSpec(
        d_in=draw(st.integers(1, 16)), width=width, heads=heads,
        kind=draw(st.sampled_from(sorted(ATTENTION_KINDS))), layers=draw(st.integers(1, 2)),
        causal=draw(st.booleans()), ffn=draw(st.sampled_from([0, width, 2 * width])),
        norm_first=draw(st.booleans()), pool=draw(st.booleans()), d_out=draw(st.integers(1, 8)),
        batch=draw(st.integers(1, 3)), seq=draw(st.integers(1, 8)), seed=draw(SEEDS),
    )


# ------------------------------------------------------------------------------------ Hugging Face
def _token_inputs(batch: int, seq: int, mask: bool, pad: bool) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, seq))
    out = {"input_ids": ids}
    if mask:
        attention = torch.ones(batch, seq, dtype=torch.long)
        if pad and seq > 1:  # right padding of random length (at least one real token per row)
            lengths = torch.randint(1, seq + 1, (batch,))
            attention = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        out["attention_mask"] = attention
    return out


@dataclass(frozen=True)
class BertSpec(Spec):
    cls: str = "BertModel"  # or "BertForSequenceClassification", "BertForMaskedLM"
    hidden: int = 32
    heads: int = 2
    layers: int = 1
    intermediate: int = 37
    attn: str = "sdpa"  # or "eager"
    mask: bool = True
    pad: bool = False
    batch: int = 2
    seq: int = 6
    seed: int = 0
    family = "bert"

    def module(self) -> nn.Module:
        import transformers

        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=self.hidden, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, intermediate_size=self.intermediate, max_position_embeddings=64,
            num_labels=3, attn_implementation=self.attn)
        return getattr(transformers, self.cls)(config)

    def _inputs(self, batch: int, seq: int | None) -> Any:
        return _token_inputs(batch, seq or self.seq, self.mask, self.pad)


# Both attention implementations: Model.load keeps the one a model was saved with
# (test_regressions.py::test_hf_load_keeps_the_attention_implementation).
HF_ATTENTION = ("sdpa", "eager")


@st.composite
def bert_specs(draw: Any) -> BertSpec:
    heads = draw(st.sampled_from([1, 2, 4]))
    return BertSpec(
        cls=draw(st.sampled_from(["BertModel", "BertForSequenceClassification", "BertForMaskedLM"])),
        hidden=heads * draw(st.sampled_from([8, 16])), heads=heads, layers=draw(st.integers(1, 2)),
        intermediate=draw(st.integers(8, 64)), attn=draw(st.sampled_from(HF_ATTENTION)),
        mask=draw(st.booleans()), pad=draw(st.booleans()), batch=draw(st.integers(1, 3)),
        seq=draw(st.integers(1, 12)), seed=draw(SEEDS),
    )


@dataclass(frozen=True)
class GPT2Spec(Spec):
    cls: str = "GPT2LMHeadModel"  # or "GPT2Model"
    hidden: int = 32
    heads: int = 2
    layers: int = 1
    inner: int | None = None  # FFN width (None: 4 x hidden)
    attn: str = "sdpa"
    mask: bool = False
    pad: bool = False
    batch: int = 2
    seq: int = 6
    seed: int = 0
    family = "gpt2"

    def module(self) -> nn.Module:
        import transformers

        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=self.hidden, n_layer=self.layers, n_head=self.heads, n_inner=self.inner,
            n_positions=64, use_cache=False, bos_token_id=0, eos_token_id=0, attn_implementation=self.attn)
        return getattr(transformers, self.cls)(config)

    def _inputs(self, batch: int, seq: int | None) -> Any:
        return _token_inputs(batch, seq or self.seq, self.mask, self.pad)


@st.composite
def gpt2_specs(draw: Any) -> GPT2Spec:
    heads = draw(st.sampled_from([1, 2, 4]))
    return GPT2Spec(
        cls=draw(st.sampled_from(["GPT2LMHeadModel", "GPT2Model"])), hidden=heads * draw(st.sampled_from([8, 16])),
        heads=heads, layers=draw(st.integers(1, 2)), inner=draw(st.none() | st.integers(8, 64)),
        attn=draw(st.sampled_from(HF_ATTENTION)), mask=draw(st.booleans()), pad=draw(st.booleans()),
        batch=draw(st.integers(1, 3)), seq=draw(st.integers(1, 12)), seed=draw(SEEDS),
    )


def hf_specs() -> st.SearchStrategy[Spec]:
    return bert_specs() | gpt2_specs()


def torch_specs() -> st.SearchStrategy[Spec]:
    """Plain torch modules (cheap to build and to run)."""
    return mlp_specs() | cnn_specs() | attention_specs()


def model_specs() -> st.SearchStrategy[Spec]:
    """Every family; MLPs first, so that shrinking ends on the simplest model that fails."""
    return mlp_specs() | cnn_specs() | attention_specs() | bert_specs() | gpt2_specs()


def replace(spec: Spec, **changes: Any) -> Spec:
    return dataclasses.replace(spec, **changes)  # type: ignore[type-var]
