"""all-MiniLM-L6-v2 pruned 30% (structured), then distilled from the unpruned model.

What it measures is fidelity, not speed: the per-sentence embedding cosine of the student to the
teacher (the unpruned fp32 model) on the 400 shipped reference sentences, before and after
``ao.distill``. The student is trained on *other* text: sentences from the Python standard library's
docstrings that are not in the reference set (offline, nothing downloaded), so the after-number is
held out. Distillation: ``output_loss="cosine"`` on the pooled embeddings, AdamW with warm-up +
cosine schedule, ``eval_fn`` = mean cosine on a validation slice of the training text (best epoch kept).

Writes distill.json and .md into benchmarks/results/ (or --results-dir). Timing-insensitive, but
slow (minutes of training):
    .venv/bin/python benchmarks/distill.py [--epochs 3] [--ratio 0.3] [--train-sentences 1600]
        [--results-dir PATH]
"""

from __future__ import annotations

import importlib
import inspect
import os
import platform
import re
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import aigc_opt as ao  # noqa: E402
from _common import base_parser, markdown_table, result_header, write_results  # noqa: E402
from aigc_opt.demo import load_minilm, reference_sentences, sentence_batches  # noqa: E402

MODULES = ["collections", "json", "os", "re", "pathlib", "argparse", "asyncio", "functools", "itertools",
           "inspect", "logging", "subprocess", "threading", "typing", "dataclasses", "textwrap", "shutil",
           "tempfile", "email", "http.client", "urllib.parse", "csv", "sqlite3", "unittest", "decimal",
           "datetime", "string", "struct", "zipfile", "tarfile", "socket", "ssl", "multiprocessing",
           "concurrent.futures", "contextlib", "enum", "fractions", "statistics", "random", "heapq",
           "bisect", "queue", "sched", "selectors", "signal", "mmap", "codecs", "unicodedata", "locale",
           "gettext", "pprint", "reprlib", "weakref", "copy", "pickle", "shelve", "dbm", "gzip", "bz2",
           "lzma", "hashlib", "hmac", "secrets", "uuid", "ipaddress", "html", "xml.dom", "xml.sax",
           "wave", "configparser", "tomllib", "netrc", "plistlib", "calendar", "zoneinfo", "array",
           "graphlib", "numbers", "math", "cmath", "operator", "glob", "fnmatch", "filecmp", "stat",
           "io", "time", "platform", "errno", "ctypes", "traceback", "warnings", "abc", "atexit",
           "gc", "ast", "dis", "tokenize", "keyword", "importlib", "pkgutil", "zipimport", "doctest"]


def training_sentences(exclude: set[str]) -> list[str]:
    """Sentences from standard-library docstrings (every member), minus the reference set."""
    seen, out = set(exclude), []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for obj in [module, *vars(module).values()]:
            members = [obj, *vars(obj).values()] if inspect.isclass(obj) else [obj]
            for member in members:
                try:
                    doc = inspect.getdoc(member)
                except Exception:  # some descriptors raise on access
                    continue
                if not doc or not isinstance(doc, str):
                    continue
                for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                    if 40 <= len(sentence) <= 300 and sentence[0].isupper() and sentence not in seen:
                        seen.add(sentence)
                        out.append(sentence)
    return sorted(out)


def cosines(a: ao.Model, b: ao.Model, batches: list[dict]) -> list[float]:
    with torch.no_grad():
        return torch.cat([torch.nn.functional.cosine_similarity(a(**x), b(**x), dim=1) for x in batches]).tolist()


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train-sentences", type=int, default=1600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)

    teacher = load_minilm()
    reference = reference_sentences()
    pool = training_sentences(set(reference))
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(pool), generator=g).tolist()
    n_val = 160
    train = [pool[i] for i in order[:args.train_sentences]]
    val = [pool[i] for i in order[args.train_sentences:args.train_sentences + n_val]]
    print(f"training text: {len(pool)} docstring sentences available, {len(train)} used, {len(val)} for "
          f"validation; held-out test: {len(reference)} reference sentences")

    test_batches = sentence_batches(teacher, batch_size=16, seq_len=128, sentences=reference)
    val_batches = sentence_batches(teacher, batch_size=16, seq_len=args.seq_len, sentences=val)
    train_batches = sentence_batches(teacher, batch_size=args.batch_size, seq_len=args.seq_len, sentences=train)

    student = ao.prune(teacher, args.ratio)
    before = cosines(student, teacher, test_batches)
    print(f"pruned {args.ratio:.0%}: cosine to teacher mean {statistics.mean(before):.4f}")

    def eval_fn(model: ao.Model) -> float:
        return statistics.mean(cosines(model, teacher, val_batches))

    started = time.perf_counter()
    distilled = ao.distill(student, teacher, train_batches, epochs=args.epochs, lr=args.lr,
                           output_loss="cosine", eval_fn=eval_fn, verbose=True)
    seconds = time.perf_counter() - started
    after = cosines(distilled, teacher, test_batches)
    details = distilled.history[-1].details

    def summary(values: list[float]) -> dict:
        ordered = sorted(values)
        return {"mean": statistics.mean(values), "median": statistics.median(values), "min": ordered[0],
                "p10": ordered[len(ordered) // 10], "share_above_0.9": sum(v > 0.9 for v in values) / len(values)}

    result = {
        **result_header("distill"), "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores", "torch_threads": torch.get_num_threads(),
        "settings": {**{k: v for k, v in vars(args).items() if k != "results_dir"}, "output_loss": "cosine",
                     "train_batches": len(train_batches), "validation_sentences": len(val),
                     "test_sentences": len(test_batches) * 16},
        "params": {"teacher": teacher.num_parameters(), "student": student.num_parameters()},
        "cosine_to_teacher": {"pruned": summary(before), "pruned_then_distilled": summary(after)},
        "train_seconds": seconds, "history": details["history"], "best_validation_cosine": details["best_score"],
        "precision": details.get("precision"),
    }
    b, a = result["cosine_to_teacher"]["pruned"], result["cosine_to_teacher"]["pruned_then_distilled"]
    lines = [
        f"# all-MiniLM-L6-v2 pruned {args.ratio:.0%}, then distilled ({result['date']})", "",
        f"Machine: {result['machine']}. Student {student.num_parameters() / 1e6:.1f} M parameters vs teacher "
        f"{teacher.num_parameters() / 1e6:.1f} M. Distilled {args.epochs} epochs on {len(train_batches) * args.batch_size} "
        f"standard-library docstring sentences (not in the test set), batch {args.batch_size}, sequence "
        f"{args.seq_len}, lr {args.lr}, output_loss=cosine, best epoch by validation cosine; "
        f"{seconds / 60:.1f} min of training. Test: per-sentence embedding cosine to the teacher on the "
        f"{len(test_batches) * 16} shipped reference sentences (sequence 128).", "",
        *markdown_table(["student", "cosine mean", "median", "p10", "min", "share > 0.9"],
                        [[label, f"{s['mean']:.4f}", f"{s['median']:.4f}", f"{s['p10']:.4f}",
                          f"{s['min']:.4f}", f"{s['share_above_0.9']:.0%}"]
                         for label, s in (("pruned", b), ("pruned + distilled", a))]),
        "",
        *markdown_table(["epoch", "train loss", "validation cosine"],
                        [[h["epoch"], f"{h['loss']:.4f}", f"{h.get('score', float('nan')):.4f}"]
                         for h in details["history"]]),
    ]
    print(write_results("distill", result, lines, args.results_dir))


if __name__ == "__main__":
    main()
