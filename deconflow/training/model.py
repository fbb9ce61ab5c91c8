"""ResNet-18 in its CIFAR form: 3x3 stem, no max-pool, four stages of two basic blocks.

``width_mult`` scales every layer (at least 8 channels) and ``norm="none"`` removes
every normalisation layer, which is how the ``narrow`` and ``bn_off`` variants differ.
"""

from __future__ import annotations

import torch
from torch import nn


def _width(c: int, mult: float) -> int:
    return max(8, int(round(c * mult)))


def _norm(norm: str, c: int) -> nn.Module:
    return nn.BatchNorm2d(c) if norm == "batch" else nn.Identity()


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=bias)
        self.bn1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=bias)
        self.bn2 = _norm(norm, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=bias), _norm(norm, c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if norm not in ("batch", "none"):
            raise ValueError(f"norm must be 'batch' or 'none', got {norm!r}")
        widths = [_width(c, width_mult) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=norm == "none"),
            _norm(norm, widths[0]),
            nn.ReLU(),
        )
        layers, c_in = [], widths[0]
        for i, c in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(c_in, c, stride, norm), BasicBlock(c, c, 1, norm)]
            c_in = c
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)
        if norm == "none":
            # Without normalisation, scale down each residual branch's last conv so the
            # signal does not explode with depth at initialisation.
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    m.conv2.weight.data.mul_(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def build_model(num_classes: int, in_channels: int, width_mult: float, norm: str) -> ResNet18:
    return ResNet18(num_classes, in_channels, width_mult, norm)
