"""An independent re-statement of OFA-KD's training loss (Hao et al., NeurIPS 2023), for
cross-checks.

The authors' code (O = Hao840/OFAKD) trains a student through its ``OFA`` distiller, whose
``forward(image, label)`` returns ``loss_gt``, ``loss_kd`` and ``loss_ofa``, which the trainer
adds. This module re-states that computation in its own code, using neither kt-bench's taps
nor its method plugin: the student's stage features are recomputed by walking kt-bench's model
objects the way O's ``custom_forward`` walks its models (torchvision ResNets here, the layout
of O's timm ResNets) or mdistiller's CIFAR models (tests/ref_mdistiller_features.py). Facts and
their O paths:

* ``distillers/ofa.py`` ``ofa_loss(logits_student, logits_teacher, target_mask, eps,
  temperature)``: ``softmax(z / T)`` of both, ``prod = (pred_teacher + target_mask) ** eps``,
  ``loss = sum(-(prod - target_mask) * log(pred_student), dim=-1).mean()``.
* ``OFA.__init__``: one eps broadcast to ``len(ofa_stage) + 1`` values (the last for the
  logits); ``feature_dim_{s,t}`` = ``stage_info(-1)`` (the pre-logit feature's width); per
  stage, CNN students: ``4 - stage`` SepConv blocks (``out_chans`` = ``in_chans * 2``, the last
  ``max(feature_dim_s, feature_dim_t)``; ``in_chans *= 2`` after each), stage 4 a
  ``Conv2d(in_chans, max(...), 1, 1, 0)``; then ``AdaptiveAvgPool2d(1)``, ``Flatten``,
  ``Linear(max(...), num_classes)``. ViT students: ``merge_num = max(int(log2(patch_grid /
  7)), 0)`` PatchMerging layers (the first ``embed_dim -> feature_dim_s`` with GELU, later ones
  ``feature_dim_s -> feature_dim_s``, GELU except the last), ``max(4 - stage, 1)``
  ``Block(dim=feature_dim_s, num_heads=4)``, ``GAP1d`` (no class token) and ``Linear``,
  wrapped in ``TokenFnContext(0, patch_merger)`` (with no class token: the merger alone);
  ``self.projector.apply(init_weights)``.
* ``OFA.forward``: the teacher in eval mode under ``no_grad``; ``target_mask =
  one_hot(label)``; ``loss_ofa = ofa_loss_weight * sum(ofa_loss(projector_k(feat_k),
  logits_teacher, target_mask, eps_k, T))``; ``loss_gt = gt_loss_weight * criterion(
  logits_student, label)``; ``loss_kd = kd_loss_weight * ofa_loss(logits_student,
  logits_teacher, target_mask, eps[-1], T)``.
* ``distillers/utils.py``: ``SepConv`` = ``op`` = [depthwise 3x3 stride 2 pad 1, 1x1, BN, ReLU,
  depthwise 3x3 stride 1 pad 1, 1x1 to out, BN, ReLU], convs without bias; ``PatchMerging``:
  view (B, H, W, C), concatenate x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2],
  LayerNorm(4C), Linear(4C, out, bias=False), act; ``GAP1d`` = mean over tokens;
  ``init_weights``: Conv2d kaiming_normal(fan_out, relu), BN 1/0, Linear trunc_normal(std .02)
  and zero bias.
* ``custom_forward/resnet.py``: ``feat`` = [layer1, layer2, layer3, layer4 outputs] after
  conv1, bn1, act1, maxpool; stage k is ``feat[k - 1]``; ``stage_info(-1)`` = the pooled width.
* O's README pins timm 0.6.5, whose ``Block`` normalises with ``nn.LayerNorm`` (eps 1e-5).

kt-bench's taps are maps for every architecture, so the ViT branch is checked on a map's
positions taken as tokens row by row (a ViT's patch order), and "stage 4" is the student's last
stage: ``last - stage`` replaces ``4 - stage`` (``last`` = 4 for O's ResNets).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import ResNet

from .ref_mdistiller_features import mdistiller_feats


def o_ofa_loss(logits_student: Tensor, logits_teacher: Tensor, target_mask: Tensor, eps: float,
               temperature: float = 1.0) -> Tensor:
    """O's ``ofa_loss``, with log(softmax) as O writes it."""
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    prod = (pred_teacher + target_mask) ** eps
    return torch.sum(-(prod - target_mask) * torch.log(pred_student), dim=-1).mean()


