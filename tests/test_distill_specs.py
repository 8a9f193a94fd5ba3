"""The specs the distill CLIs map their flags onto refuse a bad value in one line naming the flag, before any work."""

from pathlib import Path

import pytest

from bastion.distill.spec import DistillSpec, LMDistillSpec, LMRunSpec, checked
from bastion.distill.train import TrainSpec
from bastion.errors import ConfigError

LM = dict(teacher=Path("t.bin"), tokenizer=Path("tok.json"), out=Path("run"), weights_license="MIT")
DETECT = dict(teachers=["yolov5n"], images=Path("imgs"), classes=["person"], out=Path("run"))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, "give --corpus FILE|DIR or --synthetic N"),
        ({"synthetic": 8, "corpus": Path("c.txt")}, "give --corpus FILE|DIR or --synthetic N"),
        ({"synthetic": 8, "gguf_type": "q4"}, "--gguf: Input should be 'f32', 'f16' or 'q8_0'"),
        ({"synthetic": 8, "layer_choice": "random"}, "--layer-choice: Input should be 'even' or 'importance'"),
        ({"synthetic": 8, "student_config": Path("s.yaml"), "depth": 2}, "--student-config replaces pruning"),
        ({"synthetic": 8, "ffn_ratio": 1.5}, "--ffn-ratio: Input should be less than or equal to 1"),
    ],
)
def test_lm_run_spec_refuses_in_one_line(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("|", r"\|")):
        checked(LMRunSpec, **LM, **fields)


def test_lm_specs_take_what_the_cli_gives():
    spec = checked(LMRunSpec, **LM, synthetic=8, train=checked(LMDistillSpec, steps=20, device="auto"))
    assert spec.train.steps == 20 and spec.gguf_type == "f16" and spec.model_dump(mode="json")["out"] == "run"
    with pytest.raises(ConfigError, match="--accumulate: Input should be greater than or equal to 1"):
        checked(LMDistillSpec, accumulate=0)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"force": {"labels", "nope"}}, "--force nope: unknown stage"),
        ({"val_images": Path("v")}, "--val-images and --val-labels go together"),
        ({"conf": {"*": 1.5}}, "--conf: thresholds are between 0 and 1"),
        ({"max_map50_drop": -1.0}, "--max-map50-drop: Input should be greater than or equal to 0"),
        ({"classes": []}, "--classes: List should have at least 1 item"),
        ({"max_latency_ms": 0.0}, "--max-latency: Input should be greater than 0"),
    ],
)
def test_distill_spec_refuses_in_one_line(fields, message):
    with pytest.raises(ConfigError, match=message):
        checked(DistillSpec, **{**DETECT, **fields})


def test_train_spec_bounds_and_copy():
    with pytest.raises(ConfigError, match="--epochs: Input should be greater than or equal to 1"):
        checked(TrainSpec, epochs=0)
    train = checked(TrainSpec, epochs=3)
    assert train.model_copy(update={"feature_teacher": Path("t.pt")}).feature_teacher == Path("t.pt")
    assert checked(DistillSpec, **DETECT, train=train).train.epochs == 3
