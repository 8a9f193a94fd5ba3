"""Report charts drawn with OpenCV: no plotting library, no fonts to fetch, same look everywhere.

Small and plain on purpose: a labelled scatter (speed vs accuracy, with the
Pareto frontier), grouped bars (AP per class), and line plots (training curves).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from bastion.runtime.outputs import save_image

W, H = 900, 520
MARGIN = (90, 40, 40, 70)  # left, top, right, bottom
INK, GRID, FONT = (40, 40, 40), (225, 225, 225), cv2.FONT_HERSHEY_SIMPLEX
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


def _canvas(title: str, xlabel: str, ylabel: str) -> np.ndarray:
    img = np.full((H, W, 3), 255, np.uint8)
    cv2.putText(img, title, (MARGIN[0], 26), FONT, 0.65, INK, 1, cv2.LINE_AA)
    cv2.putText(img, xlabel, (W // 2 - 60, H - 18), FONT, 0.5, INK, 1, cv2.LINE_AA)
    label = np.full((24, 300, 3), 255, np.uint8)
    cv2.putText(label, ylabel, (4, 17), FONT, 0.5, INK, 1, cv2.LINE_AA)
    rotated = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)
    y0 = H // 2 - 150
    img[y0 : y0 + 300, 8:32] = rotated
    return img


def _axes(
    img: np.ndarray,
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    xticks: int = 6,
    yticks: int = 6,
    xfmt: str = "{:.0f}",
    yfmt: str = "{:.2f}",
):
    l, t, r, b = MARGIN
    x0, x1, y0, y1 = l, W - r, H - b, t

    def px(x: float, y: float) -> tuple[int, int]:
        fx = (x - xlim[0]) / (xlim[1] - xlim[0] or 1)
        fy = (y - ylim[0]) / (ylim[1] - ylim[0] or 1)
        return int(x0 + fx * (x1 - x0)), int(y0 + fy * (y1 - y0))

    for v in np.linspace(*ylim, yticks):
        p = px(xlim[0], v)
        cv2.line(img, (x0, p[1]), (x1, p[1]), GRID, 1)
        cv2.putText(img, yfmt.format(v), (x0 - 60, p[1] + 5), FONT, 0.42, INK, 1, cv2.LINE_AA)
    for v in np.linspace(*xlim, xticks):
        p = px(v, ylim[0])
        cv2.line(img, (p[0], y0), (p[0], y1), GRID, 1)
        cv2.putText(img, xfmt.format(v), (p[0] - 14, y0 + 20), FONT, 0.42, INK, 1, cv2.LINE_AA)
    cv2.rectangle(img, (x0, y1), (x1, y0), INK, 1)
    return px


def scatter(points: list[dict], path: Path, title: str = "speed vs accuracy") -> Path:
    """``points``: {name, latency_ms, map50}; the Pareto frontier (faster and at least as accurate) is joined."""
    img = _canvas(title, "latency per image, ms (1 CPU thread)", "mAP50")
    xs = [p["latency_ms"] for p in points]
    ys = [p["map50"] for p in points]
    px = _axes(img, (0, max(xs) * 1.15 if xs else 1), (0, min(1.1, max(ys) * 1.15 + 0.05) if ys else 1))
    frontier = []
    for p in sorted(points, key=lambda p: (p["latency_ms"], -p["map50"])):
        if not frontier or p["map50"] > frontier[-1]["map50"]:
            frontier.append(p)
    for a, b in zip(frontier, frontier[1:]):
        cv2.line(img, px(a["latency_ms"], a["map50"]), px(b["latency_ms"], b["map50"]), (160, 160, 160), 1, cv2.LINE_AA)
    placed: list[tuple[int, int, int, int]] = []
    for i, p in enumerate(points):
        c = PALETTE[i % len(PALETTE)]
        x, y = px(p["latency_ms"], p["map50"])
        cv2.circle(img, (x, y), 7, c, -1, cv2.LINE_AA)
        (tw, th), _ = cv2.getTextSize(p["name"], FONT, 0.45, 1)
        for dy in (-8, 18, -26, 36, -44, 54):  # first label position that overlaps no earlier label
            box = (x + 10, y + dy - th, x + 10 + tw, y + dy + 2)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        cv2.putText(img, p["name"], (box[0], box[3] - 2), FONT, 0.45, c, 1, cv2.LINE_AA)
    save_image(path, img)
    return path


def bars(groups: list[str], series: dict[str, list[float]], path: Path, title: str, ylabel: str = "AP50") -> Path:
    """Grouped bars: one group per class, one bar per series (candidate)."""
    img = _canvas(title, "class", ylabel)
    px = _axes(img, (0, len(groups)), (0, 1.0), xticks=2, xfmt=" ")
    n = max(1, len(series))
    width = 0.8 / n
    for s, (name, values) in enumerate(series.items()):
        c = PALETTE[s % len(PALETTE)]
        for g, v in enumerate(values):
            left = g + 0.1 + s * width
            cv2.rectangle(img, px(left, 0), px(left + width * 0.9, max(v, 0)), c, -1)
        cv2.putText(
            img, name, (MARGIN[0] + 10 + 170 * (s % 4), MARGIN[1] + 18 + 18 * (s // 4)), FONT, 0.45, c, 1, cv2.LINE_AA
        )
    for g, group in enumerate(groups):
        x, y = px(g + 0.5, 0)
        cv2.putText(img, group, (x - 4 * len(group), y + 38), FONT, 0.5, INK, 1, cv2.LINE_AA)
    save_image(path, img)
    return path


def lines(xs: list[float], series: dict[str, list[float]], path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    img = _canvas(title, xlabel, ylabel)
    values = [v for vs in series.values() for v in vs if np.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(values), max(values)
    integer_x = all(float(x).is_integer() for x in xs) and len(xs) <= 12
    px = _axes(
        img,
        (min(xs), max(xs) if len(xs) > 1 else min(xs) + 1),
        (lo, hi if hi > lo else lo + 1),
        xticks=len(xs) if integer_x and len(xs) > 1 else 6,
        xfmt="{:g}",
    )
    for s, (name, vs) in enumerate(series.items()):
        c = PALETTE[s % len(PALETTE)]
        pts = np.array([px(x, v) for x, v in zip(xs, vs)], np.int32)
        if len(pts) > 1:
            cv2.polylines(img, [pts], False, c, 2, cv2.LINE_AA)
        for p in pts:
            cv2.circle(img, tuple(int(v) for v in p), 3, c, -1, cv2.LINE_AA)
        cv2.putText(
            img, name, (MARGIN[0] + 10 + 200 * (s % 3), MARGIN[1] + 18 + 18 * (s // 3)), FONT, 0.45, c, 1, cv2.LINE_AA
        )
    save_image(path, img)
    return path


def histogram(values: list[float], path: Path, title: str, unit: str, bins: int = 30) -> Path:
    """Counts per bin, with the p50 and p99 marked."""
    img = _canvas(title, unit, "events")
    v = np.asarray(values, dtype=np.float64)
    hi = float(np.percentile(v, 99.5)) * 1.1 if len(v) else 1.0
    counts, edges = np.histogram(np.clip(v, 0, hi), bins=bins, range=(0, hi))
    px = _axes(img, (0, hi), (0, max(1, int(counts.max()) if len(counts) else 1)), xfmt="{:.1f}", yfmt="{:.0f}")
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        if c:
            cv2.rectangle(img, px(a, 0), px(b, c), PALETTE[0], -1)
    for q, colour in ((50, PALETTE[2]), (99, PALETTE[3])):
        if len(v):
            x = float(np.percentile(v, q))
            top = px(x, max(1, int(counts.max())))
            cv2.line(img, px(x, 0), top, colour, 2, cv2.LINE_AA)
            cv2.putText(
                img,
                f"p{q} {x:.1f}",
                (top[0] + 4, top[1] + 16 + (20 if q == 99 else 0)),
                FONT,
                0.5,
                colour,
                1,
                cv2.LINE_AA,
            )
    save_image(path, img)
    return path
