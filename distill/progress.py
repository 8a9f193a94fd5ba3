"""Progress of a distillation run, for a person watching a terminal *and* for one reading a log later.

On a terminal the caller's rich bars move (``bastion.console.stage_bars``); when stderr is not a terminal (``make
demo > log``, CI) those bars are switched off, so this module writes plain lines instead: training lines like
``train student: epoch 3/10 batch 40/120 loss 1.23`` at most one every ``every_s`` seconds plus one at the end of
every epoch, so a log shows the run is alive without drowning in lines. A line when each stage starts is written
either way (on a terminal rich shows it above the bars).
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

Tick = Callable[[str, int], Callable[[], None]]  # stage_bars' protocol: (label, total) -> advance one step
PLAIN_EVERY_S = 2.0  # at most one plain progress line per bar this often (epoch ends and the last step always)


def _no_bar(label: str, total: int) -> Callable[[], None]:
    return lambda: None


class RunProgress:
    """Stage lines and progress bars of one run: rich bars through ``bars``, plain lines when ``plain``."""

    def __init__(
        self,
        bars: Tick | None = None,
        *,
        plain: bool | None = None,
        stream: TextIO | None = None,
        every_s: float = PLAIN_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bars = bars or _no_bar
        self.stream = stream
        self.plain = (not (stream or sys.stderr).isatty()) if plain is None else plain
        self.every_s = every_s
        self.clock = clock

    def line(self, text: str) -> None:
        """One plain line (only when plain: on a terminal the bars say it)."""
        if self.plain:
            self._write(text)

    def stage(self, number: int, total: int, name: str, what: str) -> None:
        """``distill [2/5] labels: labelling 120 images with 1 teacher(s)``, on a terminal too (above the bars:
        rich's live display passes stderr writes through)."""
        self._write(f"distill [{number}/{total}] {name}: {what}")

    def _write(self, text: str) -> None:
        out = self.stream or sys.stderr  # looked up now: rich's live display may have wrapped sys.stderr
        out.write(text + "\n")
        out.flush()

    def bar(self, label: str, total: int) -> Callable[[], None]:
        """A bar of ``total`` steps; the returned function advances it (plain: ``label: 40/128`` now and then)."""
        advance = self.bars(label, total)
        done = 0
        last = self.clock()

        def step() -> None:
            nonlocal done, last
            advance()
            done += 1
            now = self.clock()
            if done == total or now - last >= self.every_s:
                last = now
                self.line(f"{label}: {done}/{total}")

        return step

    def training(self, label: str) -> "TrainingProgress":
        return TrainingProgress(self, label)


class TrainingProgress:
    """Epochs and batches (or steps) of one training loop, fed by the loop itself or its callbacks."""

    def __init__(self, progress: RunProgress, label: str) -> None:
        self.progress = progress
        self.label = label
        self.epochs = 0
        self.batches = 0
        self.unit = "batch"
        self._advance: Callable[[], None] = lambda: None
        self._last = progress.clock()

    def start(self, epochs: int | None, batches: int, done: int = 0, unit: str = "batch") -> None:
        """``epochs`` × ``batches`` steps (``epochs`` None: one loop of ``batches`` ``unit``s, e.g. LM steps);
        ``done`` steps were finished before (a resumed run)."""
        self.epochs, self.batches, self.unit = epochs or 0, batches, unit
        total = (epochs or 1) * batches
        shape = f"{epochs} epochs × {batches} batches" if epochs else f"{batches} {unit}s"
        self._advance = self.progress.bars(f"{self.label} ({shape})", total)
        for _ in range(done):
            self._advance()
        self.progress.line(f"{self.label}: {shape}" + (f", resuming after {done}" if done else ""))

    def batch(self, epoch: int | None, batch: int, loss: float | None) -> None:
        """One batch done (1-based ``epoch`` and ``batch``); a plain line at most every ``every_s`` seconds."""
        self._advance()
        now = self.progress.clock()
        if now - self._last >= self.progress.every_s:
            self._last = now
            self.progress.line(self._where(epoch, batch) + _loss(loss))

    def note(self, text: str) -> None:
        """A line worth keeping whenever it comes (e.g. an evaluation point)."""
        self._last = self.progress.clock()
        self.progress.line(f"{self.label}: {text}")

    def epoch_end(self, epoch: int, loss: float | None) -> None:
        """Every epoch's end gets its line, however fast the epoch was."""
        self._last = self.progress.clock()
        self.progress.line(f"{self.label}: epoch {epoch}/{self.epochs} done" + _loss(loss))

    def _where(self, epoch: int | None, batch: int) -> str:
        if self.epochs:
            return f"{self.label}: epoch {epoch}/{self.epochs} {self.unit} {batch}/{self.batches}"
        return f"{self.label}: {self.unit} {batch}/{self.batches}"


def _loss(loss: float | None) -> str:
    return f" loss {loss:.3g}" if loss is not None and loss == loss else ""
