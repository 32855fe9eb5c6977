"""``ofa``: the OFA loss by hand and against a loop-level formula and finite differences, the
projector branches built from the taps (3- and 4-stage students, both branches), options and
their errors, and the loss and gradients of a configured method against an independent
re-statement of the authors' ``OFA.forward`` (tests/ref_ofakd.py) on the same weights and
batch; then a one-epoch run through the command line."""

from __future__ import annotations

import math
import sys
import textwrap

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from kt_bench.methods.kd import kd_loss
from kt_bench.methods.ofa import OFA, PatchMerging, SepConv, TokenMean, ofa_loss
from torch import nn
from torchvision.models import ResNet

from kt_bench.api.method import Batch, NotApplicable, build_method, method_config
from kt_bench.core.errors import KtBenchError
from kt_bench.models import build_model
from kt_bench.models.taps import TapRecorder

from ..conftest import run_cli
from ..ref_ofakd import (
    cifar_feats,
    o_cnn_projector,
    o_ofa_loss,
    o_ofa_total,
    o_vit_projector,
    tv_resnet_feats,
)
from . import composition
from .loops import check_logit_gradient, draw, lists, softmax
from .mdistiller import assert_same_gradients

STAGES3 = ["stage1", "stage2", "stage3"]
STAGES4 = [*STAGES3, "stage4"]


def onehot(y: torch.Tensor, c: int) -> torch.Tensor:
    """(B, c) float64 one-hot labels."""
    return F.one_hot(y, c).double()


def ofa_direct(s, t, y, eps: float, T: float) -> float:
    """The OFA loss from its definition, sample by sample, in float64 Python arithmetic."""
    total = 0.0
    for i in range(len(s)):
        p_s = softmax([v / T for v in s[i]])
        p_t = softmax([v / T for v in t[i]])
        for c in range(len(s[i])):
            m = 1.0 if c == y[i] else 0.0
            total -= ((p_t[c] + m) ** eps - m) * math.log(p_s[c])
    return total / len(s)


# ---- ofa_loss --------------------------------------------------------------------------------

def test_ofa_loss_by_hand_on_two_classes():
    # p_s = (1/4, 3/4), p_t = (1/2, 1/2)
    s = torch.tensor([[0.0, math.log(3.0)]])
    t = torch.zeros(1, 2)
    # label 1, eps 2: target ((1/2)², (3/2)² − 1) = (1/4, 5/4)
    want = -(0.25 * math.log(0.25) + 1.25 * math.log(0.75))
    assert ofa_loss(s, t, torch.tensor([[0.0, 1.0]]), 2.0).item() == pytest.approx(want)
    # label 0: target ((3/2)² − 1, (1/2)²) = (5/4, 1/4)
    want0 = -(1.25 * math.log(0.25) + 0.25 * math.log(0.75))
    assert ofa_loss(s, t, torch.tensor([[1.0, 0.0]]), 2.0).item() == pytest.approx(want0)
    # the same probabilities at temperature 2 from doubled student logits; the batch mean
    both = ofa_loss(torch.cat([2 * s, 2 * s]), torch.zeros(2, 2),
                    torch.tensor([[0.0, 1.0], [1.0, 0.0]]), 2.0, temperature=2.0)
    assert both.item() == pytest.approx((want + want0) / 2)
    # eps 1: the cross-entropy of the teacher's soft labels, whatever the label
    soft = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    for mask in ([[0.0, 1.0]], [[1.0, 0.0]]):
        assert ofa_loss(s, t, torch.tensor(mask), 1.0).item() == pytest.approx(soft)


@pytest.mark.parametrize("b,c,eps,T", [(2, 5, 1.0, 1.0), (4, 10, 1.5, 1.0), (3, 7, 2.0, 4.0),
                                       (5, 100, 0.5, 2.0)])
def test_ofa_loss_matches_the_loop_level_formula_and_os_form(b, c, eps, T):
    s, t, y = draw(b, c, seed=b * 100 + c)
    expected = ofa_direct(lists(s), lists(t), y.tolist(), eps, T)
    assert ofa_loss(s, t, onehot(y, c), eps, T).item() == pytest.approx(expected, rel=1e-9)
    # float32 logits: float32 terms, O's log(softmax) form to float32 rounding
    got = ofa_loss(s.float(), t.float(), onehot(y, c).float(), eps, T)
    assert got.dtype == torch.float32
    theirs = o_ofa_loss(s.float(), t.float(), F.one_hot(y, c), eps, T)
    assert got.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_ofa_loss_at_eps_1_is_kd_plus_the_teachers_entropy():
    """−Σ p_t log p_s = KL(p_t ‖ p_s) + H(p_t), and kd_loss is T²·KL."""
    s, t, y = draw(6, 9, seed=5)
    T = 3.0
    p_t = torch.softmax(t / T, dim=1)
    entropy = -(p_t * p_t.log()).sum(dim=1).mean()
    want = kd_loss(s, t, T).double() / T ** 2 + entropy
    assert ofa_loss(s, t, onehot(y, 9), 1.0, T).item() == pytest.approx(want.item(), rel=1e-6)


