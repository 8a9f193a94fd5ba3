"""Report charts drawn with OpenCV: no plotting library, no fonts to fetch, same look everywhere.

Small and plain on purpose: a labelled scatter (speed vs accuracy, with the Pareto frontier), grouped bars (AP per
class), line plots (training curves) and a histogram (event latency). Every chart draws the numbers it is given —
it computes no statistic of its own — so a report that prints a number beside a chart shows the same number in
both. Ticks fall on round values (1, 2, 2.5 or 5 × 10^k) and every text is measured before it is placed, so
labels neither overlap each other nor leave the canvas.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from bastion.runtime.outputs import save_image

W, H = 900, 520
MARGIN = (90, 64, 40, 70)  # left, top (title + legend), right, bottom
INK, GRID, MUTED, FONT = (40, 40, 40), (225, 225, 225), (120, 120, 120), cv2.FONT_HERSHEY_SIMPLEX
TICK_SCALE, LABEL_SCALE = 0.42, 0.45
PALETTE = [
    (180, 119, 31),
    (14, 127, 255),
    (44, 160, 44),
    (40, 39, 214),
    (189, 103, 148),
    (75, 86, 140),
    (194, 119, 227),
    (127, 127, 127),
]  # BGR, matplotlib's tab10
NO_LABELS = "no labels"


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Evenly spaced round values covering [lo, hi]: a step of 1, 2, 2.5 or 5 × 10^k, about ``target`` ticks."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, target - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    count = math.ceil((hi - first) / step - 1e-9)
    return [round(first + i * step, 10) for i in range(count + 1)]


def tick_format(ticks: list[float]) -> str:
    """As many decimals as the step needs, the same for every tick (0, 0.25, 0.5 → 0.00, 0.25, 0.50)."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    decimals = 0
    while decimals < 6 and abs(round(step, decimals) - step) > 1e-9:
        decimals += 1
    return f"{{:.{decimals}f}}"


def _text(
    img, text: str, org: tuple[int, int], scale: float, colour, anchor: str = "left"
) -> tuple[int, int, int, int]:
    """Draw ``text`` with its baseline at org[1], anchored left/centre/right at org[0]; returns its box."""
    (tw, th), _ = cv2.getTextSize(text, FONT, scale, 1)
    x = org[0] - {"left": 0, "centre": tw // 2, "right": tw}[anchor]
    x = int(min(max(2, x), W - tw - 2))  # never off the canvas
    cv2.putText(img, text, (x, org[1]), FONT, scale, colour, 1, cv2.LINE_AA)
    return x, org[1] - th, x + tw, org[1] + 3


def _outside(box) -> bool:
    """Off the area a label may use: below the title, right of the y tick labels, above the x tick labels."""
    return not (MARGIN[0] < box[0] and box[2] < W - 4 and 34 < box[1] and box[3] < H - MARGIN[3])


def _covered(box, boxes) -> int:
    """Pixels of ``box`` that ``boxes`` already cover (summed; 0: a free place)."""
    return sum(
        max(0, min(box[2], b[2]) - max(box[0], b[0])) * max(0, min(box[3], b[3]) - max(box[1], b[1])) for b in boxes
    )


def _overlaps(box, boxes) -> bool:
    return any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes)


