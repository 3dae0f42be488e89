"""ResNet with BasicBlocks and torchvision's names (conv1, bn1, layer1.0.conv1, ..., fc).

`resnet18()` has exactly torchvision's layout; `resnet10()` is the small default: one block
per stage, narrow, and a 3x3 stride-1 stem without max-pool for 32x32 inputs."""
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:  # the shortcut must match the new shape
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, layers=(1, 1, 1, 1), num_classes: int = 10, width: int = 16,
                 small_input: bool = True):
        super().__init__()
        # Small inputs (32x32) keep their resolution; ImageNet inputs use the 7x7/2 stem + pool.
        k, s = (3, 1) if small_input else (7, 2)
        self.conv1 = nn.Conv2d(3, width, k, s, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, n in enumerate(layers):
            cout = width * 2 ** i
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if i and j == 0 else 1)
                      for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def init_weights(model: nn.Module) -> None:
    """torchvision's initialisation (He-normal convs, unit BN); Linear keeps torch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet10(num_classes: int = 10, width: int = 16, small_input: bool = True):
    return ResNet((1, 1, 1, 1), num_classes, width, small_input)


def resnet18(num_classes: int = 1000, width: int = 64, small_input: bool = False):
    return ResNet((2, 2, 2, 2), num_classes, width, small_input)