def test_ofa_loss_stays_finite_where_os_log_of_softmax_overflows():
    # a student probability of e^-200 is 0 in float32: O's log(softmax) is −inf there
    s = torch.tensor([[0.0, 200.0]])
    t = torch.zeros(1, 2)
    mask = torch.tensor([[0.0, 1.0]])
    assert math.isinf(o_ofa_loss(s, t, mask, 1.0).item())
    got = ofa_loss(s, t, mask, 1.0).item()
    assert got == pytest.approx(ofa_direct([[0.0, 200.0]], [[0.0, 0.0]], [1], 1.0, 1.0))
    assert got == pytest.approx(100.0, rel=1e-6)  # ½·200 + ½·0


def test_ofa_loss_differs_with_the_label_and_the_teacher_gets_no_gradient():
    s, t, y = draw(4, 10, seed=4)
    a = ofa_loss(s, t, onehot(y, 10), 1.5)
    b = ofa_loss(s, t, onehot((y + 1) % 10, 10), 1.5)
    assert a.item() != pytest.approx(b.item(), rel=1e-3)


@pytest.mark.parametrize("eps,T", [(1.0, 1.0), (1.5, 2.0)])
@pytest.mark.parametrize("b", [2, 4])
def test_ofa_loss_gradient_matches_finite_differences(eps, T, b):
    check_logit_gradient(lambda s, t, y: ofa_loss(s.float(), t.float(), onehot(y, 6), eps, T),
                         lambda s, t, y: ofa_direct(lists(s), lists(t), y.tolist(), eps, T), b)


# ---- options ---------------------------------------------------------------------------------

def test_defaults_are_os_train_py_and_the_terms_are_weighted_apart():
    config = method_config("ofa")["ofa"]
    assert config == {"weight": 1.0, "ce_weight": None,
                      "stages": STAGES3, "eps": 1.0,
                      "temperature": 1.0, "logit_weight": 1.0, "branch": "conv",
                      "last_stage": None}
    method = build_method("ofa", method_config("ofa"))
    assert method.taps == ("stage1", "stage2", "stage3", "pool", "logits")
    assert method.needs.labels
    assert method.eps == (1.0,) * 4
    assert method.term_weights(0, 300) == {"ofa_stages": 1.0, "ofa_logits": 1.0}
    other = composition.configured("ofa", {"ofa": {"weight": 0.5, "logit_weight": 2.0,
                                                   "eps": [1, 1.2, 1.5, 2]}})
    assert other.term_weights(7, 300) == {"ofa_stages": 0.5, "ofa_logits": 2.0}
    assert other.eps == (1.0, 1.2, 1.5, 2.0)


def test_stages_count_down_to_the_last_stage():
    four = OFA(stages=STAGES4)  # O's 4 − k
    assert [four.downsamplings(s) for s in four.stages] == [3, 2, 1, 0]
    assert [four.token_blocks(s) for s in four.stages] == [3, 2, 1, 1]
    three = OFA()  # the default: a CIFAR ResNet's last stage is stage3
    assert [three.downsamplings(s) for s in three.stages] == [2, 1, 0]
    assert [three.token_blocks(s) for s in three.stages] == [2, 1, 1]
    subset = OFA(stages=["stage1", "stage3"], last_stage=4)
    assert [subset.downsamplings(s) for s in subset.stages] == [3, 1]
    assert [subset.token_blocks(s) for s in subset.stages] == [3, 1]


@pytest.mark.parametrize("options,match", [
    ({"stages": "stage1"}, "accepted: a list of strings"),
    ({"stages": []}, "at least one tap"),
    ({"stages": ["stage1", "feat"]}, "stage<k>"),
    ({"stages": ["stage1", "stage1"]}, "twice"),
    ({"eps": [1.0, 1.0]}, "one number or 4"),
    ({"eps": 0.0}, "eps must be a finite number > 0"),
    ({"eps": [1, -1, 1, 1]}, "eps must be a finite number > 0"),
    ({"temperature": 0}, "temperature must be"),
    ({"logit_weight": -1.0}, "logit_weight must be"),
    ({"branch": "vit"}, "branch must be one of conv, tokens"),
    ({"last_stage": 2}, r"last_stage must be an integer >= the highest stage in stages \(3\)"),
    ({"eps": "big"}, "accepted: a number or a list of numbers"),
])
def test_bad_options_are_one_line_config_errors(options, match):
    with pytest.raises(KtBenchError, match=match) as info:
        build_method("ofa", {"ofa": options})
    assert "\n" not in str(info.value) and str(info.value).startswith("method 'ofa'")


