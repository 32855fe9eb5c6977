"""Independent re-statements of three logit methods' reference losses, for cross-checks.

Each function below re-states, in its own code, what the reference implementation computes on
one batch, so tests can compare kt-bench's cells with it. Nothing here uses kt-bench's method
plugins (``kt_bench.methods.*``) or its taps: logits come from
:func:`tests.repdistiller_ref.repdistiller_feats`, which walks the model's layers the way
RepDistiller's ``forward`` does; mdistiller's CIFAR models (``mdistiller/models/cifar``) are
RepDistiller's, and so is the logit-standardization code's copy of mdistiller.

Facts and their sources:

* DKD, M = megvii-research/mdistiller:

  - ``mdistiller/distillers/DKD.py`` ``dkd_loss``: ``gt_mask`` = one-hot of the target (bool),
    ``other_mask`` its complement; softmax(z/T) of both networks reduced to the binary
    ``[Σ p·gt_mask, Σ p·other_mask]`` (``cat_mask``); TCKD = ``kl_div(log(b_s), b_t,
    size_average=False)·T²/B``; NCKD = the same on ``softmax(z_t/T − 1000·gt_mask)`` and
    ``log_softmax(z_s/T − 1000·gt_mask)``; loss = α·TCKD + β·NCKD.
  - ``DKD.forward_train``: ``loss_ce = CE_WEIGHT·CE(logits_s, y)``, ``loss_dkd =
    min(epoch/WARMUP, 1)·dkd_loss(...)``; the teacher under ``no_grad`` and in eval mode
    (``_base.Distiller.train``); the trainer sums the two (``engine/trainer.py`` ``train_iter``).
  - ``engine/trainer.py`` ``BaseTrainer.train``: ``epoch = 1`` and ``while epoch < EPOCHS + 1``:
    epochs count from 1.
  - ``engine/cfg.py``: DKD CE_WEIGHT 1.0, ALPHA 1.0, BETA 8.0, T 4.0, WARMUP 20.
  - ``configs/cifar100/dkd/*.yaml``: BETA per pair (:data:`M_DKD_BETA`); SOLVER: batch 64,
    240 epochs, lr 0.05 (0.01 for ShuffleNet/MobileNet students), decay stages 150/180/210 ×0.1,
    weight decay 5e-4, momentum 0.9, SGD.

* DIST, the authors' classification toolbox (hunto/image_classification_sota, the ``classification``
  submodule of hunto/DIST_KD; read from hunto/LocalMamba's copy of the same folder):

  - ``lib/models/losses/dist_kd.py``: ``cosine_similarity(a, b, eps=1e-8) = Σ(a·b) / (‖a‖·‖b‖
    + eps)`` per row; ``pearson_correlation`` = that of the row-centred inputs;
    inter = ``1 − mean(pearson(y_s, y_t))``, intra = inter of the transposes;
    ``DIST.forward``: y = softmax(z/τ), loss = β·τ²·inter + γ·τ²·intra.
  - ``lib/models/losses/kd_loss.py``: ``kd_method 'dist_t<τ>'`` -> ``DIST(beta=1, gamma=1,
    tau=τ)`` on the models' outputs; total = ``ori_loss·ori_loss_weight + kd_loss·
    kd_loss_weight``.
  - ``configs/strategies/distill/dist_cifar.yaml``: ``kd: dist_t4``, ``ori_loss_weight: 1``,
    ``kd_loss_weight: 2``, smoothing 0 (plain CE), batch 64, 240 epochs, lr 0.05.

* Logit standardization, L = sunshangquan/logit-standardization-KD (built on mdistiller):

  - ``mdistiller/distillers/KD.py``: ``normalize(z) = (z − mean) / (1e-7 + std)`` over the
    last dimension (``Tensor.std``: unbiased); ``kd_loss`` = ``kl_div(log_softmax(zs/T),
    softmax(zt/T), reduction='none').sum(1).mean()·T²`` on normalised logits;
    ``forward_train``: ``CE_WEIGHT·CE + KD_WEIGHT·kd_loss``.
  - ``tools/train.py``: ``--logit-stand --base-temp 2 --kd-weight 9`` (the README's CIFAR-100
    command) sets ``KD.TEMPERATURE = 2`` and ``KD.LOSS.KD_WEIGHT = 9``.
  - ``KD.LOSS.CE_WEIGHT = 0.1``: the author in L's issue #8 (kept from mdistiller's KD) and
    the master ``engine/cfg.py`` quoted in issue #25 (TEMPERATURE 2, CE_WEIGHT 0.1,
    KD_WEIGHT 9). (The stored older ``cfg.py`` at 2ba39545 reads CE 1, T 4, KD 9.)
  - Per-pair base temperature and weight: the log names ``logs/KD/kd,T,S,<T>,<weight>.txt``
    (:data:`LS_KD_PAIRS`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .repdistiller_ref import repdistiller_feats

# --------------------------------------------------------------------------------------------
# DKD (mdistiller)
# --------------------------------------------------------------------------------------------

#: M:mdistiller/engine/cfg.py, DKD section.
M_DKD_DEFAULTS = {"CE_WEIGHT": 1.0, "ALPHA": 1.0, "BETA": 8.0, "T": 4.0, "WARMUP": 20}

#: BETA of M:configs/cifar100/dkd/<file>.yaml, by (teacher, student) in kt-bench's names;
#: files without a DKD section run the default 8.0. M ships no resnet110 -> resnet20 config.
M_DKD_BETA = {
    ("resnet56", "resnet20"): 2.0,      # res56_res20.yaml
    ("resnet110", "resnet32"): 2.0,     # res110_res32.yaml
    ("resnet32x4", "resnet8x4"): 8.0,   # res32x4_res8x4.yaml (no DKD section)
    ("wrn_40_2", "wrn_16_2"): 6.0,      # wrn40_2_wrn_16_2.yaml
    ("wrn_40_2", "wrn_40_1"): 6.0,      # wrn40_2_wrn_40_1.yaml
    ("vgg13", "vgg8"): 6.0,             # vgg13_vgg8.yaml
    ("vgg13", "MobileNetV2"): 6.0,      # vgg13_mv2.yaml
    ("resnet32x4", "ShuffleV1"): 8.0,   # res32x4_shuv1.yaml (no DKD section)
    ("resnet32x4", "ShuffleV2"): 8.0,   # res32x4_shuv2.yaml (no DKD section)
    ("ResNet50", "MobileNetV2"): 8.0,   # res50_mv2.yaml (no DKD section)
    ("wrn_40_2", "ShuffleV1"): 8.0,     # wrn40_2_shuv1.yaml (no DKD section)
}


def _m_gt_mask(logits: Tensor, target: Tensor) -> Tensor:
    return torch.zeros_like(logits).scatter_(1, target.reshape(-1).unsqueeze(1), 1).bool()


def _m_other_mask(logits: Tensor, target: Tensor) -> Tensor:
    return torch.ones_like(logits).scatter_(1, target.reshape(-1).unsqueeze(1), 0).bool()


def _m_cat_mask(p: Tensor, mask1: Tensor, mask2: Tensor) -> Tensor:
    return torch.cat([(p * mask1).sum(dim=1, keepdim=True),
                      (p * mask2).sum(dim=1, keepdim=True)], dim=1)


def m_dkd_loss(logits_s: Tensor, logits_t: Tensor, target: Tensor, alpha: float, beta: float,
               T: float) -> Tensor:
    """M's ``dkd_loss``, re-stated."""
    gt, other = _m_gt_mask(logits_s, target), _m_other_mask(logits_s, target)
    b_s = _m_cat_mask(F.softmax(logits_s / T, dim=1), gt, other)
    b_t = _m_cat_mask(F.softmax(logits_t / T, dim=1), gt, other)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * T ** 2 / target.shape[0]
    p_t2 = F.softmax(logits_t / T - 1000.0 * gt, dim=1)
    log_p_s2 = F.log_softmax(logits_s / T - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_p_s2, p_t2, reduction="sum") * T ** 2 / target.shape[0]
    return alpha * tckd + beta * nckd


