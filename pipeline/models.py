"""Models by name: ``mlp``, ``small_cnn``, ``resnet18_cifar``, ``torchvision:<name>``."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .config import ModelConfig

__all__ = ["MODELS", "build_model"]


def _mlp(input_shape: tuple[int, ...], num_classes: int, width: int) -> nn.Module:
    hidden = 8 * width
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _small_cnn(input_shape: tuple[int, ...], num_classes: int, width: int) -> nn.Module:
    """Three conv-BN-ReLU stages of width w, 2w, 4w, max-pool between, global pool, linear head."""
    if len(input_shape) != 3:
        raise ValueError(f"model.name = 'small_cnn': expected image input (C, H, W), found shape {input_shape}")
    c = input_shape[0]
    w = width
    return nn.Sequential(
        *_conv_bn(c, w),
        *_conv_bn(w, 2 * w), nn.MaxPool2d(2),
        *_conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
        *_conv_bn(4 * w, 4 * w),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(4 * w, num_classes),
    )


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stem, stride 1, no max-pool (as the TDDS/DyUn papers)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        layers, c_in = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            layers += [_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _resnet18_cifar(input_shape: tuple[int, ...], num_classes: int, width: int) -> nn.Module:
    # model.width is the small models' knob; ResNet-18 keeps its standard 64 channels.
    return ResNet18Cifar(input_shape[0], num_classes)


MODELS: dict[str, Callable[[tuple[int, ...], int, int], nn.Module]] = {
    "mlp": _mlp,
    "small_cnn": _small_cnn,
    "resnet18_cifar": _resnet18_cifar,
}


def build_model(cfg: ModelConfig, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A freshly initialised model (seed torch before calling for a reproducible init)."""
    if cfg.name.startswith("torchvision:"):
        import torchvision

        name = cfg.name.split(":", 1)[1]
        valid = torchvision.models.list_models()
        if name not in valid:
            raise ValueError(f"model.name = {cfg.name!r}: unknown torchvision model; valid: torchvision:<one of "
                             f"{', '.join(sorted(valid))}>")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if cfg.name not in MODELS:
        raise ValueError(f"model.name = {cfg.name!r}: unknown model; valid names: "
                         f"{', '.join(MODELS)}, torchvision:<name>")
    return MODELS[cfg.name](tuple(input_shape), num_classes, cfg.width)
