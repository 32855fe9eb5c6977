"""Batched image augmentation as tensor ops on the batch's own device."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kt_bench.data.bundle import Augment


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


def crop_flip(image_size: int) -> Augment:
    """The random crop and flip of :func:`random_crop_flip` for ``image_size`` square images,
    padded by an eighth of the side (4 at 32, at least 1)."""
    return functools.partial(random_crop_flip, pad=max(1, round(image_size / 8)), flip=True)


def resized_crop_boxes(n: int, height: int, width: int, generator: torch.Generator,
                       scale: tuple[float, float] = (0.08, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3),
                       attempts: int = 10) -> torch.Tensor:
    """``n`` crop boxes (top, left, height, width; pixels, float) of a ``height`` x ``width``
    image, each drawn as torchvision's ``RandomResizedCrop.get_params`` draws one: an area
    fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``, the first of
    ``attempts`` tries that fits, else the centre crop of the nearest allowed aspect ratio;
    then a uniform position. The draws come from ``generator`` on its own device."""
    dev = generator.device
    area = height * width
    target = torch.empty(n, attempts, device=dev).uniform_(scale[0], scale[1],
                                                           generator=generator) * area
    log_ratio = torch.empty(n, attempts, device=dev).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(1, keepdim=True)  # the first fitting try (0 when none fits)
    found = fits.any(1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    # no try fits: the whole image, cut to the nearest aspect ratio allowed
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    top = (torch.rand(n, device=dev, generator=generator) * (height - h + 1)).floor()
    left = (torch.rand(n, device=dev, generator=generator) * (width - w + 1)).floor()
    top = torch.where(found, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fw) // 2))
    return torch.stack([top, left, h, w], 1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's box (top, left, height, width; pixels) resized to ``size`` x ``size`` by
    bilinear interpolation (as ``F.interpolate(..., mode="bilinear")``, without antialiasing).
    uint8 images give uint8 images (rounded), float ones float."""
    n, c, height, width = images.shape
    boxes = boxes.to(images.device, torch.float32)
    top, left, h, w = boxes.unbind(1)
    # the affine map from the output's [-1, 1] coordinates to the box's in the input's
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    x = images.float() if images.dtype == torch.uint8 else images
    out = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border",
                        align_corners=False)
    if images.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out


def random_resized_crop(images: torch.Tensor, generator: torch.Generator, size: int,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        flip: bool = True) -> torch.Tensor:
    """Per sample a random crop of random area and aspect ratio resized to ``size`` x
    ``size``, then (with ``flip``) a random horizontal flip: torchvision's
    ``RandomResizedCrop(size, scale, ratio)`` and ``RandomHorizontalFlip()``, batched on the
    images' device (bilinear, without antialiasing)."""
    n, _, height, width = images.shape
    boxes = resized_crop_boxes(n, height, width, generator, scale, ratio)
    out = crop_resize(images, boxes, size)
    if flip:
        mask = torch.rand(n, generator=generator, device=generator.device).to(out.device) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out.contiguous()
