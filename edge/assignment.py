"""Exact gated linear assignment for the tracker, in numpy: no scipy or ``lap`` on the field node.

ByteTrack matches tracks to detections with ``lap.lapjv(cost, extend_cost=True, cost_limit=thresh)``: the
minimum-cost matching in which any row or column may also stay unmatched, a pair being worth matching only
when its cost is below ``thresh``. This module solves exactly that problem without the dependency
(``scipy`` is not in requirements/core.txt; ``lap`` would be one more compiled wheel to lock for matrices
that are tiny here):

* a pair costing more than ``thresh`` is never in an optimal answer (leaving both unmatched costs
  ``thresh``), so it is dropped first;
* what is left splits into connected components of the bipartite "could match" graph. With objects
  apart from each other almost every component is one track and one detection, matched directly;
* each larger component is solved by the Hungarian algorithm (shortest augmenting paths with potentials,
  vectorised over columns) on lapjv's extended square matrix, where a dummy partner costs ``thresh / 2``.

So 20 well-separated objects cost a few dozen Python steps per frame, and a crowd still gets the exact
optimum — up to a component of ``MAX_EXACT`` tracks and detections together. Past that (a packed crowd where
every box overlaps its neighbours) the Hungarian's O(n³) would cost seconds a frame (300 × 300: 2.3 s here),
so such a component is matched greedily, cheapest pair first: not always optimal, always bounded.
"""

from __future__ import annotations

import numpy as np

_FORBIDDEN = 1e9  # a finite stand-in for "never": keeps the potentials free of inf - inf
MAX_EXACT = 80  # rows + columns of one component solved exactly (~10 ms); larger ones greedily


def gated_assignment(cost: np.ndarray, thresh: float) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Minimum-cost matching of rows to columns where only pairs with ``cost <= thresh`` may match.

    Returns ``(matches, unmatched_rows, unmatched_cols)``, matches as ``(row, col)`` sorted by row.
    """
    rows, cols = cost.shape
    if rows == 0 or cols == 0:
        return [], list(range(rows)), list(range(cols))
    feasible = cost <= thresh
    best = _uncontested(cost, feasible)
    if best is not None:
        return _result(best, rows, cols)
    matches: list[tuple[int, int]] = []
    for comp_rows, comp_cols in _components(feasible):
        if len(comp_rows) == 1 and len(comp_cols) == 1:
            matches.append((comp_rows[0], comp_cols[0]))
            continue
        sub = cost[np.ix_(comp_rows, comp_cols)]
        solve = _extended_hungarian if len(comp_rows) + len(comp_cols) <= MAX_EXACT else _greedy
        for r, c in solve(sub, feasible[np.ix_(comp_rows, comp_cols)], thresh):
            matches.append((comp_rows[r], comp_cols[c]))
    return _result(matches, rows, cols)


def _uncontested(cost: np.ndarray, feasible: np.ndarray) -> list[tuple[int, int]] | None:
    """The answer when every row that can match has a different cheapest column, else None.

    Matching (r, c) changes the total by ``cost - thresh`` (two dummies at ``thresh / 2`` are given up), so
    the sum over rows of ``min(0, cheapest - thresh)`` is a lower bound; rows whose cheapest columns are all
    different reach it, so that matching is optimal. It is the common case (objects apart from each other)
    and costs one argmin.
    """
    rows = np.flatnonzero(feasible.any(axis=1))
    cheapest = np.argmin(cost[rows], axis=1)
    if len(np.unique(cheapest)) != len(cheapest):
        return None
    return [(int(r), int(c)) for r, c in zip(rows, cheapest)]


def _result(matches: list[tuple[int, int]], rows: int, cols: int) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    matches.sort()
    matched_rows = {r for r, _ in matches}
    matched_cols = {c for _, c in matches}
    return (
        matches,
        [r for r in range(rows) if r not in matched_rows],
        [c for c in range(cols) if c not in matched_cols],
    )


def _components(feasible: np.ndarray) -> list[tuple[list[int], list[int]]]:
    """Connected components (rows, cols) of the bipartite graph whose edges are the feasible pairs."""
    rows, cols = feasible.shape
    parent = list(range(rows + cols))  # union-find: rows are 0..rows-1, columns rows..rows+cols-1

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for r, c in zip(*np.nonzero(feasible)):
        a, b = find(int(r)), find(rows + int(c))
        if a != b:
            parent[a] = b
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for r in np.flatnonzero(feasible.any(axis=1)):
        groups.setdefault(find(int(r)), ([], []))[0].append(int(r))
    for c in np.flatnonzero(feasible.any(axis=0)):
        groups.setdefault(find(rows + int(c)), ([], []))[1].append(int(c))
    return list(groups.values())


def _extended_hungarian(cost: np.ndarray, feasible: np.ndarray, thresh: float) -> list[tuple[int, int]]:
    """lapjv's ``extend_cost`` problem: rows and columns may pair with a dummy at ``thresh / 2`` each."""
    n, m = cost.shape
    size = n + m
    big = np.full((size, size), _FORBIDDEN)
    big[:n, :m] = np.where(feasible, cost, _FORBIDDEN)
    big[np.arange(n), m + np.arange(n)] = thresh / 2  # row i left unmatched
    big[n + np.arange(m), np.arange(m)] = thresh / 2  # column j left unmatched
    big[n:, m:] = 0.0  # dummy with dummy
    col_of_row = hungarian(big)
    return [(r, int(c)) for r, c in enumerate(col_of_row[:n]) if c < m and feasible[r, c]]


def _greedy(cost: np.ndarray, feasible: np.ndarray, thresh: float) -> list[tuple[int, int]]:
    """Feasible pairs cheapest first, each row and column used once (the bounded fallback for a crowd)."""
    rows, cols = np.nonzero(feasible)
    order = np.argsort(cost[rows, cols], kind="stable")
    used_rows, used_cols, pairs = set(), set(), []
    for r, c in zip(rows[order].tolist(), cols[order].tolist()):
        if r not in used_rows and c not in used_cols:
            used_rows.add(r)
            used_cols.add(c)
            pairs.append((r, c))
    return pairs


def hungarian(cost: np.ndarray) -> np.ndarray:
    """Exact minimum-cost perfect matching of a square matrix; returns the column assigned to each row.

    The O(n^3) shortest-augmenting-path algorithm with row/column potentials (Kuhn–Munkres as usually
    written for competitive programming), its inner loop over columns vectorised with numpy.
    """
    n = cost.shape[0]
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    row_of_col = np.zeros(n + 1, dtype=np.int64)  # 1-based; 0 = free
    way = np.zeros(n + 1, dtype=np.int64)
    padded = np.zeros((n + 1, n + 1))
    padded[1:, 1:] = cost
    for i in range(1, n + 1):
        row_of_col[0] = i
        j0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = row_of_col[j0]
            reduced = padded[i0] - u[i0] - v
            free = ~used
            better = free & (reduced < minv)
            minv[better] = reduced[better]
            way[better] = j0
            masked = np.where(free, minv, np.inf)
            masked[0] = np.inf
            j1 = int(np.argmin(masked))
            delta = masked[j1]
            u[row_of_col[used]] += delta
            v[used] -= delta
            minv[free] -= delta
            j0 = j1
            if row_of_col[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            row_of_col[j0] = row_of_col[j1]
            j0 = j1
    col_of_row = np.zeros(n, dtype=np.int64)
    for j in range(1, n + 1):
        col_of_row[row_of_col[j] - 1] = j - 1
    return col_of_row
