import pytest
import torch

from edgetune.models import MODELS, build

EXPECTED = ["mobilenetv2", "mobilenetv2-0.35", "resnet", "vit", "llama"]


def example_input(name):
    if name == "llama":
        return torch.randint(0, 7, (2, 8))
    return torch.randn(2, 3, 32, 32)


def test_registry_names():
    assert set(EXPECTED) <= set(MODELS)


@pytest.mark.parametrize("name", EXPECTED)
def test_build_passes_num_classes(name):
    out = build(name, num_classes=7).eval()(example_input(name))
    assert out.shape[-1] == 7


@pytest.mark.parametrize("name", ["mobilenetv2-0.35", "resnet", "vit", "llama"])
def test_exports_with_torch_export(name):
    # The frontend starts from torch.export; every built-in model must get through it.
    model = build(name, num_classes=7).eval()
    x = example_input(name)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x))


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="mobilenetv2"):
        build("alexnet")
