"""An independent re-statement of RepDistiller's CC and VID losses, their modules and their place
in the one-batch training loss, for cross-checks of kt-bench's ``cc`` and ``vid`` cells.

Written from RepDistiller's code (R = HobbitLong/RepDistiller), not from kt-bench's plugins
(nothing here imports methods/cc.py or methods/vid.py). Facts and their R paths:

* CC, R:distiller_zoo/CC.py ``Correlation.forward(f_s, f_t)``: ``delta = |f_s − f_t|``, loss =
  ``mean((delta[:-1] * delta[1:]).sum(1))``: over the batch's B−1 consecutive pairs, the mean
  of the dot product of the two samples' absolute differences.
* CC's modules, R:models/util.py ``LinearEmbed(dim_in, dim_out)``: ``x.view(B, −1)`` then one
  ``nn.Linear(dim_in, dim_out)`` (with bias, no normalisation), attribute ``linear``.
  R:train_student.py (``--distill correlation``): ``embed_s = LinearEmbed(feat_s[-1].shape[1],
  opt.feat_dim)``, ``embed_t = LinearEmbed(feat_t[-1].shape[1], opt.feat_dim)``, ``--feat_dim``
  default 128; both appended to ``module_list`` (indices 1 and 2) and to ``trainable_list``
  (so the SGD optimiser trains both).
* VID, R:distiller_zoo/VID.py ``VIDLoss(num_input_channels, num_mid_channel,
  num_target_channels, init_pred_var=5.0, eps=1e-5)``: ``regressor`` = Sequential(1x1 conv
  in→mid, ReLU, 1x1 conv mid→mid, ReLU, 1x1 conv mid→target), every conv ``bias=False``, no
  padding, stride 1; ``log_scale`` = Parameter ``log(exp(init_pred_var − eps) − 1)`` (numpy,
  float64) times ``torch.ones(num_target_channels)``. ``forward(input, target)``: if the
  student's height s_H > t_H the input is ``adaptive_avg_pool2d``-ed to (t_H, t_H), if smaller
  the target to (s_H, s_H); ``pred_var = log(1 + exp(log_scale)) + eps`` viewed (1, C, 1, 1);
  loss = ``mean(0.5 * ((pred_mean − target)² / pred_var + log(pred_var)))``.
* VID's modules, R:train_student.py (``--distill vid``): ``VIDLoss(s, t, t)`` for the channel
  counts of each pair of ``feat_s[1:-1]``, ``feat_t[1:-1]`` (so mid = target = the teacher's
  channels), in an ``nn.ModuleList`` that is the criterion and is appended to
  ``trainable_list``.
* Composition, R:helper/loops.py ``train_distill``: module_list in train mode, the teacher in
  eval mode under ``no_grad`` with detached features; ``correlation``: ``f_s =
  module_list[1](feat_s[-1])``, ``f_t = module_list[2](feat_t[-1])`` (the teacher's embedding
  runs on the detached pooled feature, outside ``no_grad``, so it gets gradients), ``loss_kd =
  Correlation(f_s, f_t)``; ``vid``: ``loss_kd = sum(c(f_s, f_t) for f_s, f_t, c in
  zip(feat_s[1:-1], feat_t[1:-1], criterion_kd))``; ``loss = gamma·CE + alpha·DistillKL(T=4) +
  beta·loss_kd``.
* Flags, R:scripts/run_cifar_distill.sh: CC ``--distill correlation -a 0 -b 0.02``, VID
  ``--distill vid -a 0 -b 1``; R:train_student.py: ``-r/--gamma`` default 1, ``--kd_T`` 4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .repdistiller_ref import R_KD_T, r_kd, repdistiller_feats

#: (gamma, alpha, beta) of R's scripts/run_cifar_distill.sh, gamma the train_student.py default.
R_FLAGS_CC_VID: dict[str, tuple[float, float, float]] = {
    "cc": (1.0, 0.0, 0.02),
    "vid": (1.0, 0.0, 1.0),
}

#: R:train_student.py ``--feat_dim`` default.
R_FEAT_DIM = 128


def r_correlation(f_s: Tensor, f_t: Tensor) -> Tensor:
    """R's ``Correlation``: mean over consecutive pairs of Σ_d |f_s − f_t|_i · |f_s − f_t|_i+1."""
    delta = torch.abs(f_s - f_t)
    return torch.mean((delta[:-1] * delta[1:]).sum(1))


