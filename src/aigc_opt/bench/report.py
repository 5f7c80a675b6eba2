"""Report: a baseline and its candidates, rendered as a text table, markdown, JSON, pandas, HTML."""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .fidelity import Fidelity
from .measurement import Measurement

__all__ = ["Report", "Entry", "text_table", "unique_names"]


@dataclass
class Entry:
    """One column of a Report: a measurement, and for candidates fidelity and latency ratio."""

    measurement: Measurement
    fidelity: Fidelity | None = None
    metric: float | None = None
    # candidate median latency / baseline median latency, with a 95% interval: (point, lo, hi)
    latency_ratio: tuple[float, float, float] | None = None
    # graphs compiled by calls during the comparison and the seconds those calls took, for models
    # that count them (Compile(shapes=...)); None for models that do not
    recompiles: tuple[int, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "measurement": self.measurement.to_dict(),
            "fidelity": self.fidelity.to_dict() if self.fidelity else None,
            "metric": self.metric,
            "latency_ratio": list(self.latency_ratio) if self.latency_ratio else None,
            "recompiles": list(self.recompiles) if self.recompiles else None,
        }


def unique_names(names: list[str]) -> list[str]:
    """The names with repeats told apart: a second ``MiniLM+Quantize(int8-static)`` becomes
    ``MiniLM+Quantize(int8-static) #2`` (a report never shows two columns under one name)."""
    seen = set(names)
    counts: dict[str, int] = {}
    out = []
    for name in names:
        counts[name] = counts.get(name, 0) + 1
        if counts[name] == 1:
            out.append(name)
            continue
        n = counts[name]
        while f"{name} #{n}" in seen:
            n += 1
        counts[name] = n
        seen.add(f"{name} #{n}")
        out.append(f"{name} #{n}")
    return out


def text_table(columns: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """Rows of (label, cells) under column names: labels left-aligned, cells right-aligned."""
    header = ["", *columns]
    body = [[label, *cells] for label, cells in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *[line(r) for r in body]])


def speedup_panel(fig: Any, ax: Any, rows: list[tuple[str, str, tuple[float, float, float], float]], *,
                  xlabel: str, ylabel: str) -> None:
    """Plot on ``ax`` each ``(label, colour, time ratio vs baseline (median, low, high), y)`` row at its
    speed-up (1 / ratio), its 95% interval as a line, the no-change line x = 1 and the axis labels;
    then lay ``fig`` out and place the labels apart (once the axes are final)."""
    from ._figures import place_labels

    points = []
    for _, color, ratio, y in rows:
        points.append((1 / ratio[0], y))
        ax.scatter(*points[-1], color=color)
        ax.plot([1 / ratio[2], 1 / ratio[1]], [y] * 2, alpha=0.5, color=color)  # 95% interval
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    place_labels(ax, points, [r[0] for r in rows], colors=[r[1] for r in rows])


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


