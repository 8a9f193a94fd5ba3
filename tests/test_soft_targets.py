"""Soft teacher scores in the classification target: encoding through labels, and the real assigner scaled."""

import numpy as np
import pytest

from bastion.distill.soft_targets import attach_scores, decode, encode, read_scores, score_file


def test_scores_survive_the_class_value_and_truncate_to_the_class():
    cls = np.array([[0], [1], [3]], np.float32)
    enc = encode(cls, np.array([0.9, 0.31, 1.0]))
    assert [int(c) for c in enc.reshape(-1)] == [0, 1, 3]  # what Ultralytics' int()/long() sees
    back_cls, scores = decode(enc)
    assert np.array_equal(back_cls, cls) and np.allclose(scores.reshape(-1), [0.9, 0.31, 1.0], atol=1e-6)
    _, plain = decode(cls)  # ground truth: integer classes decode to certainty
    assert np.all(plain == 1.0)


def test_scores_are_matched_to_label_rows_by_box_not_order(tmp_path):
    labels = tmp_path / "labels" / "train"
    labels.mkdir(parents=True)
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.1 0.2 0.05 0.05\n")
    sfile = score_file(labels / "a.txt")
    sfile.parent.mkdir(parents=True)
    sfile.write_text("0.8\n0.4\n")
    assert read_scores(labels / "a.txt")[(1, 0.1, 0.2, 0.05, 0.05)] == 0.4
    ds_labels = [
        {
            "im_file": str(tmp_path / "images" / "train" / "a.jpg"),  # rows reordered, as dedup may
            "cls": np.array([[1], [0]], np.float32),
            "bboxes": np.array([[0.1, 0.2, 0.05, 0.05], [0.5, 0.5, 0.2, 0.4]], np.float32),
        },
        {
            "im_file": str(tmp_path / "images" / "train" / "gt.jpg"),  # ground truth: untouched
            "cls": np.array([[0]], np.float32),
            "bboxes": np.array([[0.5, 0.5, 0.1, 0.1]], np.float32),
        },
    ]
    soft, total = attach_scores(ds_labels, [str(labels / "a.txt"), str(labels / "gt.txt")])
    assert (soft, total) == (2, 3)
    _, scores = decode(ds_labels[0]["cls"])
    assert np.allclose(scores.reshape(-1), [0.4, 0.8], atol=1e-6)
    assert ds_labels[1]["cls"][0, 0] == 0.0
    sfile.write_text("0.8\n")  # out of step with the labels: ignored loudly, never misapplied
    assert read_scores(labels / "a.txt") == {}


def test_assigner_targets_scale_with_the_teacher_score():
    """Ultralytics' own TaskAlignedAssigner: a box scored 0.5 gets exactly half the hard target."""
    torch = pytest.importorskip("torch")
    from bastion.distill.ultra import load_ultralytics, ultralytics_available

    if not ultralytics_available():
        pytest.skip("the [distill] extra is not installed")
    load_ultralytics()
    from ultralytics.utils.tal import TaskAlignedAssigner, make_anchors

    from bastion.distill.soft_targets import SoftTargetAssigner

    torch.manual_seed(0)
    feats = [torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4)]
    anchors, strides = make_anchors(feats, torch.tensor([8.0, 16.0]), 0.5)
    pixels = anchors * strides
    pd_scores = torch.rand(2, len(anchors), 2)
    pd_boxes = torch.cat([pixels - 10, pixels + 10], 1).expand(2, -1, -1).clone()
    gt_boxes = torch.tensor(
        [[[4.0, 4.0, 30.0, 30.0], [34.0, 34.0, 60.0, 60.0]], [[10.0, 10.0, 50.0, 40.0], [0.0, 0.0, 0.0, 0.0]]]
    )
    mask = torch.tensor([[[1.0], [1.0]], [[1.0], [0.0]]])
    hard = torch.tensor([[[0.0], [1.0]], [[1.0], [0.0]]])
    soft = torch.from_numpy(encode(hard.reshape(-1, 1).numpy(), np.array([0.5, 1.0, 0.25, 1.0]))).reshape(2, 2, 1)
    base = TaskAlignedAssigner(topk=10, num_classes=2, alpha=0.5, beta=6.0)
    ref = base(pd_scores, pd_boxes, pixels, hard, gt_boxes, mask)
    out = SoftTargetAssigner(base)(pd_scores, pd_boxes, pixels, soft, gt_boxes, mask)
    fg, gt_idx = ref[3], ref[4]
    assert torch.equal(out[3], fg) and torch.equal(out[4], gt_idx)  # same anchors, same boxes
    expected = torch.tensor([[0.5, 1.0], [0.25, 1.0]]).gather(1, gt_idx) * fg
    assert fg.sum() > 0 and torch.allclose(out[2], ref[2] * expected.unsqueeze(-1))
    assert torch.allclose(out[2][0, (gt_idx[0] == 0) & fg[0]].sum(), 0.5 * ref[2][0, (gt_idx[0] == 0) & fg[0]].sum())
