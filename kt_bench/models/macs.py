"""Counting a network's multiply-adds, for compute estimates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def count_macs(module: nn.Module, run: Callable[[], Any]) -> int:
    """Multiply-adds of ``module``'s Conv2d and Linear layers while ``run()`` runs (without
    gradients)."""
    total = 0

    def hook(layer: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            total += output.numel() * layer.in_channels // layer.groups * kh * kw
        else:
            total += output.numel() * layer.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return total


def forward_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-adds of convolutions and linear layers in one forward pass of one sample of
    ``shape`` (the model in eval mode)."""
    model.eval()
    return count_macs(model, lambda: model(torch.zeros(1, *shape)))
