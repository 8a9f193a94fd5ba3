"""Plane geometry for zones and lines, in normalised image coordinates (x right, y down, both 0–1)."""

from __future__ import annotations

import numpy as np

Point = tuple[float, float]


def cross(a: Point, b: Point, p: Point) -> float:
    """Which side of the directed line a→b the point p is on: > 0 on its right as drawn on the image
    (y grows downwards), < 0 on its left, 0 on it."""
    return (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])


def segments_cross(p1: Point, p2: Point, q1: Point, q2: Point) -> bool:
    """True when segment p1–p2 and segment q1–q2 cross or touch (collinear overlap included)."""
    d1, d2 = cross(q1, q2, p1), cross(q1, q2, p2)
    d3, d4 = cross(p1, p2, q1), cross(p1, p2, q2)
    if ((d1 > 0 > d2) or (d1 < 0 < d2)) and ((d3 > 0 > d4) or (d3 < 0 < d4)):
        return True

    def on(a: Point, b: Point, p: Point, d: float) -> bool:
        return d == 0 and min(a[0], b[0]) <= p[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= p[1] <= max(a[1], b[1])

    return on(q1, q2, p1, d1) or on(q1, q2, p2, d2) or on(p1, p2, q1, d3) or on(p1, p2, q2, d4)


def polygon_problem(points: list[Point]) -> str | None:
    """Why ``points`` is not a usable zone (a corner twice in a row, self-intersecting, no area), or None.

    A repeated corner is named as such: tools that write closed rings (GeoJSON) repeat the first corner at the
    end, and "edge 1 crosses edge 3" would send the operator looking for a crossing that is not there."""
    n = len(points)
    for i in range(n):
        if tuple(points[i]) == tuple(points[(i + 1) % n]):
            if (i + 1) % n == 0:
                return f"point {n} repeats point 1 (a zone closes by itself: leave the last point out)"
            return f"point {i + 2} repeats point {i + 1}"
    for i in range(n):
        for j in range(i + 1, n):
            if j == i + 1 or (i == 0 and j == n - 1):
                continue  # neighbouring edges share a point
            if segments_cross(points[i], points[(i + 1) % n], points[j], points[(j + 1) % n]):
                return f"the polygon intersects itself (edge {i + 1} crosses edge {j + 1})"
    area2 = sum(points[i][0] * points[(i + 1) % n][1] - points[(i + 1) % n][0] * points[i][1] for i in range(n))
    if abs(area2) < 1e-9:
        return "the polygon has no area (its points lie on one line)"
    return None


def inside_polygon(points: np.ndarray, polygon: np.ndarray, following: np.ndarray | None = None) -> np.ndarray:
    """[N] bool: which of ``points`` [N, 2] lie inside ``polygon`` [K, 2] (even–odd ray casting).

    ``following``: the polygon's corners shifted by one (``np.roll(polygon, -1, 0)``), when kept by the caller.
    """
    x, y = points[:, 0:1], points[:, 1:2]
    x1, y1 = polygon[:, 0], polygon[:, 1]
    following = np.roll(polygon, -1, axis=0) if following is None else following
    x2, y2 = following[:, 0], following[:, 1]
    straddles = (y1 > y) != (y2 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
    return np.count_nonzero(straddles & (x < x_at), axis=1) % 2 == 1