def test_the_token_branch_without_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm.models.vision_transformer", None)
    composition.assert_config_error("ofa", {"branch": "tokens"},
                                    r"^method 'ofa': branch 'tokens' needs timm: "
                                    r"pip install 'kt-bench\[timm\]'$")
    build_method("ofa", {"ofa": {"branch": "conv"}})  # the conv branch never imports timm


# ---- the projector branches ------------------------------------------------------------------

def _prepared(teacher: str, student: str, options: dict, size: int = 32, classes: int = 10):
    torch.manual_seed(0)
    t, s = build_model(teacher, classes), build_model(student, classes)
    x = torch.randn(2, 3, size, size, generator=composition.gen(1))
    method = composition.configured("ofa", {"ofa": options})
    composition.prepare(method, s, t, x, num_classes=classes)
    return method, s, t, x


def _sepconv_channels(projector: nn.Sequential) -> list[tuple[int, int]]:
    return [(m.op[0].in_channels, m.op[5].out_channels) for m in projector
            if isinstance(m, SepConv)]


def _projected(method: OFA, student: nn.Module, x: torch.Tensor) -> dict[str, tuple]:
    """Each stage's projector output shape on the student's taps of ``x``."""
    recorder = TapRecorder(student, student.tap_map, method.taps)
    try:
        student.eval()
        method.eval()
        with torch.no_grad():
            taps = recorder.collect(student(x))
            return {k: tuple(method.projectors[k](taps[k]).shape) for k in method.stages}
    finally:
        recorder.remove()


def test_conv_branch_of_a_three_stage_student():
    # resnet20 (stage widths 16/32/64, pooled 64) under wrn_40_2 (pooled 128)
    method, student, _, x = _prepared("wrn_40_2", "resnet20", {})  # stage1..3: the default
    p = method.projectors
    assert _sepconv_channels(p["stage1"]) == [(16, 32), (32, 128)]
    assert _sepconv_channels(p["stage2"]) == [(32, 128)]
    conv = p["stage3"][0]
    assert isinstance(conv, nn.Conv2d) and (conv.in_channels, conv.out_channels) == (64, 128)
    assert conv.kernel_size == (1, 1) and conv.bias is not None
    for proj in p.values():
        assert isinstance(proj[-1], nn.Linear) and (proj[-1].in_features,
                                                    proj[-1].out_features) == (128, 10)
    assert _projected(method, student, x) == {k: (2, 10) for k in STAGES3}


def test_conv_branch_of_a_four_stage_student():
    # tv_resnet18 (O's ResNet-18: 64/128/256/512, pooled 512) under mobilenetv2 (pooled 1280)
    method, student, _, x = _prepared("mobilenetv2", "tv_resnet18", {"stages": STAGES4})
    p = method.projectors
    assert _sepconv_channels(p["stage1"]) == [(64, 128), (128, 256), (256, 1280)]
    assert _sepconv_channels(p["stage2"]) == [(128, 256), (256, 1280)]
    assert _sepconv_channels(p["stage3"]) == [(256, 1280)]
    assert (p["stage4"][0].in_channels, p["stage4"][0].out_channels) == (512, 1280)
    assert _projected(method, student, x) == {f"stage{k}": (2, 10) for k in range(1, 5)}
    # O's init_weights
    for m in p.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0)
    assert p["stage1"][-1].weight.std().item() == pytest.approx(0.02, rel=0.05)
    pointwise = p["stage1"][2].op[5].weight  # 256 -> 1280: Kaiming fan_out std √(2/1280)
    assert pointwise.std().item() == pytest.approx(math.sqrt(2 / 1280), rel=0.05)


def _token_layout(projector: nn.Sequential) -> tuple[list, int, bool]:
    """(the mergers' (in, out, act), the number of blocks, whether a Linear widens first)."""
    mergers = [(m.reduction.in_features // 4, m.reduction.out_features,
                type(m.act).__name__) for m in projector.modules() if isinstance(m, PatchMerging)]
    blocks = sum(type(m).__name__ == "Block" for m in projector.modules())
    widen = isinstance(projector[1], nn.Linear)
    return mergers, blocks, widen


