"""An independent re-statement of RepDistiller's CRD: its criterion, memory, embeddings, negative
sampling and place in the one-batch training loss, for cross-checks of kt-bench's ``crd``.

Written from RepDistiller's code (R = HobbitLong/RepDistiller), not from kt-bench's plugin
(nothing here imports methods/crd.py). Facts and their R paths:

* R:crd/criterion.py ``CRDLoss(opt)``: ``embed_s = Embed(opt.s_dim, opt.feat_dim)``, ``embed_t =
  Embed(opt.t_dim, opt.feat_dim)``, ``contrast = ContrastMemory(opt.feat_dim, opt.n_data,
  opt.nce_k, opt.nce_t, opt.nce_m)``, ``criterion_s``/``criterion_t = ContrastLoss(n_data)``,
  built in that order. ``forward(f_s, f_t, idx, contrast_idx)``: embed both, ``out_s, out_t =
  contrast(f_s, f_t, idx, contrast_idx)``, loss = ``criterion_s(out_s) + criterion_t(out_t)``.
* ``Embed(dim_in, dim_out)``: ``x.view(B, −1)``, ``nn.Linear(dim_in, dim_out)`` (attribute
  ``linear``), then ``Normalize(2)``: ``x / x.pow(2).sum(1, keepdim=True).pow(1/2)``.
* ``ContrastLoss(n_data).forward(x)``: m = K = columns − 1, Pn = 1/n_data; ``log_D1 =
  log(P_pos / (P_pos + m·Pn + eps))`` on column 0, ``log_D0 = log(m·Pn / (P_neg + m·Pn +
  eps))`` on the others, eps = 1e-7; loss = ``−(Σ log_D1 + Σ log_D0) / bsz``.
* R:crd/memory.py ``ContrastMemory(inputSize, outputSize, K, T=0.07, momentum=0.5)``: buffer
  ``params = [K, T, −1, −1, momentum]`` (float32: Z_v1, Z_v2 unset), ``stdv = 1/sqrt(inputSize/3)``,
  buffers ``memory_v1``, ``memory_v2`` = ``rand(outputSize, inputSize)·2·stdv − stdv``.
  ``forward(v1, v2, y, idx)``: ``weight_v1 = memory_v1[idx]`` (detached), ``out_v2 =
  exp(bmm(weight_v1, v2)/T)``; ``weight_v2 = memory_v2[idx]``, ``out_v1 = exp(bmm(weight_v2,
  v1)/T)``; if Z_v1 < 0 it becomes ``out_v1.mean() · outputSize`` (likewise Z_v2 from out_v2),
  stored in ``params`` and read back as a Python float; ``out_v1 /= Z_v1``, ``out_v2 /= Z_v2``;
  then, without gradients, ``memory_v1[y] ← normalise(memory_v1[y]·momentum + v1·(1 −
  momentum))`` and ``memory_v2[y]`` likewise with v2 (``index_copy_``); returns ``(out_v1,
  out_v2)``. In CRDLoss v1 is the student's embedding, v2 the teacher's.
* R:dataset/cifar100.py ``CIFAR100InstanceSample(k=4096, mode='exact')``: ``cls_positive[c]``
  = indices of class c; ``cls_negative[c]`` = indices of every other class. Per sample:
  ``pos_idx = index`` (exact) or ``np.random.choice(cls_positive[target], 1)[0]`` (relax);
  ``replace = k > len(cls_negative[target])``; ``neg_idx = np.random.choice(
  cls_negative[target], k, replace=replace)``; ``sample_idx = [pos_idx, *neg_idx]``; the loader
  returns ``(img, target, index, sample_idx)``.
* R:train_student.py: ``--feat_dim 128 --mode exact --nce_k 16384 --nce_t 0.07 --nce_m 0.5``;
  for ``crd``: ``opt.s_dim = feat_s[-1].shape[1]``, ``opt.t_dim = feat_t[-1].shape[1]``,
  ``opt.n_data = len(train_set)``, ``criterion_kd = CRDLoss(opt)``, both embeddings in
  ``trainable_list``. R:helper/loops.py ``train_distill``, ``crd``: ``loss_kd =
  criterion_kd(feat_s[-1], feat_t[-1], index, contrast_idx)``; ``loss = gamma·CE +
  alpha·DistillKL(T=4) + beta·loss_kd``.
* Flags, R:scripts/run_cifar_distill.sh: CRD ``-a 0 -b 0.8``; CRD+KD ``-a 1 -b 0.8``; ``-r``
  (gamma) defaults to 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .repdistiller_ref import R_KD_T, r_kd, repdistiller_feats

#: (gamma, alpha, beta) of R:scripts/run_cifar_distill.sh; gamma the train_student.py default.
R_FLAGS_CRD: dict[str, tuple[float, float, float]] = {
    "crd": (1.0, 0.0, 0.8),
    "crd+kd": (1.0, 1.0, 0.8),
}

#: R:train_student.py defaults.
R_FEAT_DIM, R_NCE_K, R_NCE_T, R_NCE_M, R_MODE = 128, 16384, 0.07, 0.5, "exact"
R_EPS = 1e-7


class RNormalize(nn.Module):
    """R's ``Normalize(power=2)``."""

    def forward(self, x: Tensor) -> Tensor:
        """Each row over its L2 norm."""
        norm = x.pow(2).sum(1, keepdim=True).pow(1.0 / 2)
        return x.div(norm)


