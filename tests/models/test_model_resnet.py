import torch

from edgetune.models import build, resnet18


def test_resnet18_matches_torchvision_layout():
    model = resnet18(num_classes=1000)
    keys = list(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # torchvision's count
    assert len(keys) == 122
    assert {"conv1.weight", "bn1.running_var", "layer1.1.conv2.weight",
            "layer2.0.downsample.0.weight", "layer4.1.bn2.bias", "fc.weight"} <= set(keys)


def test_small_resnet_forward_and_names():
    model = build("resnet", num_classes=10).eval()
    names = [n for n, _ in model.named_parameters()]
    assert names[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert "layer1.0.conv1.weight" in names and "layer1.0.downsample.0.weight" not in names
    assert "layer2.0.downsample.1.bias" in names and names[-2:] == ["fc.weight", "fc.bias"]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_width_is_configurable():
    model = build("resnet", width=8)
    assert model.conv1.out_channels == 8 and model.fc.in_features == 64
