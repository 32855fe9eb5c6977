"""Batched image augmentation as tensor ops on the batch's own device."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(
    images: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True
) -> torch.Tensor:
    """Random crop of the original size from a zero-padded copy, then random horizontal flip.

    Per sample, the same distribution as torchvision's ``RandomCrop(size, padding=pad)``
    followed by ``RandomHorizontalFlip()`` (padding with zeros in the normalised space).
    """
    n, _, h, w = images.shape
    dev = images.device
    if pad > 0:
        padded = F.pad(images, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device)
        rows = (oy.to(dev)[:, None] + torch.arange(h, device=dev))[:, :, None]  # n,h,1
        cols = (ox.to(dev)[:, None] + torch.arange(w, device=dev))[:, None, :]  # n,1,w
        idx = torch.arange(n, device=dev)[:, None, None]
        images = padded.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(n, generator=generator, device=generator.device).to(dev) < 0.5
        images = torch.where(mask[:, None, None, None], images.flip(3), images)
    return images.contiguous()