def test_token_branch_of_a_three_stage_student():
    pytest.importorskip("timm")
    # resnet20 at 32x32: maps 32, 16 and 8 wide, merged to 8 (int(log2(grid / 7)) merges)
    method, student, _, x = _prepared("resnet56", "resnet20",
                                      {"branch": "tokens"})
    p = method.projectors
    assert _token_layout(p["stage1"]) == ([(16, 64, "GELU"), (64, 64, "Identity")], 2, False)
    assert _token_layout(p["stage2"]) == ([(32, 64, "GELU")], 1, False)
    assert _token_layout(p["stage3"]) == ([], 1, False)
    assert all(isinstance(proj[-2], TokenMean) for proj in p.values())
    assert _projected(method, student, x) == {k: (2, 10) for k in STAGES3}


def test_token_branch_of_a_four_stage_student():
    pytest.importorskip("timm")
    # tv_resnet18 at 112x112: maps 28, 14, 7 and 4 wide; the two last need no merging, and
    # stage3's 256 channels are widened to the student's 512 by a Linear
    method, student, _, x = _prepared("mobilenetv2", "tv_resnet18",
                                      {"stages": STAGES4, "branch": "tokens"},
                                      size=112)
    p = method.projectors
    assert _token_layout(p["stage1"]) == ([(64, 512, "GELU"), (512, 512, "Identity")], 3, False)
    assert _token_layout(p["stage2"]) == ([(128, 512, "GELU")], 2, False)
    assert _token_layout(p["stage3"]) == ([], 1, True)
    assert _token_layout(p["stage4"]) == ([], 1, False)
    assert _projected(method, student, x) == {f"stage{k}": (2, 10) for k in range(1, 5)}


@pytest.mark.parametrize("shape,match", [((2, 8, 16, 8), "square maps"),
                                         ((2, 8, 30, 30), "odd grid of 15"),
                                         ((2, 8, 8, 8), "no multiple of 4")])
def test_token_branch_refuses_maps_it_cannot_take(shape, match):
    pytest.importorskip("timm")
    method = OFA(stages=["stage1"], branch="tokens")
    width = 66 if "multiple" in match else 64
    shapes = {"stage1": torch.Size(shape), "pool": torch.Size([2, width]),
              "logits": torch.Size([2, 10])}
    with pytest.raises(NotApplicable, match=match):
        method.setup(shapes, shapes)


def test_a_tap_that_is_no_map_is_a_one_line_error():
    method = OFA(stages=["stage1"])
    shapes = {"stage1": torch.Size([2, 16]), "pool": torch.Size([2, 16]),
              "logits": torch.Size([2, 10])}
    with pytest.raises(KtBenchError, match=r"needs \(B, C, H, W\) maps; the student's stage1 "
                                           r"has shape \(2, 16\)"):
        method.setup(shapes, shapes)


def test_the_labels_reach_ofa():
    # eps 1 would ignore the labels (the teacher's soft labels alone)
    method, student, teacher, x = _prepared("resnet20", "resnet8",
                                            {"eps": 1.5})
    y = torch.tensor([1, 7])
    recorder = TapRecorder(student, student.tap_map, method.taps)
    student.eval()
    method.eval()
    with torch.no_grad():
        student_taps = recorder.collect(student(x))
    recorder.remove()
    teacher_taps = composition.read_teacher(method, teacher, x)
    with torch.no_grad():
        a = method.terms(student_taps, teacher_taps, Batch(y))
        b = method.terms(student_taps, teacher_taps, Batch((y + 3) % 10))
    assert set(a) == {"ofa_stages", "ofa_logits"}
    want = ofa_loss(student_taps["logits"], teacher_taps["logits"],
                    F.one_hot(y, 10).float(), 1.5)
    assert a["ofa_logits"].item() == pytest.approx(want.item(), rel=1e-6)
    assert a["ofa_stages"].item() != pytest.approx(b["ofa_stages"].item(), rel=1e-4)


# ---- against O's OFA.forward -----------------------------------------------------------------

def _copy_in_order(ours: nn.Module, theirs: nn.Module) -> None:
    """``theirs`` holds ``ours``'s parameters and buffers, matched in order (layouts differ
    only in names), each of the same shape."""
    a, b = list(ours.state_dict().values()), list(theirs.state_dict().values())
    assert [t.shape for t in a] == [t.shape for t in b]
    with torch.no_grad():
        for src, dst in zip(a, b, strict=True):
            dst.copy_(src)