def m_dkd_total(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, m_epoch: int,
                beta: float, cfg: dict | None = None) -> Tensor:
    """M's ``DKD.forward_train`` losses summed, at M's (1-based) epoch ``m_epoch``."""
    c = {**M_DKD_DEFAULTS, "BETA": beta, **(cfg or {})}
    student.train()
    teacher.eval()
    _, logits_s = repdistiller_feats(student, x)
    with torch.no_grad():
        _, logits_t = repdistiller_feats(teacher, x)
    loss_ce = c["CE_WEIGHT"] * F.cross_entropy(logits_s, y)
    ramp = min(m_epoch / c["WARMUP"], 1.0)
    loss_dkd = ramp * m_dkd_loss(logits_s, logits_t, y, c["ALPHA"], c["BETA"], c["T"])
    return loss_ce + loss_dkd


# --------------------------------------------------------------------------------------------
# DIST (the authors' classification toolbox)
# --------------------------------------------------------------------------------------------

#: configs/strategies/distill/dist_cifar.yaml (``kd: dist_t4``) and kd_loss.py's ``dist_t``.
DIST_CIFAR = {"ori_loss_weight": 1.0, "kd_loss_weight": 2.0, "beta": 1.0, "gamma": 1.0,
              "tau": 4.0}


def _author_cosine(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def _author_pearson(a: Tensor, b: Tensor) -> Tensor:
    return _author_cosine(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1))


