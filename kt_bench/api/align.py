"""Bringing a student's and a teacher's feature maps to a common spatial size."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Accepted values of every method's ``align`` option.
ALIGN_MODES = ("pool", "interpolate")


def align_spatial(
    f_s: torch.Tensor, f_t: torch.Tensor, mode: str = "pool"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (f_s, f_t) with equal H x W.

    ``pool``: the larger map is adaptive-average-pooled to the smaller one's size (what the
    public PyTorch ports of NST and AT do). ``interpolate``: the student's map is bilinearly
    resized to the teacher's size. Maps already of equal size are returned unchanged.
    """
    if mode not in ALIGN_MODES:
        raise ValueError(f"unknown align mode '{mode}'; accepted: {', '.join(ALIGN_MODES)}")
    hs, ws = f_s.shape[-2:]
    ht, wt = f_t.shape[-2:]
    if (hs, ws) == (ht, wt):
        return f_s, f_t
    if mode == "interpolate":
        return F.interpolate(f_s, size=(ht, wt), mode="bilinear", align_corners=False), f_t
    if hs * ws > ht * wt:
        return F.adaptive_avg_pool2d(f_s, (ht, wt)), f_t
    return f_s, F.adaptive_avg_pool2d(f_t, (hs, ws))