def _o_projectors(method: OFA, student: nn.Module, x: torch.Tensor, width_t: int,
                  last: int, tokens: bool) -> dict[int, nn.Module]:
    """O's projectors for the method's stages, built by O's rules from O's own view of the
    student (its stage features and pooled width), holding the method's weights."""
    feats = tv_resnet_feats if isinstance(student, ResNet) else cifar_feats
    with torch.no_grad():
        logits, feat = feats(student, x)
    width_s, classes = feat[-1].shape[1], logits.shape[1]
    out = {}
    for name in method.stages:
        k = int(name.removeprefix("stage"))
        c, h, w = feat[k - 1].shape[1:]
        if tokens:
            proj = o_vit_projector(k, h * w, c, width_s, classes, last)
            _copy_in_order(method.projectors[name], proj)
        else:
            proj = o_cnn_projector(k, c, width_s, width_t, classes, last)
            proj.load_state_dict(method.projectors[name].state_dict())  # O's layout exactly
        out[k] = proj.train()
    return out


CASES = {
    # O's ResNet-18 student (a CNN teacher: a wider pooled feature) at O's train.py defaults,
    # and at the eps of O's README (ImageNet)
    "resnet18-4-stages": ("mobilenetv2", "tv_resnet18", {"stages": STAGES4}, 4, 1280, False),
    "resnet18-4-stages-eps1.5": ("mobilenetv2", "tv_resnet18", {"stages": STAGES4, "eps": 1.5},
                                 4, 1280, False),
    # a 3-stage CIFAR student under a wider teacher, every option away from its default
    "cifar-3-stages": ("wrn_16_2", "resnet8",
                       {"eps": [1.2, 1.5, 1.0, 2.0], "temperature": 2.0,
                        "weight": 0.5, "logit_weight": 2.0}, 3, 128, False),
    "cifar-3-stages-tokens": ("resnet20", "resnet8",
                              {"branch": "tokens", "eps": 1.5}, 3, 64, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ofa_loss_and_gradients_equal_os(case):
    teacher_name, student_name, options, last, width_t, tokens = CASES[case]
    if tokens:
        pytest.importorskip("timm")
    teacher, student, x, y = composition.reference_models(teacher_name, student_name)
    method = composition.prepare(composition.configured("ofa", {"ofa": options}), student,
                                 teacher, x, y)
    ours = composition.one_step(method, student, teacher, x, y).loss
    projectors = _o_projectors(method, student, x, width_t, last, tokens)
    feats = tv_resnet_feats if student_name.startswith("tv_") else cifar_feats
    stages = [int(s.removeprefix("stage")) for s in method.stages]
    eps = options.get("eps", 1.0)
    eps = eps if isinstance(eps, list) else [eps]
    weights = {"temperature": options.get("temperature", 1.0),
               "ofa_loss_weight": options.get("weight", 1.0),
               "kd_loss_weight": options.get("logit_weight", 1.0)}
    student.train()
    theirs = o_ofa_total(student, teacher, x, y, feats, projectors, stages, eps, tokens=tokens,
                         **weights)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    our_params = [*student.parameters(), *method.projectors.parameters()]
    their_params = [*student.parameters(),
                    *(p for k in stages for p in projectors[k].parameters())]
    assert_same_gradients(ours, theirs, our_params, their_params, 1e-4)
    # the comparison can fail: O's total without its logit term is another number
    other = o_ofa_total(student, teacher, x, y, feats, projectors, stages, eps, tokens=tokens,
                        **{**weights, "kd_loss_weight": 0.0})
    assert other.item() != pytest.approx(ours.item(), rel=1e-3)


# ---- through the command line ----------------------------------------------------------------

GRID = """
name = "ofa-digits"
description = "ofa on digits, one epoch"
datasets = [{ name = "digits", image_size = 8 }]
methods = ["ofa"]
seeds = [0]

[[pairs]]
teacher = "resnet20"
student = { name = "resnet8", width = 0.5 }

[recipe]
epochs = 1
batch_size = 64
lr = 0.05

[teacher_recipe]
epochs = 1
"""


def test_a_one_epoch_run_of_ofa_gives_an_ok_row(tmp_path, capsys):
    grid = tmp_path / "ofa.toml"
    grid.write_text(textwrap.dedent(GRID))  # ofa's defaults on a 3-stage CIFAR pair
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out), "--device",
                           "cpu", "--no-report")
    assert code == 0, err
    rows = pd.read_csv(out / "results.csv", keep_default_na=False).set_index("method")
    assert rows.loc["ofa", "status"] == "ok", rows.loc["ofa", "error"]
    assert 0.0 <= float(rows.loc["ofa", "top1"]) <= 100.0