def _canvas(title: str, xlabel: str, ylabel: str) -> np.ndarray:
    img = np.full((H, W, 3), 255, np.uint8)
    _text(img, title, (MARGIN[0], 26), 0.65, INK)
    l, _, r, _ = MARGIN
    _text(img, xlabel, ((l + W - r) // 2, H - 14), 0.5, INK, "centre")
    (tw, _), _ = cv2.getTextSize(ylabel, FONT, 0.5, 1)
    label = np.full((24, tw + 8, 3), 255, np.uint8)
    cv2.putText(label, ylabel, (4, 17), FONT, 0.5, INK, 1, cv2.LINE_AA)
    rotated = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)
    y0 = max(0, (MARGIN[1] + H - MARGIN[3]) // 2 - rotated.shape[0] // 2)
    img[y0 : y0 + rotated.shape[0], 6:30] = rotated[: H - y0]
    return img


def _legend(img, names: list[str]) -> None:
    """One entry per series under the title, left to right, wrapping to a new row instead of overlapping."""
    x, y = MARGIN[0], 48
    for i, name in enumerate(names):
        (tw, _), _ = cv2.getTextSize(name, FONT, LABEL_SCALE, 1)
        if x + 16 + tw > W - MARGIN[2] and x > MARGIN[0]:
            x, y = MARGIN[0], y + 16
        c = PALETTE[i % len(PALETTE)]
        cv2.rectangle(img, (x, y - 9), (x + 10, y + 1), c, -1)
        cv2.putText(img, name, (x + 14, y), FONT, LABEL_SCALE, c, 1, cv2.LINE_AA)
        x += 14 + tw + 22


def _axes(img: np.ndarray, xticks: list[float] | None, yticks: list[float], xlim=None, integer_x: bool = False):
    """Grid, tick labels and frame; returns data → pixel. ``xticks`` None: a categorical x axis (no numbers)."""
    l, t, r, b = MARGIN
    x0, x1, y0, y1 = l, W - r, H - b, t
    xlim = xlim or ((xticks[0], xticks[-1]) if xticks else (0.0, 1.0))
    ylim = (yticks[0], yticks[-1])

    def px(x: float, y: float) -> tuple[int, int]:
        fx = (x - xlim[0]) / (xlim[1] - xlim[0] or 1)
        fy = (y - ylim[0]) / (ylim[1] - ylim[0] or 1)
        return int(round(x0 + fx * (x1 - x0))), int(round(y0 + fy * (y1 - y0)))

    yfmt = tick_format(yticks)
    for v in yticks:
        y = px(xlim[0], v)[1]
        cv2.line(img, (x0, y), (x1, y), GRID, 1)
        _text(img, yfmt.format(v), (x0 - 8, y + 5), TICK_SCALE, INK, "right")
    if xticks:
        xfmt = "{:.0f}" if integer_x else tick_format(xticks)
        placed: list[tuple[int, int, int, int]] = []
        for v in xticks:
            x = px(v, ylim[0])[0]
            cv2.line(img, (x, y0), (x, y1), GRID, 1)
            text = xfmt.format(v)
            (tw, th), _ = cv2.getTextSize(text, FONT, TICK_SCALE, 1)
            box = (x - tw // 2 - 3, y0 + 20 - th, x + tw // 2 + 3, y0 + 23)
            if not _overlaps(box, placed):  # a crowded axis drops a label rather than print two on top
                placed.append(_text(img, text, (x, y0 + 20), TICK_SCALE, INK, "centre"))
    cv2.rectangle(img, (x0, y1), (x1, y0), INK, 1)
    return px


def scatter(points: list[dict], path: Path, title: str = "speed vs accuracy") -> Path:
    """``points``: {name, latency_ms, map50}; the Pareto frontier (faster and at least as accurate) is joined."""
    img = _canvas(title, "latency per image, ms (1 CPU thread)", "mAP50")
    xs = [p["latency_ms"] for p in points] or [1.0]
    ys = [p["map50"] for p in points] or [1.0]
    xticks = nice_ticks(0, max(xs) * 1.15)
    yticks = nice_ticks(0, min(1.0, max(ys) * 1.1 + 0.02) if max(ys) > 0 else 1.0)
    px = _axes(img, xticks, yticks)
    frontier = []
    for p in sorted(points, key=lambda p: (p["latency_ms"], -p["map50"])):
        if not frontier or p["map50"] > frontier[-1]["map50"]:
            frontier.append(p)
    for a, b in zip(frontier, frontier[1:]):
        cv2.line(img, px(a["latency_ms"], a["map50"]), px(b["latency_ms"], b["map50"]), (160, 160, 160), 1, cv2.LINE_AA)
    dots = [px(p["latency_ms"], p["map50"]) for p in points]
    placed = [(x - 8, y - 8, x + 8, y + 8) for x, y in dots]  # labels avoid every dot, not only earlier labels
    l, t, r, b = MARGIN
    placed += [(l, t - 1, W - r, t + 1), (W - r - 1, t, W - r + 1, H - b)]  # and the frame's top and right edges
    for i, (p, (x, y)) in enumerate(zip(points, dots)):
        c = PALETTE[i % len(PALETTE)]
        cv2.circle(img, (x, y), 7, c, -1, cv2.LINE_AA)
        (tw, th), _ = cv2.getTextSize(p["name"], FONT, LABEL_SCALE, 1)
        options = [(10, 5), (10, -10), (10, 20), (-tw // 2, -12), (-tw // 2, 24), (-10 - tw, 5), (-10 - tw, -10)]
        options += [(-10 - tw, 20), (10, -25), (10, 35), (10, -40), (10, 50), (-10 - tw, 35), (-10 - tw, -25)]
        boxes = [(x + dx, y + dy - th, x + dx + tw, y + dy + 3) for dx, dy in options]
        # the first free place inside the canvas below the title (a dot on the top edge may label above it);
        # else the place that covers the least of what is already there
        box = min(boxes, key=lambda b: (_outside(b), _covered(b, placed), boxes.index(b)))
        placed.append(box)
        cv2.putText(img, p["name"], (box[0], box[3] - 3), FONT, LABEL_SCALE, c, 1, cv2.LINE_AA)
    save_image(path, img)
    return path


def bars(
    groups: list[str], series: dict[str, list[float | None]], path: Path, title: str, ylabel: str = "AP50"
) -> Path:
    """Grouped bars: one group per class, one bar per series (candidate), the value printed above each bar.

    A value of None or NaN means the class has no labels to score against: no bar is drawn (a 0.00 bar would
    claim a score), and the group says "no labels" instead."""
    img = _canvas(title, "class", ylabel)
    px = _axes(img, None, nice_ticks(0, 1.0, 6), xlim=(0, max(1, len(groups))))
    _legend(img, list(series))
    n = max(1, len(series))
    width = 0.8 / n
    for s, values in enumerate(series.values()):
        c = PALETTE[s % len(PALETTE)]
        for g, v in enumerate(values):
            if v is None or not math.isfinite(v):
                continue
            left = g + 0.1 + s * width
            (ax, ay), (bx, by) = px(left, 0), px(left + width * 0.9, max(v, 0))
            cv2.rectangle(img, (ax, ay), (bx, min(by, ay - 1)), c, -1)
            text = f"{v:.2f}"
            (tw, _), _ = cv2.getTextSize(text, FONT, 0.38, 1)
            if tw <= bx - ax + 6:  # only where it fits above its own bar
                _text(img, text, ((ax + bx) // 2, min(by, ay - 1) - 4), 0.38, INK, "centre")
    for g, group in enumerate(groups):
        x, y = px(g + 0.5, 0)
        _text(img, group, (x, y + 22), 0.5, INK, "centre")
        if all(g >= len(v) or v[g] is None or not math.isfinite(v[g]) for v in series.values()):
            _text(img, NO_LABELS, (x, (MARGIN[1] + y) // 2), 0.6, MUTED, "centre")
    save_image(path, img)
    return path


def lines(xs: list[float], series: dict[str, list[float]], path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    img = _canvas(title, xlabel, ylabel)
    values = [v for vs in series.values() for v in vs if np.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(values), max(values)
    yticks = nice_ticks(min(0.0, lo) if lo >= 0 and lo < 0.2 * hi else lo, hi if hi > lo else lo + 1)
    integer_x = all(float(x).is_integer() for x in xs)
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x_hi <= x_lo:
        x_hi = x_lo + 1
    xticks = nice_ticks(x_lo, x_hi, 8)
    if integer_x:
        xticks = [t for t in xticks if float(t).is_integer()] or [x_lo, x_hi]
    px = _axes(img, xticks, yticks, xlim=(min(xticks[0], x_lo), max(xticks[-1], x_hi)), integer_x=integer_x)
    _legend(img, list(series))
    for s, vs in enumerate(series.values()):
        c = PALETTE[s % len(PALETTE)]
        pts = np.array([px(x, v) for x, v in zip(xs, vs) if np.isfinite(v)], np.int32)
        if len(pts) > 1:
            cv2.polylines(img, [pts], False, c, 2, cv2.LINE_AA)
        for p in pts:
            cv2.circle(img, (int(p[0]), int(p[1])), 3, c, -1, cv2.LINE_AA)
    save_image(path, img)
    return path


def histogram(
    values: list[float], path: Path, title: str, unit: str, bins: int = 30, marks: dict[str, float | None] | None = None
) -> Path:
    """Counts per bin, with ``marks`` (e.g. {"p50": 12.3, "p99": 80.1}) drawn as labelled lines.

    The marks are the caller's numbers, not recomputed here: the report's text and this chart must agree."""
    img = _canvas(title, unit, "events")
    v = np.asarray(values, dtype=np.float64)
    marks = {k: m for k, m in (marks or {}).items() if m is not None and math.isfinite(m)}
    top = max([float(v.max()) if len(v) else 1.0] + list(marks.values()))
    xticks = nice_ticks(0, top * 1.02 if top > 0 else 1.0, 7)
    counts, edges = np.histogram(np.clip(v, 0, xticks[-1]), bins=bins, range=(0, xticks[-1]))
    yticks = nice_ticks(0, max(1, int(counts.max()) if len(counts) else 1), 6)
    yticks = [t for t in yticks if float(t).is_integer()] or [0, 1]
    if len(yticks) < 2:
        yticks = [0, 1]
    px = _axes(img, xticks, yticks)
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        if c:
            cv2.rectangle(img, px(a, 0), px(b, c), PALETTE[0], -1)
    placed: list[tuple[int, int, int, int]] = []
    for i, (name, x) in enumerate(sorted(marks.items(), key=lambda kv: kv[1])):
        colour = PALETTE[(2 + i) % len(PALETTE)]
        bottom, upper = px(x, 0), px(x, yticks[-1])
        cv2.line(img, bottom, upper, colour, 2, cv2.LINE_AA)
        text = f"{name} {x:.1f} {unit}"
        (tw, th), _ = cv2.getTextSize(text, FONT, 0.5, 1)
        right_side = upper[0] + 6 + tw < W - MARGIN[2]
        for row in range(6):
            y = upper[1] + 18 + 20 * row
            x0 = upper[0] + 6 if right_side else upper[0] - 6 - tw
            box = (x0 - 2, y - th - 2, x0 + tw + 2, y + 4)
            if not _overlaps(box, placed):
                break
        placed.append(box)
        cv2.putText(img, text, (box[0] + 2, box[3] - 4), FONT, 0.5, colour, 1, cv2.LINE_AA)
    save_image(path, img)
    return path
