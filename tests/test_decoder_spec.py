"""``manifest.decoder`` is a discriminated union — YOLO output decoders vs the LM KV-cache spec — with typed, bounded
params and no unknown fields, while every manifest already on disk parses to the very bytes it was signed over."""

from __future__ import annotations

import json

import pytest

from bastion.errors import DecoderError, ManifestError
from bastion.models import Bundle, zoo_path
from bastion.models.decoder_spec import LlamaKvDecoderSpec, YoloDecoderSpec
from bastion.models.manifest import MAX_DET, Manifest, read_manifest
from bastion.runtime.decoders import get_decoder

ZOO = {"yolov5n": YoloDecoderSpec, "yolox_nano": YoloDecoderSpec, "stories260K": LlamaKvDecoderSpec}


def _canonical(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_manifests_parse_to_their_typed_spec_and_keep_their_signed_bytes(name):
    raw = json.loads((zoo_path(name) / "manifest.json").read_text())
    manifest = read_manifest(zoo_path(name) / "manifest.json")
    assert isinstance(manifest.decoder, ZOO[name])
    assert manifest.canonical_bytes() == _canonical(raw)  # the signature covers exactly these bytes
    assert Bundle.open(name).verification.signed  # and the zoo key's signature still verifies


def _lm_manifest(**params) -> dict:
    data = json.loads((zoo_path("stories260K") / "manifest.json").read_text())
    data["decoder"]["params"] = {**data["decoder"]["params"], **params}
    return data


def _detect_manifest(**decoder) -> dict:
    data = json.loads((zoo_path("yolov5n") / "manifest.json").read_text())
    data["decoder"] = {**data["decoder"], **decoder}
    return data


def _refused(tmp_path, data: dict, match: str) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=match) as exc:
        read_manifest(path)
    assert "\n" not in str(exc.value)  # one line


@pytest.mark.parametrize(
    "params, match",
    [
        ({"max_seq_len": 1 << 30}, r"decoder\.llama-kv\.params\.max_seq_len: Input should be less than or equal"),
        ({"n_kv_heads": 0}, r"params\.n_kv_heads: Input should be greater than or equal to 1"),
        ({"cache_slots": 4}, r"params\.cache_slots: Extra inputs are not permitted"),
        ({"generation": {"top_p": 0}}, r"generation\.top_p: Input should be greater than or equal"),
        ({"generation": {"max_new_tokens": 10**6}}, r"generation\.max_new_tokens"),
        ({"stop": list(range(100))}, r"params\.stop: List should have at most 64 items"),
    ],
)
def test_lm_params_are_typed_and_bounded(tmp_path, params, match):
    _refused(tmp_path, _lm_manifest(**params), match)


def test_a_missing_lm_field_an_unknown_type_and_yolo_params_are_refused(tmp_path):
    data = _lm_manifest()
    del data["decoder"]["params"]["n_layers"]
    _refused(tmp_path, data, r"params\.n_layers: Field required")
    _refused(tmp_path, _detect_manifest(type="ssd"), "does not match any of the expected tags")
    _refused(tmp_path, _detect_manifest(params={"anchors": 3}), r"decoder\.yolov5\.params\.anchors: Extra inputs")
    _refused(tmp_path, _detect_manifest(strides=[0]), r"strides\.0: Input should be greater than or equal to 1")


def test_the_decoder_must_fit_the_task(tmp_path):
    lm = json.loads((zoo_path("stories260K") / "manifest.json").read_text())
    data = _detect_manifest()
    data["decoder"] = lm["decoder"]
    _refused(tmp_path, data, "decoder: type 'llama-kv' does not read a task 'detect' model")
    lm["decoder"] = _detect_manifest()["decoder"]
    _refused(tmp_path, lm, "decoder: type 'yolov5' does not read a task 'lm' model")


def test_max_det_is_bounded(tmp_path):
    data = _detect_manifest()
    data["thresholds"]["max_det"] = 10**9  # NMS keeps up to this many boxes per image
    _refused(tmp_path, data, rf"thresholds\.max_det: Input should be less than or equal to {MAX_DET}")


def test_lm_params_dump_as_written():
    """Numbers keep their JSON type and optional fields stay absent: a bundle signed by another exporter (or before
    a field existed) keeps its canonical bytes."""
    data = _lm_manifest(rope_theta=500000, norm_eps=1e-6)
    for key in ("bos", "dim", "generation"):
        del data["decoder"]["params"][key]
    manifest = Manifest.model_validate(data)
    assert manifest.canonical_bytes() == _canonical(data)
    assert manifest.decoder.params.generation.temperature == 0.0  # the default still applies when read


def test_the_registry_dispatches_on_the_typed_spec():
    yolo = read_manifest(zoo_path("yolov5n") / "manifest.json").decoder
    assert get_decoder(yolo).__name__ == "decode_yolov5"
    with pytest.raises(DecoderError, match="'llama-kv' is a language model's KV-cache spec"):
        get_decoder(read_manifest(zoo_path("stories260K") / "manifest.json").decoder)
