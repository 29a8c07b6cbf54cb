"""train.normalize: the device-side uint8 -> float normalisation the LightningModule applies to every batch."""

from __future__ import annotations

import pytest
import torch

from train.nets.normalize import normalize_images

MEAN = torch.tensor([0.485, 0.456, 0.406]) * 255
STD = torch.tensor([0.229, 0.224, 0.225]) * 255


def _nhwc_batch(seed: int = 0) -> torch.Tensor:
    # What the loader delivers: NHWC memory seen as NCHW.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (4, 17, 13, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_normalisation_equals_the_broadcast_formula_in_the_requested_layout(memory_format):
    images = _nhwc_batch()
    out = normalize_images(images, MEAN, STD, memory_format)
    expected = (images.float() - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 17, 13)
    assert out.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_nchw_input_is_normalised_into_channels_last():
    images = _nhwc_batch(1).contiguous()
    out = normalize_images(images, MEAN, STD, torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    expected = (images.float() - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
