"""``Monitor.report()``: a snapshot as markdown, and a figure (latency histogram, drift per sampled call)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["snapshot_markdown", "report_markdown", "live_table"]


def _num(value: Any, fmt: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    lat, d, w = s["latency_ms"], s["drift"], s["drift"]["window"]
    errors = ", ".join(f"{k}: {n}" for k, n in s["errors"].items()) or "none"
    rows = [
        ("calls", str(s["calls"])),
        ("rows", str(s["rows"])),
        ("errors", f"{errors} (rate {100 * s['error_rate']:.2f}%)"),
        ("latency p50 / p90 / p99 (ms)", f"{_num(lat['p50'])} / {_num(lat['p90'])} / {_num(lat['p99'])}"),
        ("latency mean / max (ms)", f"{_num(lat['mean'])} / {_num(lat['max'])}"),
        ("batch size mean / max", f"{_num(s['batch_size']['mean'], '.1f')} / {s['batch_size']['max']}"),
        ("throughput (rows/s)", _num(s["throughput_rows_per_s"], ".1f")),
        ("busy fraction", _num(s["busy_fraction"], ".2f")),
        ("RSS (MB)", _num(s["rss_bytes"] / 1e6 if s["rss_bytes"] else None, ".1f")
         + (f" over {s['processes']} processes" if s.get("processes", 1) > 1 else "")),
        ("drift: sampled calls", f"{d['sampled_calls']} (sample rate {s['sample_rate']:g})"),
    ]
    if d["sampled_calls"]:
        rows += [
            ("drift: cosine mean / min (all)", f"{_num(d['cosine_mean'], '.5f')} / {_num(d['cosine_min'], '.5f')}"),
            ("drift: max abs error (all)", _num(d["max_abs_error"], ".3g")),
            ("drift: top-1 agreement (all)", _num(d["top1_agreement"], ".3f")),
            (f"drift: last {w['calls']} sampled: cosine / top-1", f"{_num(w['cosine_mean'], '.5f')} / "
             f"{_num(w['top1_agreement'], '.3f')}"),
        ]
    if d["threshold"] is not None:
        t = d["threshold"]
        rows.append(("drift: threshold", f"cosine >= {_num(t['cosine'], '.5f')}, top-1 >= "
                     f"{_num(t['top1_agreement'], '.3f')}, max-abs <= {_num(t['max_abs_error'], '.3g')} "
                     f"({t['source']})"))
        rows.append(("drift: ALERT" if d["alert"] else "drift: alert",
                     "; ".join(d["alert_reasons"]) if d["alert"] else "off"))
    return rows


def snapshot_markdown(s: dict[str, Any]) -> str:
    lines = [f"### Monitor: {s['model']}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _rows(s)]
    return "\n".join(lines) + "\n"


def live_table(s: dict[str, Any]) -> str:
    """The snapshot as aligned text rows (``aigc-opt monitor``)."""
    rows = [("model", str(s["model"])), *_rows(s)]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def report_markdown(s: dict[str, Any], *, plot: Path | None, window: list[list[float]]) -> str:
    text = snapshot_markdown(s)
    if plot is not None:
        path = _figure(s, window, plot)
        text += f"\n![latency and drift of {s['model']}]({path.name})\n"
    return text


def _figure(s: dict[str, Any], window: list[list[float]], path: Path) -> Path:
    from .bench._figures import new_figure, save_figure

    fig, (left, right) = new_figure((11, 4), purpose="Monitor.report(plot=...)")
    hist = s["latency_histogram"]
    labels = [("inf" if math.isinf(b) else f"{b * 1e3:g}") for b in hist["le_seconds"]]
    left.bar(range(len(labels)), hist["counts"], color="C0")
    left.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
    left.set_xlabel("latency bucket upper bound (ms)")
    left.set_ylabel("calls")
    left.set_title(f"{s['model']}: {s['calls']} calls")
    if window:
        right.plot([w[0] for w in window], marker=".", label="cosine mean")
        right.plot([w[1] for w in window], marker=".", alpha=0.6, label="cosine min")
        t = (s["drift"]["threshold"] or {}).get("cosine")
        if t is not None:
            right.axhline(t, color="red", linewidth=0.8, label=f"threshold {t:.4f}")
        right.legend(fontsize=7)
        right.ticklabel_format(axis="y", useOffset=False)
    right.set_xlabel("recent sampled call")
    right.set_ylabel("cosine vs baseline")
    right.set_title("drift" + (" (ALERT)" if s["drift"]["alert"] else ""))
    fig.tight_layout()
    return save_figure(fig, path)
