"""What ships must not flip on timing noise (#17 item 2): candidates are timed best-of-N in rounds that take turns,
and latencies within LATENCY_TIE of the fastest are a tie that the more accurate candidate wins."""

import itertools

import numpy as np
import pytest

from bastion.distill.candidates import LATENCY_TIE, Candidate, choose, interleaved_rounds


def cand(name, map50, latency, size_mb=1.0, kind="sliced teacher (no training)"):
    return Candidate(name, kind, 320, map50, map50 / 2, {}, f"baselines/{name}", size_mb, latency_ms=latency)


def test_a_near_tie_in_latency_cannot_flip_the_choice():
    """The demo's case: sliced-int8@320 at 20.5 ms vs sliced@320 at 21.6 ms (noise decided it before). The more
    accurate one ships, whichever of the two the timing happened to favour."""
    teacher = cand("teacher@640", 0.80, 90.0, kind="teacher")
    for int8_ms, fp32_ms in ((20.5, 21.6), (21.6, 20.5), (20.0, 21.9)):
        pool = [teacher, cand("sliced-int8@320", 0.70, int8_ms, 2.0), cand("sliced@320", 0.74, fp32_ms, 8.0)]
        assert choose(pool, 0.0, None, 10.0).name == "sliced@320", (int8_ms, fp32_ms)
        # equal accuracy too: the smaller file, never the one timing noise favoured
        even = [teacher, cand("sliced-int8@320", 0.74, int8_ms, 2.0), cand("sliced@320", 0.74, fp32_ms, 8.0)]
        assert choose(even, 0.0, None, 10.0).name == "sliced-int8@320"
        assert choose(even, 0.0, None, None).name == "sliced-int8@320"


def test_a_real_difference_in_latency_still_decides():
    teacher = cand("teacher@640", 0.80, 90.0, kind="teacher")
    fast = 21.6 / (1 + LATENCY_TIE) * 0.9  # clearly beyond the tie
    pool = [teacher, cand("sliced-int8@320", 0.70, fast, 2.0), cand("sliced@320", 0.74, 21.6, 8.0)]
    assert choose(pool, 0.0, None, 10.0).name == "sliced-int8@320"  # the fastest within 10 points
    assert choose(pool, 0.0, None, None).name == "sliced@320"  # no drop allowed: the most accurate
    assert choose(pool, 0.0, None, 5.0) is None  # nothing distilled within 5 points of the teacher's 0.80


def test_rounds_take_turns_between_candidates_and_keep_every_round():
    calls = []
    ticks = itertools.count()

    def runner(name):
        return lambda image: calls.append(name)

    runners = {name: runner(name) for name in "ABC"}
    images = [np.zeros((2, 2, 3), np.uint8)] * 2
    times = interleaved_rounds(runners, images, rounds=3, clock=lambda: next(ticks) * 0.001)
    timed = calls[3:]  # after one warm-up call each
    assert calls[:3] == ["A", "B", "C"]
    assert timed == ["A", "A", "B", "B", "C", "C"] * 3  # A's images, B's, C's, then the next round
    assert {name: len(rounds) for name, rounds in times.items()} == {"A": 3, "B": 3, "C": 3}
    assert all(t == pytest.approx(1.0) for rounds in times.values() for t in rounds)  # one fake tick: 1 ms