def author_dist(z_s: Tensor, z_t: Tensor, beta: float, gamma: float, tau: float) -> Tensor:
    """The authors' ``DIST.forward``, re-stated."""
    y_s, y_t = (z_s / tau).softmax(dim=1), (z_t / tau).softmax(dim=1)
    inter = tau ** 2 * (1 - _author_pearson(y_s, y_t).mean())
    intra = tau ** 2 * (1 - _author_pearson(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean())
    return beta * inter + gamma * intra


def dist_total(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor,
               cfg: dict | None = None) -> Tensor:
    """The authors' ``KDLoss.__call__`` with ``kd: dist_t4``: ori·CE + kd·DIST."""
    c = {**DIST_CIFAR, **(cfg or {})}
    student.train()
    teacher.eval()
    with torch.no_grad():
        _, logits_t = repdistiller_feats(teacher, x)
    _, logits_s = repdistiller_feats(student, x)
    ori = F.cross_entropy(logits_s, y)
    kd = author_dist(logits_s, logits_t, c["beta"], c["gamma"], c["tau"])
    return ori * c["ori_loss_weight"] + kd * c["kd_loss_weight"]


# --------------------------------------------------------------------------------------------
# KD with logit standardization (sunshangquan/logit-standardization-KD)
# --------------------------------------------------------------------------------------------

#: CE weight, and the README command's base temperature and KD weight.
LS_KD_DEFAULTS = {"CE_WEIGHT": 0.1, "TEMPERATURE": 2.0, "KD_WEIGHT": 9.0}

#: (base temperature, KD weight) from the names of L's logs/KD/*.txt, by (teacher, student).
#: resnet110 -> resnet20: the log is "4,12" although the README's table cell has no link.
LS_KD_PAIRS = {
    ("resnet32x4", "resnet8x4"): (2.0, 9.0),
    ("vgg13", "vgg8"): (3.0, 9.0),
    ("wrn_40_2", "wrn_40_1"): (2.0, 9.0),
    ("wrn_40_2", "wrn_16_2"): (2.0, 9.0),
    ("resnet56", "resnet20"): (2.0, 9.0),
    ("resnet110", "resnet32"): (2.0, 9.0),
    ("resnet110", "resnet20"): (4.0, 12.0),
}


def ls_normalize(logit: Tensor) -> Tensor:
    """L's ``normalize``, re-stated."""
    mean = logit.mean(dim=-1, keepdim=True)
    stdv = logit.std(dim=-1, keepdim=True)
    return (logit - mean) / (1e-7 + stdv)


def ls_kd_loss(z_s: Tensor, z_t: Tensor, T: float, logit_stand: bool = True) -> Tensor:
    """L's ``kd_loss``, re-stated."""
    if logit_stand:
        z_s, z_t = ls_normalize(z_s), ls_normalize(z_t)
    log_p_s = F.log_softmax(z_s / T, dim=1)
    p_t = F.softmax(z_t / T, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="none").sum(1).mean() * T ** 2


def ls_kd_total(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor,
                cfg: dict | None = None) -> Tensor:
    """L's ``KD.forward_train`` with ``LOGIT_STAND`` on, the two losses summed."""
    c = {**LS_KD_DEFAULTS, **(cfg or {})}
    student.train()
    teacher.eval()
    _, logits_s = repdistiller_feats(student, x)
    with torch.no_grad():
        _, logits_t = repdistiller_feats(teacher, x)
    loss_ce = c["CE_WEIGHT"] * F.cross_entropy(logits_s, y)
    loss_kd = c["KD_WEIGHT"] * ls_kd_loss(logits_s, logits_t, c["TEMPERATURE"])
    return loss_ce + loss_kd
