"""EfficientNet-Lite0: MobileNetV2-style MBConv blocks with ReLU6 and no squeeze-excitation.

Module names follow the lukemelas/EfficientNet-PyTorch layout (`_conv_stem`, `_blocks.N.
_expand_conv`, `_fc`, ...), so the ImageNet checkpoint `efficientnet-lite0-57934424.pth`
loads with `strict=True`. Differences from that port, on purpose:
- no drop-connect (stochastic depth): a compiled training step should be deterministic;
- the stem and head are never width-scaled (Lite0 has width 1.0 anyway), and only Lite0 is
  built, so there is no block-string decoder.
"""
import torch.nn.functional as F
from torch import nn

from .mobilenetv2 import init_weights  # the same torchvision-style initialisation

# (repeats, kernel, first stride, expand ratio, input channels, output channels) per stage,
# from TensorFlow's efficientnet_lite_builder for Lite0 (width 1.0, depth 1.0, 224 px).
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                (1, 3, 1, 6, 192, 320)]

# TensorFlow's BN defaults the weights were trained with: eps 1e-3, decay 0.99 (= 0.01 in
# PyTorch's momentum convention).
BN_EPS, BN_MOMENTUM = 1e-3, 0.01


class SameConv2d(nn.Conv2d):
    """A bias-free conv with TensorFlow's "SAME" padding, which the weights were trained with.

    For stride 1 and an odd kernel, SAME is the usual symmetric (k-1)/2 and stays inside the
    conv. For stride 2 on an even input it pads one more row/column at the bottom/right than
    at the top/left; symmetric padding there shifts every feature map by half a pixel and
    moves ImageNet logits visibly, so those convs pad explicitly first.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        symmetric = (kernel - 1) // 2 if stride == 1 else 0
        super().__init__(cin, cout, kernel, stride, symmetric, groups=groups, bias=False)

    def forward(self, x):
        if self.stride[0] != 1:
            x = F.pad(x, same_padding(x.shape[-2:], self.kernel_size[0], self.stride[0]))
        return super().forward(x)


def same_padding(size, kernel: int, stride: int) -> list[int]:
    """F.pad's (left, right, top, bottom) so that the output is ceil(size / stride)."""
    pads = []
    for n in reversed(tuple(size)):  # F.pad lists the last dimension first
        total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return pads


def bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand, BN, ReLU6] -> kxk depthwise, BN, ReLU6 -> 1x1 project, BN."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.expands = expand != 1
        if self.expands:
            self._expand_conv = SameConv2d(cin, hidden, 1)
            self._bn0 = bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = bn(hidden)
        self._project_conv = SameConv2d(hidden, cout, 1)
        self._bn2 = bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expands else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    def __init__(self, num_classes: int = 10, stages=LITE0_STAGES, head_channels: int = 1280,
                 dropout: float = 0.2):
        super().__init__()
        stem = stages[0][4]
        self._conv_stem = SameConv2d(3, stem, 3, 2)
        self._bn0 = bn(stem)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in stages:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(stages[-1][5], head_channels, 1)
        self._bn1 = bn(head_channels)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head_channels, num_classes)
        init_weights(self)

    def features(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x):
        # mean over H, W is the global average pool, with a simpler graph than adaptive pooling.
        return self._fc(self._dropout(self.features(x).mean((2, 3))))


def efficientnet_lite0(num_classes: int = 10, dropout: float = 0.2) -> EfficientNetLite:
    return EfficientNetLite(num_classes, dropout=dropout)