@dataclass
class Report:
    """Result of ``ao.compare``. ``print(report)`` shows a table: rows are what was measured,
    columns the baseline and each candidate."""

    baseline: Entry
    candidates: list[Entry]
    batches: int
    iters: int
    warmup: int
    notes: list[str] = field(default_factory=list)
    settle: str = ""  # how runtime switches were absorbed, when any were (see compare's settle=)

    @property
    def entries(self) -> list[Entry]:
        return [self.baseline, *self.candidates]

    def candidate(self, index: int = 0) -> Entry:
        return self.candidates[index]

    def names(self) -> list[str]:
        """Column names, baseline first: each model's label, repeats told apart (``ao.compare``
        already names its measurements so; this covers Reports put together by hand)."""
        return unique_names([e.measurement.name for e in self.entries])

    def rows(self) -> list[tuple[str, list[str]]]:
        """(label, one cell per entry) for every row of the table."""
        es = self.entries
        rows: list[tuple[str, list[str]]] = []

        def add(label: str, cells: list[str]) -> None:
            rows.append((label, cells))

        m = [e.measurement for e in es]
        add("latency p50 (ms)", [_ms(x.median) for x in m])
        add("  95% CI of p50 (ms)", [f"{_ms(x.median_ci95[0])}-{_ms(x.median_ci95[1])}" for x in m])
        add("latency p90 (ms)", [_ms(x.p90) for x in m])
        add("latency p99 (ms)", [_ms(x.p99) for x in m])
        add("latency mean (ms) ±95%", [f"{_ms(x.mean)} ±{_ms((x.mean_ci95[1] - x.mean_ci95[0]) / 2)}" for x in m])
        add("outliers (> Q3 + 1.5 IQR)", [f"{x.outliers}/{len(x.samples)}" for x in m])
        add("latency vs baseline", ["1.00x"] + [
            f"{r[0]:.2f}x [{r[1]:.2f}, {r[2]:.2f}]" if (r := e.latency_ratio) else "-" for e in self.candidates])
        add("speed-up", ["1.00x"] + [f"{1 / r[0]:.2f}x" if (r := e.latency_ratio) else "-" for e in self.candidates])
        add("throughput (samples/s)", [f"{x.throughput:.1f}" for x in m])
        add("size on disk (MB)", [_mb(x.size_bytes) for x in m])
        add("weights in memory (MB)", [_mb(x.memory_bytes) for x in m])
        add("peak run memory (MB)", [_mb(x.peak_memory_bytes) for x in m])
        if any(x.peak_rss_bytes for x in m):
            add("process peak RSS (MB)", [_mb(x.peak_rss_bytes) for x in m])
        add("parameters (M)", [f"{x.num_parameters / 1e6:.2f}" if x.num_parameters else "-" for x in m])
        if any(x.flops for x in m):
            add("GFLOP per batch", [f"{x.flops / 1e9:.2f}" if x.flops else "-" for x in m])
            add("FLOP/byte (est.)", [f"{a:.1f}" if (a := x.arithmetic_intensity) else "-" for x in m])
            sources = {x.peak_source for x in m if x.peak_source}
            label = f"fp32 peak used ({', '.join(sorted(sources))})" if sources else "fp32 peak used"
            add(label, [f"{100 * r:.1f}%" if (r := x.roofline_fraction) else "-" for x in m])
        fid = [e.fidelity for e in self.candidates]
        add("cosine vs baseline (mean)", ["1"] + [f"{f.cosine_mean:.5f}" if f else "-" for f in fid])
        add("cosine vs baseline (min)", ["1"] + [f"{f.cosine_min:.5f}" if f else "-" for f in fid])
        add("max abs error", ["0"] + [f"{f.max_abs_error:.3g}" if f else "-" for f in fid])
        if any(f and f.top1_agreement is not None for f in fid):
            add("top-1 agreement", ["1"] + [
                f"{f.top1_agreement:.3f}" if f and f.top1_agreement is not None else "-" for f in fid])
        if any(e.metric is not None for e in es):
            add("eval metric", [f"{e.metric:.4f}" if e.metric is not None else "-" for e in es])
        if any(e.recompiles is not None for e in es):
            add("recompiles during run (s)", [f"{e.recompiles[0]} ({e.recompiles[1]:.1f})" if e.recompiles else "-"
                                              for e in es])
        return rows

    def _warnings(self) -> list[str]:
        out = list(self.notes)
        for e, name in zip(self.entries, self.names()):
            x = e.measurement
            if x.noisy:
                out.append(f"{name}: latency spread is high (IQR {_ms(x.iqr)} ms > 25% of the median); "
                           "run again with nothing else on the machine or more iters.")
            if e.fidelity is not None and e.fidelity.nonfinite:
                out.append(f"{name}: {e.fidelity.nonfinite} output value(s) are NaN/inf where the baseline's are finite.")
            if x.simulated:
                out.append(f"{name}: low precision is SIMULATED (fake-quant); its latency is not a speed claim.")
            if e.recompiles and e.recompiles[0]:
                out.append(f"{name}: {e.recompiles[0]} graph(s) compiled during the run ({e.recompiles[1]:.1f} s), "
                           "from input shapes it was not compiled for; Compile(shapes='buckets') compiles them "
                           "up front.")
        return out

    def _footer(self) -> list[str]:
        b = self.baseline.measurement
        return [
            f"device {b.device}, {b.num_threads} threads, target {b.target}, batch {b.batch_size:g}, "
            f"{self.batches} input batch(es), {self.iters} interleaved rounds after {self.warmup} warm-up"
            + (f" ({b.stop_reason})" if b.stop_reason else "") + (f"; {self.settle}" if self.settle else ""),
            *[f"{name}: {' -> '.join(e.measurement.passes) or 'no passes'}"
              for e, name in zip(self.candidates, self.names()[1:])],
            *[f"warning: {w}" for w in self._warnings()],
        ]

    def __str__(self) -> str:
        table = text_table(self.names(), self.rows())
        return "\n".join([table, "", *self._footer()])

    def to_markdown(self) -> str:
        header = ["metric", *self.names()]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in self.rows()]
        return "\n".join(lines + [""] + [f"- {line}" for line in self._footer()]) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline.to_dict(),
            "candidates": [e.to_dict() for e in self.candidates],
            "batches": self.batches, "iters": self.iters, "warmup": self.warmup, "settle": self.settle,
            "warnings": self._warnings(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """A Report back from :meth:`to_dict` (or the parsed :meth:`to_json`), e.g. to draw the
        figure of a stored result again: every sample, fidelity number and ratio is kept; derived
        numbers are recomputed from them."""
        def entry(d: dict[str, Any]) -> Entry:
            ratio, recompiles = d.get("latency_ratio"), d.get("recompiles")
            return Entry(measurement=_from_fields(Measurement, d["measurement"]),
                         fidelity=_from_fields(Fidelity, d["fidelity"]) if d.get("fidelity") else None,
                         metric=d.get("metric"), latency_ratio=tuple(ratio) if ratio else None,
                         recompiles=(int(recompiles[0]), float(recompiles[1])) if recompiles else None)

        return cls(baseline=entry(data["baseline"]), candidates=[entry(c) for c in data["candidates"]],
                   batches=data["batches"], iters=data["iters"], warmup=data["warmup"],
                   settle=data.get("settle", ""))

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text; NaN and infinity (a broken candidate) are written as null, as JSON has none."""
        return json.dumps(_finite(self.to_dict()), indent=indent, allow_nan=False)

    def figure(self) -> Any:
        """The report as a matplotlib Figure (needs matplotlib): latency distributions per
        model, and speed-up vs fidelity with one point per candidate, each labelled by its
        column name with labels placed apart. Built without pyplot, so a notebook's backend is
        left alone; ``IPython.display.display(report.figure())`` shows it inline."""
        from ._figures import new_figure, wrap_label

        names = self.names()
        fig, (left, right) = new_figure((12, 4.5 + 0.12 * len(names)), purpose="Report.figure()")
        import matplotlib

        # matplotlib 3.10 renamed vert=False to orientation="horizontal" (vert warns from 3.11)
        horizontal = ({"orientation": "horizontal"} if tuple(int(p) for p in matplotlib.__version__.split(".")[:2])
                      >= (3, 10) else {"vert": False})
        left.boxplot([[t * 1e3 for t in e.measurement.samples] for e in self.entries], **horizontal,
                     tick_labels=[wrap_label(n) for n in names], showfliers=True)
        left.set_xlabel("latency per batch (ms)")
        left.set_title("latency distribution")
        rows = [(name, f"C{i}", e.latency_ratio, e.fidelity.cosine_mean)
                for i, (e, name) in enumerate(zip(self.candidates, names[1:]))
                if e.latency_ratio and e.fidelity and e.fidelity.cosine_mean is not None]
        right.ticklabel_format(axis="y", useOffset=False)
        right.set_title("speed vs fidelity")
        speedup_panel(fig, right, rows, xlabel="speed-up vs baseline (x, 95% interval)",
                      ylabel="cosine vs baseline (mean)")
        return fig

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Save :meth:`figure` to ``path`` (PNG, SVG or PDF by the suffix), atomically. Needs matplotlib."""
        from ._figures import save_figure

        return save_figure(self.figure(), path)

    def to_pandas(self) -> Any:
        """The table as a pandas DataFrame (needs pandas)."""
        from .._deps import require

        pd = require("pandas", extra=None, purpose="Report.to_pandas()")
        rows = self.rows()
        return pd.DataFrame({name: list(cells) for name, cells in zip(self.names(), zip(*[c for _, c in rows]))},
                            index=[label for label, _ in rows])

    def _repr_html_(self) -> str:
        header = "".join(f"<th>{html.escape(h)}</th>" for h in ["", *self.names()])
        body = "".join(
            "<tr>" + f"<th style='text-align:left'>{html.escape(label)}</th>"
            + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
            for label, cells in self.rows()
        )
        foot = "".join(f"<li>{html.escape(line)}</li>" for line in self._footer())
        return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table><ul>{foot}</ul>"


def _from_fields(cls: Any, data: dict[str, Any]) -> Any:
    """``cls(**data)`` keeping only its constructor fields (``to_dict`` adds derived ones)."""
    names = {f.name for f in fields(cls) if f.init}
    return cls(**{k: v for k, v in data.items() if k in names})


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
