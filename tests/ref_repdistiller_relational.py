"""An independent re-statement of RepDistiller's SP, PKT and RKD losses and their composition.

Written from RepDistiller's code (R = HobbitLong/RepDistiller), not from kt-bench's plugins
(none of ``kt_bench.methods`` is imported here). Facts and their R paths:

* R:distiller_zoo/SP.py ``Similarity.similarity_loss``: both features viewed as (B, -1);
  G = f·fᵀ; ``torch.nn.functional.normalize(G)`` (p=2 over dim 1, i.e. each row divided by
  max(its norm, 1e-12)); loss = sum of (G_t − G_s)² / B². ``forward`` maps it over a list.
* R:distiller_zoo/PKT.py ``PKT.cosine_similarity_loss(output_net, target_net, eps=1e-7)``:
  each row divided by (sqrt(sum of squares) + eps) (the eps is ADDED to the norm, not a clamp),
  NaN entries set to 0; cosine matrices f·fᵀ; mapped by (x + 1) / 2; each row divided by its
  sum; loss = ``torch.mean`` over all B×B entries of P_t·log((P_t + eps) / (P_s + eps)).
* R:distiller_zoo/RKD.py ``RKDLoss(w_d=25, w_a=50)``: features viewed as (B, -1).
  ``pdist(e, squared=False, eps=1e-12)``: ‖e_i‖² + ‖e_j‖² − 2·e_i·e_j clamped at min 1e-12,
  square root, diagonal set to 0. Distance term: the teacher's (under ``no_grad``) and the
  student's distances each divided by the mean of their entries > 0; ``F.smooth_l1_loss``
  (default beta 1, mean). Angle term: differences e[None] − e[:, None] (entry [i, j] is
  e_j − e_i), ``F.normalize`` over the last dim, batched products giving [i, j, k] =
  <unit(e_j − e_i), unit(e_k − e_i)>, flattened (B³ entries); the teacher's under
  ``no_grad``; smooth-L1, mean. Total w_d·distance + w_a·angle.
* R:helper/loops.py ``train_distill``: ``similarity`` uses ``[feat_s[-2]]`` vs ``[feat_t[-2]]``
  and sums the list; ``rkd`` and ``pkt`` use ``feat_s[-1]`` vs ``feat_t[-1]`` (the pooled
  vector). Total ``gamma·CE + alpha·KD + beta·loss_kd``.
* R:train_student.py: ``criterion_kd = Similarity()``, ``RKDLoss()``, ``PKT()`` (defaults
  above); ``-r`` (gamma) defaults to 1; ``--kd_T`` 4.
* R:scripts/run_cifar_distill.sh: ``--distill similarity -a 0 -b 3000``,
  ``--distill rkd -a 0 -b 1``, ``--distill pkt -a 0 -b 30000`` (no ``-r``: gamma 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .repdistiller_ref import R_KD_T, r_kd, repdistiller_feats

#: (gamma, alpha, beta) per kt-bench method name, from R:scripts/run_cifar_distill.sh.
R_RELATIONAL_FLAGS: dict[str, tuple[float, float, float]] = {
    "sp": (1.0, 0.0, 3000.0),
    "pkt": (1.0, 0.0, 30000.0),
    "rkd": (1.0, 0.0, 1.0),
}

#: kt-bench method name -> R's ``--distill`` name.
R_RELATIONAL_NAMES: dict[str, str] = {"sp": "similarity", "pkt": "pkt", "rkd": "rkd"}

#: Which entry of R's feature list each method reads (R:helper/loops.py).
R_FEAT_INDEX: dict[str, int] = {"sp": -2, "pkt": -1, "rkd": -1}

#: R:distiller_zoo/RKD.py ``RKDLoss.__init__`` defaults.
R_RKD_W_D = 25.0
R_RKD_W_A = 50.0

#: R:distiller_zoo/PKT.py ``cosine_similarity_loss`` default.
R_PKT_EPS = 1e-7


def r_similarity(f_s: Tensor, f_t: Tensor) -> Tensor:
    """R's ``Similarity.similarity_loss`` for one pair of features."""
    bsz = f_s.shape[0]
    a_s, a_t = f_s.reshape(bsz, -1), f_t.reshape(bsz, -1)
    g_s, g_t = torch.mm(a_s, a_s.t()), torch.mm(a_t, a_t.t())
    g_s = g_s / g_s.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)
    g_t = g_t / g_t.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)
    return ((g_t - g_s) ** 2).sum() / (bsz * bsz)


