"""An independent re-statement of RepDistiller's one-batch training loss, for cross-checks.

RepDistiller (R = HobbitLong/RepDistiller) is the toolkit the CIFAR-100 distillation numbers
come from. This module re-states, in its own code, what R computes on one batch so that tests
can check kt-bench's cells against it. It deliberately uses neither kt-bench's taps nor its
loss functions: the feature list is recomputed by walking kt-bench's module objects the way R's
``forward(x, is_feat=True)`` walks its own (identical) layers, and the losses are written out
from R's definitions. Facts and their R paths:

* Feature lists (``preact=False``), R:models/resnet.py, R:models/wrn.py, R:models/vgg.py:

  - ResNet: f0 = ReLU(BN(conv(x))) (the stem), f1/f2/f3 = outputs of layer1/2/3 (after each
    block's final ReLU), f4 = 8x8 average pool of f3, flattened. Five entries.
  - WRN: f0 = conv1(x) (no BN, no ReLU), f1/f2/f3 = raw outputs of block1/2/3 (the residual
    sums of pre-activation blocks, i.e. *before* any BN-ReLU; f3 is NOT after the final
    BN-ReLU), f4 = 8x8 average pool of ReLU(BN(f3)), flattened. Five entries.
  - VGG-BN: each block's last ReLU is dropped from the block and applied by ``forward``, so
    f0..f4 = ReLU'd outputs of block0..block4, all taken *before* the following max-pool
    (pool0..pool2; pool3 only for 64x64 inputs), f5 = global average pool of f4, flattened.
    Six entries.

* Losses, R:distiller_zoo/*.py: DistillKL (KL(p_t || p_s) at temperature T, summed, x T^2 /
  batch), HintLoss (MSE, mean), Attention (p=2; per map: channel *mean* of f^p, flattened,
  L2-normalised; squared difference averaged; the larger map is adaptive-average-pooled to the
  smaller's height), NSTLoss (same alignment; each channel's spatial vector L2-normalised;
  polynomial kernel (<a, b>)^2, means; full loss with the teacher-teacher term detached).

* Regressor, R:models/util.py ``ConvReg``: a conv *with bias* (3x3 stride 2 pad 1 when the
  student map is twice the teacher's height; ConvTranspose 4x4 stride 2 pad 1 when half;
  otherwise a (1+sH-tH)x(1+sW-tW) conv, 1x1 for equal sizes, no padding), then BN and ReLU.

* Composition, R:helper/loops.py ``train_distill``: every module in train mode, the teacher in
  eval mode under ``no_grad`` with detached features; ``loss = gamma*CE + alpha*KD(T=4) +
  beta*loss_kd``; hint: ``ConvReg(feat_s[hint_layer])`` vs ``feat_t[hint_layer]``;
  attention and nst: ``sum`` over ``zip(feat_s[1:-1], feat_t[1:-1])``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kt_bench.models.cifar_resnet import CifarResNet
from kt_bench.models.vgg import VGG
from kt_bench.models.wrn import WideResNet

# (gamma, alpha, beta) per kt-bench method name. Sources:
# * R:train_student.py: ``-r/--gamma`` defaults to 1 (``-a``/``-b`` have no default and are
#   always given by the scripts); ``--kd_T`` defaults to 4.
# * R:scripts/run_cifar_distill.sh, one line per method:
#   kd is run with "-r 0.1 -a 0.9 -b 0"; FitNet ("--distill hint") with "-a 0 -b 100";
#   AT ("--distill attention") with "-a 0 -b 1000"; NST ("--distill nst") with "-a 0 -b 50".
# * "student" is R's vanilla training (R:scripts/run_cifar_vanilla.sh -> train_teacher.py,
#   R:helper/loops.py ``train_vanilla``): cross-entropy alone.
R_FLAGS: dict[str, tuple[float, float, float]] = {
    "student": (1.0, 0.0, 0.0),
    "kd": (0.1, 0.9, 0.0),
    "fitnet": (1.0, 0.0, 100.0),
    "at": (1.0, 0.0, 1000.0),
    "nst_poly": (1.0, 0.0, 50.0),
}

#: kt-bench method name -> R's ``--distill`` name.
R_NAMES: dict[str, str] = {"student": "vanilla", "kd": "kd", "fitnet": "hint",
                           "at": "attention", "nst_poly": "nst"}

#: R:train_student.py ``--hint_layer`` default: FitNet uses feat[2].
R_HINT_LAYER = 2

#: R:train_student.py ``--kd_T`` default.
R_KD_T = 4.0


# --------------------------------------------------------------------------------------------
# Feature lists as R's forward(is_feat=True, preact=False) builds them
# --------------------------------------------------------------------------------------------

def _global_avg_8x8(x: Tensor) -> Tensor:
    """R's ResNet/WRN pooling: an 8x8 average pool (global at 32x32 inputs), flattened."""
    if x.shape[-2:] != (8, 8):
        raise ValueError(f"R's CIFAR ResNet/WRN pool with a fixed 8x8 window; got a map of "
                         f"size {tuple(x.shape[-2:])} (use 32x32 inputs)")
    return F.avg_pool2d(x, 8).flatten(1)


