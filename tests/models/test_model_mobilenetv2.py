import torch

from edgetune.models import build
from edgetune.models.mobilenetv2 import make_divisible

# Spot keys from torchvision.models.mobilenet_v2().state_dict(): t=1 block (features.1) has
# no expansion conv, so its layout differs from the t=6 blocks.
TORCHVISION_KEYS = [
    "features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
    "features.2.conv.0.0.weight", "features.2.conv.1.0.weight", "features.2.conv.2.weight",
    "features.2.conv.3.running_mean", "features.18.0.weight", "classifier.1.weight",
]


def test_matches_torchvision_layout():
    model = build("mobilenetv2", num_classes=1000)
    keys = list(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    assert len(keys) == 314
    assert set(TORCHVISION_KEYS) <= set(keys)


def test_make_divisible_matches_torchvision():
    # Values torchvision's _make_divisible gives for width 0.35 and 1.0.
    assert [make_divisible(c * 0.35) for c in (32, 16, 24, 96, 320)] == [16, 8, 8, 32, 112]
    assert make_divisible(1280 * max(1.0, 0.35)) == 1280


def test_narrow_forward():
    model = build("mobilenetv2-0.35", num_classes=10).eval()
    assert model.features[0][0].out_channels == 16
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_residual_only_where_shapes_match():
    model = build("mobilenetv2-0.35")
    flags = [b.use_res_connect for b in model.features[1:-1]]
    # torchvision: the first block of every stage changes shape, the repeats add a shortcut.
    assert flags == [False, False, True, False, True, True, False, True, True, True,
                     False, True, True, False, True, True, False]
