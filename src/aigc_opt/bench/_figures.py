"""Shared figure plumbing for the reports: a pyplot-free Figure, labels placed apart, atomic saves.

Reports build a ``matplotlib.figure.Figure`` directly (no pyplot): nothing global changes, the
backend of a notebook is left alone, and no figure stays open after a save.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["new_figure", "place_labels", "save_figure"]

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
    point, where its box touches nothing placed before and stays inside the axes; a label
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
        free = [not any(b.overlaps(o) for o in occupied) for b in boxes]  # off points and labels so far
        inside = [frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes]
        # Free and inside the axes; else free anywhere; else (crowded past every ring) the nearest.
        k = next((j for j in range(len(boxes)) if free[j] and inside[j]),
                 next((j for j in range(len(boxes)) if free[j]), 0))
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


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (format by the suffix) atomically: a half-written file never
    takes the place of a good one."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