def _resnet_block(block: nn.Module, x: Tensor) -> Tensor:
    """One post-activation basic block: conv-BN-ReLU-conv-BN, add the shortcut, ReLU."""
    out = F.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    # R projects the shortcut (1x1 conv + BN) exactly when stride or channel count changes.
    projects = block.conv1.stride != (1, 1) or block.conv1.in_channels != block.conv1.out_channels
    if projects:
        proj_conv, proj_bn = block.shortcut[0], block.shortcut[1]
        residual = proj_bn(proj_conv(x))
    else:
        if not isinstance(block.shortcut, nn.Identity):
            raise AssertionError("block has a projection where R's ResNet has the identity")
        residual = x
    return F.relu(out + residual)


def _resnet_feats(model: CifarResNet, x: Tensor) -> tuple[list[Tensor], Tensor]:
    f0 = F.relu(model.bn1(model.conv1(x)))
    stages, h = [], f0
    for layer in (model.layer1, model.layer2, model.layer3):
        for block in layer:
            h = _resnet_block(block, h)
        stages.append(h)
    f4 = _global_avg_8x8(stages[-1])
    return [f0, *stages, f4], model.fc(f4)


def _wrn_block(block: nn.Module, x: Tensor) -> Tensor:
    """One pre-activation block: BN-ReLU-conv-BN-ReLU-conv plus the (projected) input."""
    act = F.relu(block.bn1(x))
    out = block.conv2(F.relu(block.bn2(block.conv1(act))))
    # R: a 1x1 shortcut conv exactly when in and out channels differ; it reads the BN-ReLU'd
    # input, while the identity shortcut adds the raw input.
    if block.conv1.in_channels != block.conv1.out_channels:
        return out + block.shortcut(act)
    if block.shortcut is not None:
        raise AssertionError("block has a projection where R's WRN has the identity")
    return out + x


def _wrn_feats(model: WideResNet, x: Tensor) -> tuple[list[Tensor], Tensor]:
    f0 = model.conv1(x)
    stages, h = [], f0
    for group in (model.block1, model.block2, model.block3):
        for block in group:
            h = _wrn_block(block, h)
        stages.append(h)
    # f3 stays the raw block3 output; only the pooled vector sees the final BN-ReLU.
    f4 = _global_avg_8x8(F.relu(model.bn(stages[-1])))
    return [f0, *stages, f4], model.fc(f4)


def _vgg_block(block: nn.Sequential, x: Tensor) -> Tensor:
    """conv3x3(bias)-BN-ReLU for each layer of the block; the last ReLU is R's F.relu."""
    layers = list(block)
    if len(layers) % 3:
        raise AssertionError("a VGG-BN block is a run of (conv, BN, ReLU) triples")
    for i in range(0, len(layers), 3):
        conv, bn = layers[i], layers[i + 1]
        x = F.relu(bn(conv(x)))
    return x