class REmbed(nn.Module):
    """R's CRD ``Embed(dim_in, dim_out)``: flatten, linear, normalise."""

    def __init__(self, dim_in: int, dim_out: int = R_FEAT_DIM) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.l2norm = RNormalize()

    def forward(self, x: Tensor) -> Tensor:
        """(B, ...) -> (B, dim_out) unit rows."""
        return self.l2norm(self.linear(x.view(x.shape[0], -1)))


class RContrastLoss(nn.Module):
    """R's ``ContrastLoss(n_data)``."""

    def __init__(self, n_data: int) -> None:
        super().__init__()
        self.n_data = n_data

    def forward(self, x: Tensor) -> Tensor:
        """NCE loss of scores (B, K+1), positive first."""
        bsz, m = x.shape[0], x.size(1) - 1
        pn = 1 / float(self.n_data)
        p_pos = x.select(1, 0)
        log_d1 = torch.div(p_pos, p_pos.add(m * pn + R_EPS)).log_()
        p_neg = x.narrow(1, 1, m)
        log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + R_EPS)).log_()
        return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz


class RContrastMemory(nn.Module):
    """R's ``ContrastMemory(inputSize, outputSize, K, T, momentum)`` (given indices only)."""

    def __init__(self, input_size: int, output_size: int, k: int, t: float = R_NCE_T,
                 momentum: float = R_NCE_M) -> None:
        super().__init__()
        self.register_buffer("params", torch.tensor([k, t, -1, -1, momentum]))
        stdv = 1.0 / math.sqrt(input_size / 3)
        self.register_buffer("memory_v1", torch.rand(output_size, input_size).mul_(2 * stdv)
                             .add_(-stdv))
        self.register_buffer("memory_v2", torch.rand(output_size, input_size).mul_(2 * stdv)
                             .add_(-stdv))

    def forward(self, v1: Tensor, v2: Tensor, y: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(out_v1, out_v2): v1 scored against memory_v2, v2 against memory_v1; then the
        banks' rows ``y`` are updated."""
        k, t = int(self.params[0].item()), self.params[1].item()
        z_v1, z_v2, momentum = (self.params[2].item(), self.params[3].item(),
                                self.params[4].item())
        bsz, n, d = v1.size(0), self.memory_v1.size(0), self.memory_v1.size(1)
        w1 = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach().view(bsz, k + 1, d)
        out_v2 = torch.exp(torch.div(torch.bmm(w1, v2.view(bsz, d, 1)), t))
        w2 = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach().view(bsz, k + 1, d)
        out_v1 = torch.exp(torch.div(torch.bmm(w2, v1.view(bsz, d, 1)), t))
        if z_v1 < 0:
            self.params[2] = out_v1.mean().detach() * n
            z_v1 = self.params[2].clone().item()
        if z_v2 < 0:
            self.params[3] = out_v2.mean().detach() * n
            z_v2 = self.params[3].clone().item()
        out_v1 = torch.div(out_v1, z_v1).contiguous()
        out_v2 = torch.div(out_v2, z_v2).contiguous()
        with torch.no_grad():
            for bank, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
                pos = torch.index_select(bank, 0, y.view(-1))
                pos.mul_(momentum)
                pos.add_(torch.mul(v, 1 - momentum))
                norm = pos.pow(2).sum(1, keepdim=True).pow(0.5)
                bank.index_copy_(0, y, pos.div(norm))
        return out_v1, out_v2


class RCRDLoss(nn.Module):
    """R's ``CRDLoss(opt)`` with opt's fields as arguments."""

    def __init__(self, s_dim: int, t_dim: int, n_data: int, feat_dim: int = R_FEAT_DIM,
                 nce_k: int = R_NCE_K, nce_t: float = R_NCE_T, nce_m: float = R_NCE_M) -> None:
        super().__init__()
        self.embed_s = REmbed(s_dim, feat_dim)
        self.embed_t = REmbed(t_dim, feat_dim)
        self.contrast = RContrastMemory(feat_dim, n_data, nce_k, nce_t, nce_m)
        self.criterion_t = RContrastLoss(n_data)
        self.criterion_s = RContrastLoss(n_data)

    def forward(self, f_s: Tensor, f_t: Tensor, idx: Tensor, contrast_idx: Tensor) -> Tensor:
        """s_loss + t_loss."""
        f_s, f_t = self.embed_s(f_s), self.embed_t(f_t)
        out_s, out_t = self.contrast(f_s, f_t, idx, contrast_idx)
        return self.criterion_s(out_s) + self.criterion_t(out_t)


def r_class_lists(labels: Tensor, num_classes: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """R's ``cls_positive`` and ``cls_negative`` (index arrays per class)."""
    label = labels.tolist()
    cls_positive: list[list[int]] = [[] for _ in range(num_classes)]
    for i, c in enumerate(label):
        cls_positive[c].append(i)
    cls_negative: list[list[int]] = [[] for _ in range(num_classes)]
    for i in range(num_classes):
        for j in range(num_classes):
            if j != i:
                cls_negative[i].extend(cls_positive[j])
    return ([np.asarray(p) for p in cls_positive], [np.asarray(n) for n in cls_negative])


def r_sample_idx(labels: Tensor, num_classes: int, index: int, k: int, mode: str,
                 rng: np.random.RandomState) -> np.ndarray:
    """R's ``CIFAR100InstanceSample.__getitem__`` ``sample_idx`` for sample ``index``."""
    cls_positive, cls_negative = r_class_lists(labels, num_classes)
    target = int(labels[index])
    if mode == "exact":
        pos_idx = index
    elif mode == "relax":
        pos_idx = rng.choice(cls_positive[target], 1)[0]
    else:
        raise NotImplementedError(mode)
    replace = k > len(cls_negative[target])
    neg_idx = rng.choice(cls_negative[target], k, replace=replace)
    return np.hstack((np.asarray([pos_idx]), neg_idx))


def repdistiller_crd_loss(method: str, student: nn.Module, teacher: nn.Module, x: Tensor,
                          y: Tensor, index: Tensor, contrast_idx: Tensor,
                          criterion: RCRDLoss) -> Tensor:
    """R's training loss on ``(x, y)`` for ``crd`` or ``crd+kd`` (flags of ``R_FLAGS_CRD``):
    ``gamma·CE + alpha·KD(T=4) + beta·CRDLoss(feat_s[-1], feat_t[-1], index, contrast_idx)``;
    the student and the criterion in train mode, the teacher in eval mode under ``no_grad``.
    Updates ``criterion``'s memory as R does."""
    if method not in R_FLAGS_CRD:
        raise ValueError(f"unknown method {method!r}; known: {sorted(R_FLAGS_CRD)}")
    gamma, alpha, beta = R_FLAGS_CRD[method]
    student.train()
    criterion.train()
    teacher.eval()
    feat_s, logit_s = repdistiller_feats(student, x)
    with torch.no_grad():
        feat_t, logit_t = repdistiller_feats(teacher, x)
        feat_t = [f.detach() for f in feat_t]
        logit_t = logit_t.detach()
    loss = gamma * F.cross_entropy(logit_s, y) + alpha * r_kd(logit_s, logit_t, R_KD_T)
    return loss + beta * criterion(feat_s[-1], feat_t[-1], index, contrast_idx)
