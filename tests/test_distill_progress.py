"""Training progress a person can see (#17 item 3): plain lines when stderr is not a terminal (a log), at a bounded
rate plus one per epoch end; Ultralytics' trainer callbacks feed them."""

import io
from types import SimpleNamespace

from bastion.distill.progress import RunProgress


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_log_gets_epoch_lines_and_batch_lines_at_a_bounded_rate():
    log, clock = io.StringIO(), FakeClock()  # StringIO is not a terminal: plain lines
    progress = RunProgress(stream=log, clock=clock)
    assert progress.plain
    training = progress.training("train student")
    training.start(epochs=3, batches=40)
    for epoch in (1, 2, 3):
        for batch in range(1, 41):
            clock.now += 0.25  # 40 batches: 10 s an epoch
            training.batch(epoch, batch, 1.234)
        training.epoch_end(epoch, 1.2)
    lines = log.getvalue().splitlines()
    assert lines[0] == "train student: 3 epochs × 40 batches"
    assert [line for line in lines if "done" in line] == [
        f"train student: epoch {e}/3 done loss 1.2" for e in (1, 2, 3)
    ]
    batch_lines = [line for line in lines if " batch " in line]
    assert "train student: epoch 1/3 batch 8/40 loss 1.23" in batch_lines  # 2 s after the start
    assert 3 * 4 <= len(batch_lines) <= 3 * 5  # 30 s of training: about one line per 2 s, not one per batch


def test_a_terminal_gets_the_bars_and_no_plain_lines():
    log, ticks = io.StringIO(), []
    progress = RunProgress(lambda label, total: lambda: ticks.append(label), plain=False, stream=log)
    training = progress.training("train student")
    training.start(epochs=2, batches=3)
    for epoch in (1, 2):
        for batch in (1, 2, 3):
            training.batch(epoch, batch, 0.5)
        training.epoch_end(epoch, 0.5)
    assert log.getvalue() == "" and ticks == ["train student (2 epochs × 3 batches)"] * 6
    progress.stage(1, 5, "teachers", "opening 1 teacher")  # a stage line is worth a line on a terminal too
    assert log.getvalue() == "distill [1/5] teachers: opening 1 teacher\n"


def test_ultralytics_callbacks_feed_the_progress():
    """The callbacks train_student registers on the YOLO model, driven the way Ultralytics' trainer calls them."""
    from bastion.distill.train import progress_callbacks

    log, clock = io.StringIO(), FakeClock()
    callbacks = progress_callbacks(RunProgress(stream=log, clock=clock).training("train student"))
    trainer = SimpleNamespace(epochs=2, start_epoch=0, train_loader=[None] * 5, epoch=0, tloss=None)
    callbacks["on_train_start"](trainer)
    for epoch in (0, 1):
        trainer.epoch = epoch
        callbacks["on_train_epoch_start"](trainer)
        for _ in range(5):
            clock.now += 1.0
            trainer.tloss = {"box": 0.5, "cls": 0.25, "dfl": 0.25}
            callbacks["on_train_batch_end"](trainer)
        callbacks["on_train_epoch_end"](trainer)
    text = log.getvalue()
    assert "train student: 2 epochs × 5 batches" in text
    assert "train student: epoch 2/2 batch 4/5 loss 1" in text and "train student: epoch 2/2 done loss 1" in text


def test_stage_lines_and_bars_in_a_log():
    log, clock = io.StringIO(), FakeClock()
    progress = RunProgress(stream=log, clock=clock)
    progress.stage(2, 5, "labels", "labelling 3 images with 1 teacher(s)")
    step = progress.bar("pseudo-labels", 3)
    for _ in range(3):
        step()
    assert log.getvalue().splitlines() == [
        "distill [2/5] labels: labelling 3 images with 1 teacher(s)",
        "pseudo-labels: 3/3",
    ]