def _vgg_feats(model: VGG, x: Tensor) -> tuple[list[Tensor], Tensor]:
    height = x.shape[2]
    blocks = (model.block0, model.block1, model.block2, model.block3, model.block4)
    feats, h = [], x
    for i, block in enumerate(blocks):
        if i in (1, 2, 3):  # pool0, pool1, pool2 (2x2 max, stride 2) after f0, f1, f2
            h = F.max_pool2d(h, kernel_size=2, stride=2)
        if i == 4 and height == 64:  # R's pool3 runs only for 64x64 inputs
            h = F.max_pool2d(h, kernel_size=2, stride=2)
        h = _vgg_block(block, h)
        feats.append(h)  # taken before the next pooling
    f5 = F.adaptive_avg_pool2d(feats[-1], 1).flatten(1)
    return [*feats, f5], model.classifier(f5)


def repdistiller_feats(model: nn.Module, x: Tensor) -> tuple[list[Tensor], Tensor]:
    """R's ``model(x, is_feat=True, preact=False)`` recomputed on a kt-bench model object.

    Returns ``(feats, logits)``: 5 feats ``[f0, f1, f2, f3, pooled]`` for ``CifarResNet`` and
    ``WideResNet``, 6 feats ``[f0, ..., f4, pooled]`` for ``VGG``. Uses the model's own
    convolution, BatchNorm and linear layers (so its current train/eval mode applies) but none
    of its ``forward`` methods or hooks.
    """
    if isinstance(model, CifarResNet):
        return _resnet_feats(model, x)
    if isinstance(model, WideResNet):
        return _wrn_feats(model, x)
    if isinstance(model, VGG):
        return _vgg_feats(model, x)
    raise TypeError(f"no RepDistiller feature list for {type(model).__name__}")


# --------------------------------------------------------------------------------------------
# R's losses
# --------------------------------------------------------------------------------------------

def r_kd(logit_s: Tensor, logit_t: Tensor, T: float = R_KD_T) -> Tensor:
    """R's DistillKL: sum of KL(softmax(t/T) || softmax(s/T)) over the batch, x T^2 / batch."""
    log_p_s = F.log_softmax(logit_s / T, dim=1)
    log_p_t = F.log_softmax(logit_t / T, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl * (T * T) / logit_s.shape[0]


def _align_heights(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """R's AT/NST alignment: the taller map is adaptive-avg-pooled to (h, h) of the other."""
    h_s, h_t = f_s.shape[2], f_t.shape[2]
    if h_s > h_t:
        f_s = F.adaptive_avg_pool2d(f_s, (h_t, h_t))
    elif h_t > h_s:
        f_t = F.adaptive_avg_pool2d(f_t, (h_s, h_s))
    return f_s, f_t


def _attention_map(f: Tensor, p: int) -> Tensor:
    """Channel mean of |f|^p (f^p as R writes it), flattened and L2-normalised per sample."""
    a = f.pow(p).mean(dim=1).reshape(f.shape[0], -1)
    return a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)


def r_at(f_s: Tensor, f_t: Tensor, p: int = 2) -> Tensor:
    """R's ``Attention.at_loss`` for one pair of maps: mean squared attention-map difference."""
    f_s, f_t = _align_heights(f_s, f_t)
    return (_attention_map(f_s, p) - _attention_map(f_t, p)).pow(2).mean()


def _poly2_gram_mean(a: Tensor, b: Tensor) -> Tensor:
    """Mean over batch and channel pairs of (<a_i, b_j>)^2, vectors over spatial positions."""
    return torch.bmm(b, a.transpose(1, 2)).pow(2).mean()


def r_nst(f_s: Tensor, f_t: Tensor) -> Tensor:
    """R's ``NSTLoss.nst_loss`` for one pair of maps (polynomial kernel d=2, c=0, full loss).

    MMD^2 = mean k(t, t) (detached) + mean k(s, s) - 2 mean k(s, t), where each channel's
    spatial vector is L2-normalised after the heights are aligned.
    """
    f_s, f_t = _align_heights(f_s, f_t)
    s = f_s.reshape(f_s.shape[0], f_s.shape[1], -1)
    t = f_t.reshape(f_t.shape[0], f_t.shape[1], -1)
    s = s / s.norm(dim=2, keepdim=True).clamp_min(1e-12)
    t = t / t.norm(dim=2, keepdim=True).clamp_min(1e-12)
    return (_poly2_gram_mean(t, t).detach() + _poly2_gram_mean(s, s)
            - 2 * _poly2_gram_mean(s, t))


def r_hint(f_s: Tensor, f_t: Tensor) -> Tensor:
    """R's HintLoss: element-wise mean squared error (``f_s`` is the regressor's output)."""
    return (f_s - f_t).pow(2).mean()


def make_r_convreg(s_shape: Sequence[int], t_shape: Sequence[int]) -> nn.Module:
    """R's FitNet ``ConvReg(s_shape, t_shape)`` (use_relu=True), shapes as (N, C, H, W).

    A ``nn.Sequential`` with children ``conv``, ``bn``, ``relu``; state-dict keys
    ``conv.weight``, ``conv.bias``, ``bn.weight``, ``bn.bias``, ``bn.running_mean``,
    ``bn.running_var``, ``bn.num_batches_tracked``. The conv always has a bias.
    """
    _, c_s, h_s, w_s = (int(v) for v in s_shape)
    _, c_t, h_t, w_t = (int(v) for v in t_shape)
    conv: nn.Module
    if h_s == 2 * h_t:
        conv = nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1, bias=True)
    elif 2 * h_s == h_t:
        conv = nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1, bias=True)
    elif h_s >= h_t:
        conv = nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t), bias=True)
    else:
        raise ValueError(f"R's ConvReg has no rule for student height {h_s}, teacher {h_t}")
    return nn.Sequential(OrderedDict(
        conv=conv, bn=nn.BatchNorm2d(c_t), relu=nn.ReLU()))


