"""Shared figure plumbing for the reports: a pyplot-free Figure, labels placed apart, atomic saves.

Reports build a ``matplotlib.figure.Figure`` directly (no pyplot): nothing global changes, the
backend of a notebook is left alone, and no figure stays open after a save.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._store import atomic_write

__all__ = ["new_figure", "place_labels", "save_figure", "wrap_label"]

# Offsets tried for a label, in points from its point, nearest ring first: right, left, above,
# below, then the diagonals, each text anchored on the side facing its point.
_RINGS = (5, 14, 26, 40, 56, 76, 100)
_DIRECTIONS = ((1, 0.2), (-1, 0.2), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1))


def new_figure(figsize: tuple[float, float], ncols: int = 2, *, purpose: str = "report figures") -> tuple[Any, Any]:
    """A Figure with an Agg canvas (it can be drawn and measured) and its ``ncols`` axes."""
    from .._deps import require

    require("matplotlib", extra="plot", purpose=purpose)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def _offsets() -> list[tuple[float, float, str, str]]:
    out = []
    for r in _RINGS:
        for dx, dy in _DIRECTIONS:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            va = "bottom" if dy > 0.5 else "top" if dy < -0.5 else "center"
            out.append((dx * r, dy * r, ha, va))
    return out


def place_labels(ax: Any, points: Sequence[tuple[float, float]], texts: Sequence[str], *,
                 colors: Sequence[Any] | None = None, fontsize: float = 8) -> list[Any]:
    """Annotate each point with its text so that no two labels overlap, nor a label another
    point (a greedy adjustText): each label takes the nearest offset, ring by ring around its
    point, where its box touches nothing placed before, preferring offsets inside the axes; a label
    moved off its first ring gets a thin line back to its point. Call it once the axes are
    laid out (after ``tight_layout``), as it measures in display pixels. Returns the annotations."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    ax.autoscale_view()
    frame = ax.bbox  # labels stay inside the axes, off the tick labels
    to_px = ax.transData.transform
    marker = 4.0  # half-size of a point's box, pixels
    occupied = [Bbox.from_extents(px - marker, py - marker, px + marker, py + marker)
                for px, py in (to_px(p) for p in points)]
    placed = []
    offsets = _offsets()
    for i, (point, text) in enumerate(zip(points, texts)):
        color = colors[i] if colors is not None else "black"
        boxes = []
        for dx, dy, ha, va in offsets:
            probe = ax.annotate(text, point, xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                                ha=ha, va=va)
            boxes.append(probe.get_window_extent(renderer))
            probe.remove()
        # The nearest box touching no point and no label so far, and the least outside the axes
        # (a long label on a point near the edge goes to the side with room); when every ring is
        # crowded, the nearest.
        free = [j for j, b in enumerate(boxes) if not any(b.overlaps(o) for o in occupied)]
        k = min(free, key=lambda j: (_outside(boxes[j], frame), j)) if free else 0
        box = boxes[k]
        dx, dy, ha, va = offsets[k]
        # Off the first ring: a thin line says which point it names.
        line = ({"arrowprops": {"arrowstyle": "-", "color": color, "linewidth": 0.6, "alpha": 0.7}}
                if k >= len(_DIRECTIONS) else {})
        ann = ax.annotate(text, point, xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                          ha=ha, va=va, color=color, **line)
        occupied.append(box)
        placed.append(ann)
    return placed


def _outside(box: Any, frame: Any) -> float:
    """Area of ``box`` outside ``frame`` (display pixels), rounded so near-equal ties keep ring order."""
    w = max(0.0, min(box.x1, frame.x1) - max(box.x0, frame.x0))
    h = max(0.0, min(box.y1, frame.y1) - max(box.y0, frame.y0))
    return round(box.width * box.height - w * h)


def wrap_label(name: str, width: int = 34) -> str:
    """A long model label on several lines, broken after its ``+`` (tick labels of a figure)."""
    lines, line = [], ""
    for part in name.replace("+", "+\x00").split("\x00"):
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    return "\n".join([*lines, line])


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (format by the suffix) atomically: a half-written file never
    takes the place of a good one."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or None  # the temporary name's suffix is not the format
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))
