"""Timing generators fairly on a shared machine: time-to-first-token, best of N, contestants taking turns.

Lives in the runtime (not in ``bastion bench``) because distillation's gates time their candidates the same way
and cards never import the top layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from bastion.runtime.lm import Generator


def timed_stream(start: Callable[[], Iterator[int]]) -> tuple[float, float, list[int]]:
    """(time to first token, total time, tokens) of one generation; ``start`` runs inside the clock."""
    t0 = time.perf_counter()
    stream = start()
    first = next(stream, None)
    ttft = time.perf_counter() - t0
    tokens = ([first] if first is not None else []) + list(stream)
    return ttft, time.perf_counter() - t0, tokens


def best_of(rounds: int, start: Callable[[], Iterator[int]]) -> tuple[float, float, list[int]]:
    """The fastest of ``rounds`` timed generations (TTFT from that same run)."""
    return min((timed_stream(start) for _ in range(rounds)), key=lambda r: r[1])


def interleaved_tokens_per_s(
    generators: dict[str, Generator], prompt: list[int], new_tokens: int = 128, rounds: int = 5
) -> dict[str, float]:
    """Greedy tokens/s of each generator (no early stop), best of ``rounds``, the generators taking turns within
    each round: a slow spell of a shared machine then hits every contestant, not whichever ran during it — the
    ratio of two models timed one after the other moved 1.51–1.61× between runs; taking turns keeps it steady."""
    for generator in generators.values():  # warm: first runs allocate ONNX Runtime's arenas
        list(generator.generate_ids(prompt, 8, stop=()))
    best = dict.fromkeys(generators, 0.0)
    for _ in range(rounds):
        for name, generator in generators.items():
            _, total, tokens = timed_stream(lambda g=generator: g.generate_ids(prompt, new_tokens, stop=()))
            best[name] = max(best[name], len(tokens) / total)
    return {name: round(value, 1) for name, value in best.items()}