# --------------------------------------------------------------------------------------------
# R's composition (helper/loops.py train_distill)
# --------------------------------------------------------------------------------------------

def repdistiller_loss(method: str, student: nn.Module, teacher: nn.Module | None, x: Tensor,
                      y: Tensor, convreg: nn.Module | None = None) -> Tensor:
    """R's training loss on the batch ``(x, y)`` for kt-bench ``method`` (a key of R_FLAGS).

    ``gamma*CE + alpha*KD(T=4) + beta*loss_kd`` with (gamma, alpha, beta) from ``R_FLAGS``.
    The student (and ``convreg``) run in train mode, the teacher in eval mode under
    ``no_grad`` with detached features, as R does; the models' previous modes are restored
    afterwards (train-mode BatchNorm still updates the running statistics, as in R).
    ``convreg`` is the FitNet regressor (see ``make_r_convreg``); for ``fitnet`` without one, a
    freshly initialised one is built from the feature shapes. ``teacher`` may be ``None`` only
    for ``student`` (R's vanilla training runs no teacher).
    """
    if method not in R_FLAGS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(R_FLAGS)}")
    gamma, alpha, beta = R_FLAGS[method]
    modes = [(m, m.training) for m in (student, teacher, convreg) if m is not None]
    try:
        student.train()
        feat_s, logit_s = repdistiller_feats(student, x)
        loss = gamma * F.cross_entropy(logit_s, y)
        if method == "student":
            return loss
        if teacher is None:
            raise ValueError(f"method {method!r} needs a teacher")
        teacher.eval()
        with torch.no_grad():
            feat_t, logit_t = repdistiller_feats(teacher, x)
            feat_t = [f.detach() for f in feat_t]
            logit_t = logit_t.detach()
        loss = loss + alpha * r_kd(logit_s, logit_t, R_KD_T)
        if method == "kd":
            loss_kd: Tensor | float = 0.0
        elif method == "fitnet":
            if convreg is None:
                convreg = make_r_convreg(feat_s[R_HINT_LAYER].shape,
                                         feat_t[R_HINT_LAYER].shape).to(x.device)
            convreg.train()
            loss_kd = r_hint(convreg(feat_s[R_HINT_LAYER]), feat_t[R_HINT_LAYER])
        else:
            pair_loss = r_at if method == "at" else r_nst
            # R zips the two lists, so unequal lengths are silently truncated.
            pairs = zip(feat_s[1:-1], feat_t[1:-1], strict=False)
            loss_kd = sum(pair_loss(f_s, f_t) for f_s, f_t in pairs)
        return loss + beta * loss_kd
    finally:
        for module, was_training in modes:
            module.train(was_training)
