"""Write tests/slow_tests.txt, the list `make test-fast` leaves out, from a measured run.

`make test-fast` must stay under two minutes on a 2-core machine while the suite grows, so which tests are "slow"
is a measurement, not a guess: run the whole suite with a JUnit report, then

    .venv/bin/python -m pytest -n 2 --junitxml=/tmp/junit.xml
    .venv/bin/python scripts/slow_tests.py /tmp/junit.xml --budget 150

keeps the fastest tests whose summed time fits the budget (seconds of one worker, split over the workers `make
test-fast` runs) and lists every other test. Tests the report does not know (new since the measurement) stay in
test-fast until the next measurement; tests marked `slow` or `wheel` in their files are left out either way.
"""

from __future__ import annotations

import argparse
import xml.etree.ElementTree as ET
from pathlib import Path

LIST = Path(__file__).resolve().parents[1] / "tests" / "slow_tests.txt"
HEADER = """\
# Left out of `make test-fast` (`make test` runs them all): the slowest tests of a measured run, written by
# scripts/slow_tests.py ({measured}). test-fast keeps the fastest tests whose time sums to {budget:.0f} s on one
# worker. Regenerate after the suite grows; a test not listed here runs in test-fast.
"""


def durations(junit: Path) -> dict[str, float]:
    """Node id -> seconds (call time plus fixtures) of every test that ran and was not skipped."""
    out: dict[str, float] = {}
    for case in ET.parse(junit).iter("testcase"):
        if case.find("skipped") is not None:
            continue
        module = case.get("classname", "").split(".")
        # classname is "tests.test_x" or "tests.test_x.TestClass"
        path = "/".join(module[:2]) + ".py"
        rest = module[2:]
        node = "::".join([path, *rest, case.get("name", "")])
        out[node] = out.get(node, 0.0) + float(case.get("time", 0.0))
    return out


def slow_set(times: dict[str, float], budget: float) -> list[str]:
    """Every test except the fastest ones that fit the budget, slowest first."""
    spent = 0.0
    fast: set[str] = set()
    for node, seconds in sorted(times.items(), key=lambda kv: kv[1]):
        if spent + seconds > budget:
            break
        spent += seconds
        fast.add(node)
    return sorted((n for n in times if n not in fast), key=lambda n: -times[n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit", type=Path, help="a JUnit XML report of a whole-suite run")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds of test time test-fast may spend")
    parser.add_argument("--measured", default="a whole-suite run", help="when and where, for the header")
    parser.add_argument("--out", type=Path, default=LIST)
    args = parser.parse_args()
    times = durations(args.junit)
    slow = slow_set(times, args.budget)
    lines = [f"{node}  # {times[node]:.1f} s" for node in slow]
    args.out.write_text(HEADER.format(measured=args.measured, budget=args.budget) + "\n".join(lines) + "\n")
    kept = sum(t for n, t in times.items() if n not in set(slow))
    print(f"{len(slow)} slow of {len(times)} tests; test-fast keeps {len(times) - len(slow)} ({kept:.0f} s)")


if __name__ == "__main__":
    main()