def _pkt_unit(v: Tensor, eps: float) -> Tensor:
    out = v / (torch.sqrt((v ** 2).sum(dim=1, keepdim=True)) + eps)
    return out.masked_fill(out != out, 0.0)  # R: x[x != x] = 0


def r_pkt(f_s: Tensor, f_t: Tensor, eps: float = R_PKT_EPS) -> Tensor:
    """R's ``PKT.cosine_similarity_loss(f_s, f_t)``."""
    s, t = _pkt_unit(f_s, eps), _pkt_unit(f_t, eps)
    sim_s = (torch.mm(s, s.t()) + 1.0) / 2.0
    sim_t = (torch.mm(t, t.t()) + 1.0) / 2.0
    p_s = sim_s / sim_s.sum(dim=1, keepdim=True)
    p_t = sim_t / sim_t.sum(dim=1, keepdim=True)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


def r_pdist(e: Tensor, eps: float = 1e-12) -> Tensor:
    """R's ``RKDLoss.pdist(e, squared=False)``."""
    n = e.shape[0]
    sq = (e ** 2).sum(dim=1)
    res = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * torch.mm(e, e.t())).clamp(min=eps).sqrt()
    off_diagonal = 1.0 - torch.eye(n, dtype=res.dtype, device=res.device)
    return res * off_diagonal


def _r_angles(e: Tensor) -> Tensor:
    diff = e.unsqueeze(0) - e.unsqueeze(1)
    unit = F.normalize(diff, p=2, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)


def r_rkd(f_s: Tensor, f_t: Tensor, w_d: float = R_RKD_W_D, w_a: float = R_RKD_W_A) -> Tensor:
    """R's ``RKDLoss(w_d, w_a).forward(f_s, f_t)``."""
    s, t = f_s.reshape(f_s.shape[0], -1), f_t.reshape(f_t.shape[0], -1)
    with torch.no_grad():
        t_d = r_pdist(t)
        t_d = t_d / t_d[t_d > 0].mean()
        t_angle = _r_angles(t)
    s_d = r_pdist(s)
    s_d = s_d / s_d[s_d > 0].mean()
    loss_d = F.smooth_l1_loss(s_d, t_d)
    loss_a = F.smooth_l1_loss(_r_angles(s), t_angle)
    return w_d * loss_d + w_a * loss_a


_R_LOSSES = {"sp": r_similarity, "pkt": r_pkt, "rkd": r_rkd}


def repdistiller_relational_parts(method: str, student: nn.Module, teacher: nn.Module,
                                  x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """R's three unweighted losses on the batch ``(x, y)`` for ``sp``, ``pkt`` or ``rkd``:
    ``cls`` (cross-entropy), ``div`` (KD at T=4) and ``kd`` (the method's ``loss_kd``).

    The student runs in train mode, the teacher in eval mode under ``no_grad`` with detached
    features, as R:helper/loops.py ``train_distill`` does; the models' previous modes are
    restored afterwards.
    """
    if method not in R_RELATIONAL_FLAGS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(R_RELATIONAL_FLAGS)}")
    modes = [(m, m.training) for m in (student, teacher)]
    try:
        student.train()
        teacher.eval()
        feat_s, logit_s = repdistiller_feats(student, x)
        with torch.no_grad():
            feat_t, logit_t = repdistiller_feats(teacher, x)
            feat_t = [f.detach() for f in feat_t]
        idx = R_FEAT_INDEX[method]
        return {"cls": F.cross_entropy(logit_s, y), "div": r_kd(logit_s, logit_t, R_KD_T),
                "kd": _R_LOSSES[method](feat_s[idx], feat_t[idx])}
    finally:
        for module, was_training in modes:
            module.train(was_training)


def repdistiller_relational_loss(method: str, student: nn.Module, teacher: nn.Module, x: Tensor,
                                 y: Tensor) -> Tensor:
    """R's training loss ``gamma·CE + alpha·KD(T=4) + beta·loss_kd`` on ``(x, y)``, with the
    flags of ``R_RELATIONAL_FLAGS`` (see :func:`repdistiller_relational_parts`)."""
    gamma, alpha, beta = R_RELATIONAL_FLAGS[method]
    parts = repdistiller_relational_parts(method, student, teacher, x, y)
    return gamma * parts["cls"] + alpha * parts["div"] + beta * parts["kd"]