class OSepConv(nn.Module):
    """O's ``SepConv`` (affine BNs)."""

    def __init__(self, channel_in: int, channel_out: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(channel_in, channel_in, kernel_size=3, stride=2, padding=1,
                      groups=channel_in, bias=False),
            nn.Conv2d(channel_in, channel_in, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(channel_in),
            nn.ReLU(inplace=False),
            nn.Conv2d(channel_in, channel_in, kernel_size=3, stride=1, padding=1,
                      groups=channel_in, bias=False),
            nn.Conv2d(channel_in, channel_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(channel_out),
            nn.ReLU(inplace=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


def o_cnn_projector(stage: int, in_chans: int, feature_dim_s: int, feature_dim_t: int,
                    num_classes: int, last: int = 4) -> nn.Sequential:
    """O's CNN projector of ``stage`` (``last`` in place of O's 4)."""
    width = max(feature_dim_s, feature_dim_t)
    if stage != last:
        n = last - stage
        blocks = []
        for i in range(n):
            out_chans = width if i == n - 1 else in_chans * 2
            blocks.append(OSepConv(in_chans, out_chans))
            in_chans *= 2
    else:
        blocks = [nn.Conv2d(in_chans, width, 1, 1, 0)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))


class OPatchMerging(nn.Module):
    """O's ``PatchMerging``."""

    def __init__(self, input_resolution: tuple[int, int], dim: int, out_dim: int,
                 act_layer: type[nn.Module] = nn.Identity) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        H, W = self.input_resolution
        B, L, C = x.shape
        assert L == H * W, "input feature has wrong size"
        x = x.view(B, H, W, C)
        x0 = x[:, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, :]
        x3 = x[:, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], -1).view(B, -1, 4 * C)
        return self.act(self.reduction(self.norm(x)))


class OGAP1d(nn.Module):
    """O's ``GAP1d``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(1)


def o_vit_projector(stage: int, patch_num: int, embed_dim: int, feature_dim_s: int,
                    num_classes: int, last: int = 4) -> nn.Sequential:
    """O's ViT projector of ``stage`` for a student without class tokens (``TokenFnContext``
    with ``token_num = 0`` is its merger alone), on timm's ``Block`` with timm 0.6.5's
    ``nn.LayerNorm``."""
    from timm.models.vision_transformer import Block

    patch_grid = int(patch_num ** .5)
    merge_num = max(int(math.log2(patch_grid / 7)), 0)
    mergers = []
    for i in range(merge_num):
        res = (patch_grid // 2 ** i, patch_grid // 2 ** i)
        if i == 0:
            mergers.append(OPatchMerging(res, embed_dim, feature_dim_s, nn.GELU))
        else:
            mergers.append(OPatchMerging(res, feature_dim_s, feature_dim_s,
                                         nn.GELU if i != merge_num - 1 else nn.Identity))
    blocks = [Block(dim=feature_dim_s, num_heads=4, norm_layer=nn.LayerNorm)
              for _ in range(max(last - stage, 1))]
    return nn.Sequential(nn.Sequential(*mergers), nn.Sequential(*blocks), OGAP1d(),
                         nn.Linear(feature_dim_s, num_classes))


def tv_resnet_feats(model: ResNet, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """O's ``forward(x, requires_feat=True)`` of a ResNet on a torchvision ResNet object:
    (logits, [layer1..layer4 outputs, pooled feature])."""
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    feat = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        h = layer(h)
        feat.append(h)
    pooled = torch.flatten(model.avgpool(h), 1)
    feat.append(pooled)
    return model.fc(pooled), feat


def cifar_feats(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The same list for mdistiller's CIFAR models: (logits, [stage1.., pooled feature])."""
    logits, feats = mdistiller_feats(model, x)
    return logits, [*feats["feats"][1:], feats["pooled_feat"]]


def o_ofa_total(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor,
                feats: Callable[[nn.Module, Tensor], tuple[Tensor, list[Tensor]]],
                projectors: dict[int, nn.Module], stages: Sequence[int],
                eps: Sequence[float], temperature: float = 1.0, ofa_loss_weight: float = 1.0,
                gt_loss_weight: float = 1.0, kd_loss_weight: float = 1.0,
                tokens: bool = False) -> Tensor:
    """loss_gt + loss_kd + loss_ofa of O's ``OFA.forward`` on (x, y); ``eps`` as O's
    ``args.ofa_eps`` after broadcasting; ``tokens``: the stage maps reach the projectors as
    (B, H·W, C) token sequences (the ViT branch)."""
    if len(eps) == 1:
        eps = [eps[0]] * (len(stages) + 1)
    assert len(stages) + 1 == len(eps)
    with torch.no_grad():
        teacher.eval()
        logits_teacher = teacher(x)
    logits_student, feat_student = feats(student, x)
    target_mask = F.one_hot(y, logits_student.size(-1))
    ofa_losses = []
    for stage, e in zip(stages, eps, strict=False):
        feat_s = feat_student[stage - 1]
        if tokens:
            feat_s = feat_s.flatten(2).transpose(1, 2)
        ofa_losses.append(o_ofa_loss(projectors[stage](feat_s), logits_teacher, target_mask, e,
                                     temperature))
    loss_ofa = ofa_loss_weight * sum(ofa_losses)
    loss_gt = gt_loss_weight * F.cross_entropy(logits_student, y)
    loss_kd = kd_loss_weight * o_ofa_loss(logits_student, logits_teacher, target_mask, eps[-1],
                                          temperature)
    return loss_gt + loss_kd + loss_ofa