class RLinearEmbed(nn.Module):
    """R's ``LinearEmbed``: flatten, then one linear layer (attribute ``linear``)."""

    def __init__(self, dim_in: int, dim_out: int = R_FEAT_DIM) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        """(B, ...) -> (B, dim_out)."""
        return self.linear(x.view(x.shape[0], -1))


class RVIDLoss(nn.Module):
    """R's ``VIDLoss(num_input_channels, num_mid_channel, num_target_channels)``."""

    def __init__(self, c_in: int, c_mid: int, c_target: int, init_pred_var: float = 5.0,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(c_in, c_mid, kernel_size=1, padding=0, bias=False, stride=1),
            nn.ReLU(),
            nn.Conv2d(c_mid, c_mid, kernel_size=1, padding=0, bias=False, stride=1),
            nn.ReLU(),
            nn.Conv2d(c_mid, c_target, kernel_size=1, padding=0, bias=False, stride=1),
        )
        start = math.log(math.exp(init_pred_var - eps) - 1.0)  # float64, as numpy computes it
        self.log_scale = nn.Parameter(start * torch.ones(c_target))
        self.eps = eps

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        """Negative log-likelihood of ``target`` under N(regressor(x), softplus(log_scale)+eps)."""
        s_h, t_h = x.shape[2], target.shape[2]
        if s_h > t_h:
            x = F.adaptive_avg_pool2d(x, (t_h, t_h))
        elif s_h < t_h:
            target = F.adaptive_avg_pool2d(target, (s_h, s_h))
        pred_mean = self.regressor(x)
        pred_var = torch.log(1.0 + torch.exp(self.log_scale)) + self.eps
        pred_var = pred_var.view(1, -1, 1, 1)
        return torch.mean(0.5 * ((pred_mean - target) ** 2 / pred_var + torch.log(pred_var)))


def make_r_cc_modules(feat_s: Sequence[Tensor], feat_t: Sequence[Tensor]) -> nn.ModuleList:
    """R's ``[embed_s, embed_t]`` from the two feature lists (their last entries, pooled)."""
    return nn.ModuleList([RLinearEmbed(feat_s[-1].shape[1], R_FEAT_DIM),
                          RLinearEmbed(feat_t[-1].shape[1], R_FEAT_DIM)])


def make_r_vid_modules(feat_s: Sequence[Tensor], feat_t: Sequence[Tensor]) -> nn.ModuleList:
    """R's VID criterion: ``VIDLoss(s, t, t)`` per pair of ``feat[1:-1]`` channel counts."""
    s_n = [f.shape[1] for f in feat_s[1:-1]]
    t_n = [f.shape[1] for f in feat_t[1:-1]]
    return nn.ModuleList([RVIDLoss(s, t, t) for s, t in zip(s_n, t_n, strict=False)])


def repdistiller_cc_vid_loss(method: str, student: nn.Module, teacher: nn.Module, x: Tensor,
                             y: Tensor, modules: nn.ModuleList) -> Tensor:
    """R's training loss on ``(x, y)`` for ``method`` (``cc`` or ``vid``) with its trainable
    ``modules`` (see ``make_r_cc_modules``, ``make_r_vid_modules``).

    ``gamma·CE + alpha·KD(T=4) + beta·loss_kd`` with the flags of ``R_FLAGS_CC_VID``; the
    student and the modules in train mode, the teacher in eval mode under ``no_grad``; the
    previous modes are restored afterwards.
    """
    if method not in R_FLAGS_CC_VID:
        raise ValueError(f"unknown method {method!r}; known: {sorted(R_FLAGS_CC_VID)}")
    gamma, alpha, beta = R_FLAGS_CC_VID[method]
    modes = [(m, m.training) for m in (student, teacher, modules)]
    try:
        student.train()
        modules.train()
        feat_s, logit_s = repdistiller_feats(student, x)
        teacher.eval()
        with torch.no_grad():
            feat_t, logit_t = repdistiller_feats(teacher, x)
            feat_t = [f.detach() for f in feat_t]
            logit_t = logit_t.detach()
        loss = gamma * F.cross_entropy(logit_s, y) + alpha * r_kd(logit_s, logit_t, R_KD_T)
        if method == "cc":
            embed_s, embed_t = modules
            loss_kd = r_correlation(embed_s(feat_s[-1]), embed_t(feat_t[-1]))
        else:
            pairs = zip(feat_s[1:-1], feat_t[1:-1], modules, strict=False)
            loss_kd = sum(crit(f_s, f_t) for f_s, f_t, crit in pairs)
        return loss + beta * loss_kd
    finally:
        for module, was_training in modes:
            module.train(was_training)
