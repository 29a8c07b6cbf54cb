"""Agreement between runtimes of one network (train.nets.evaluate.measure): over all images, and over the images the
reference decides, which leaves out the near ties an int8 model's one-step rounding can flip."""

from __future__ import annotations

import pytest
import torch

from train.nets.evaluate import measure

STEP = 0.5  # the int8 output step of these logits
REFERENCE = torch.tensor([[2.0, 0.0, 0.0],   # decided: 4 steps ahead
                          [1.0, 0.5, 0.0],   # one step ahead: a near tie
                          [1.0, 1.0, 0.0],   # an exact tie (argmax: the first)
                          [0.0, 0.0, 1.5]])  # decided: 3 steps ahead


def batches() -> list[dict]:
    return [{"image": torch.zeros(4, 3, 2, 2, dtype=torch.uint8), "target": torch.tensor([0, 1, 0, 2]),
             "valid": torch.ones(4)}]


def test_agreement_on_decided_images_leaves_out_only_the_references_near_ties():
    # Each logit off by at most one step, as integer kernels round: the near ties flip, the decided images do not.
    rounded_off = REFERENCE + torch.tensor([[-STEP, STEP, 0], [-STEP, STEP, 0], [0, STEP, 0], [0, STEP, -STEP]])
    wrong = REFERENCE + torch.tensor([[-2.5, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]])  # flips a decided image
    models = {"ref": lambda x: REFERENCE, "rounded_off": lambda x: rounded_off, "wrong": lambda x: wrong}
    out = measure(models, "ref", batches(), mean=(0, 0, 0), std=(1, 1, 1), num_classes=3, decided_margin=1.5 * STEP)
    assert out["rounded_off"]["agree"] == 50.0 and out["rounded_off"]["agree_decided"] == 100.0
    assert out["wrong"]["agree"] == 75.0 and out["wrong"]["agree_decided"] == 50.0
    assert out["ref"]["decided"] == out["wrong"]["decided"] == 50.0
    plain = measure(models, "ref", batches(), mean=(0, 0, 0), std=(1, 1, 1), num_classes=3)
    assert "agree_decided" not in plain["wrong"] and plain["wrong"]["agree"] == 75.0


def test_with_no_decided_image_the_decided_agreement_is_not_a_number():
    out = measure({"ref": lambda x: REFERENCE}, "ref", batches(), mean=(0, 0, 0), std=(1, 1, 1), num_classes=3,
                  decided_margin=10.0)
    assert out["ref"]["decided"] == 0.0 and out["ref"]["agree_decided"] != out["ref"]["agree_decided"]
    assert out["ref"]["agree"] == pytest.approx(100.0)
