"""Student architectures: structured pruning of a warm-started student (``--prune``)."""

import pytest


def test_pruned_student_keeps_warm_channels_and_is_cheaper():
    """--prune: the dependency graph cuts channels consistently (the model still runs, the head still outputs
    4 + nc rows), and every kept filter is one of the warm-started filters, unchanged."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torch_pruning")
    from bastion.distill.ultra import load_ultralytics, ultralytics_available

    if not ultralytics_available():
        pytest.skip("the [distill] extra is not installed")
    load_ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    from bastion.distill.train import prune_channels

    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=2, verbose=False)
    before = model.model[0].conv.weight.detach().clone()
    x = torch.rand(1, 3, 160, 160)
    model.eval()
    reference_shape = model(x)[0].shape
    report = prune_channels(model, 0.25, 160)
    assert report["parameters"][1] < 0.75 * report["parameters"][0] and report["macs"][1] < report["macs"][0]
    after = model.model[0].conv.weight.detach()
    assert after.shape[0] < before.shape[0]
    assert all(any(torch.equal(row, old) for old in before) for row in after)  # kept filters, not new ones
    model.eval()
    assert model(x)[0].shape == reference_shape  # (1, 4 + 2, anchors): the head's outputs are untouched
    with pytest.raises(Exception, match="--prune must be between 0 and 1"):
        prune_channels(model, 1.5, 160)
