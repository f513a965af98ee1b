"""Fixtures shared by several test modules."""
import pytest
import timm
import torch

import tlvit.models  # noqa: F401  (registers deit_e)


@pytest.fixture(scope="module")
def deit():
    """deit_e at 32 px (a 4x4 grid of 8x8 patches, 3 blocks) with sharpened attention: near-uniform at
    init, attention would hide any alignment (TL-Align tests)."""
    torch.manual_seed(0)
    model = timm.create_model("deit_e", num_classes=10, img_size=32)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(40)
    return model.eval()
