"""Sanity checks of the RepDistiller re-statement in tests/repdistiller_ref.py itself."""

import pytest
import torch
import torch.nn.functional as F

from kt_bench.models import build_model
from kt_bench.models.taps import TapRecorder
from tests.repdistiller_ref import (
    R_FLAGS,
    make_r_convreg,
    r_at,
    r_hint,
    r_kd,
    r_nst,
    repdistiller_feats,
    repdistiller_loss,
)

# R's feature shapes (C, H, W) or (C,) at 32x32 inputs, per R's models/*.py forward.
SHAPES = {
    "resnet20": [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)],
    "wrn_40_1": [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)],
    "vgg8": [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4), (512,)],
}
# Which kt-bench tap is R's f_i (index -> tap); R's f0 has no kt-bench tap.
TAP_OF = {
    "resnet20": {1: "stage1", 2: "stage2", 3: "stage3", 4: "pool"},
    "wrn_40_1": {1: "stage1", 2: "stage2", 3: "stage3", 4: "pool"},
    "vgg8": {1: "stage1", 2: "stage2", 3: "stage3", 4: "stage4", 5: "pool"},
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, 100)


@pytest.mark.parametrize("name", list(SHAPES))
def test_feats_have_rs_count_and_shapes_and_logits_match_forward(name):
    model = _model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, logits = repdistiller_feats(model, x)
        assert [tuple(f.shape[1:]) for f in feats] == SHAPES[name]
        torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(SHAPES))
def test_feats_equal_kt_bench_taps(name):
    model = _model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    taps = sorted(set(model.tap_map))
    with torch.no_grad():
        feats, _ = repdistiller_feats(model, x)
        rec = TapRecorder(model, model.tap_map, taps)
        got = rec.collect(model(x))
        rec.remove()
    for i, tap in TAP_OF[name].items():
        torch.testing.assert_close(feats[i], got[tap], rtol=1e-4, atol=1e-5, msg=f"f{i} vs {tap}")
    if name == "wrn_40_1":  # R's f3 is the raw block3 sum, not the final BN-ReLU ("feat")
        assert not torch.allclose(feats[3], got["feat"])
        torch.testing.assert_close(F.relu(model.bn(feats[3])), got["feat"])


def test_kd_nst_at_hint_are_zero_for_equal_inputs_and_positive_otherwise():
    torch.manual_seed(1)
    logits = torch.randn(4, 10)
    f = torch.randn(4, 8, 8, 8).relu()
    assert r_kd(logits, logits).abs() < 1e-6
    assert r_nst(f, f).abs() < 1e-6
    assert r_at(f, f) == 0 and r_hint(f, f) == 0
    g = torch.randn(4, 8, 8, 8).relu()
    assert r_kd(logits, torch.randn(4, 10)) > 0
    assert r_nst(f, g) > 0 and r_at(f, g) > 0


def test_kd_matches_kl_div_sum_times_t_squared_over_batch():
    torch.manual_seed(2)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    want = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="sum") * 16 / 5
    torch.testing.assert_close(r_kd(s, t, 4.0), want)


def test_at_and_nst_pool_the_larger_map_down():
    torch.manual_seed(3)
    big, small = torch.randn(2, 4, 16, 16), torch.randn(2, 6, 8, 8)
    pooled = F.adaptive_avg_pool2d(big, 8)
    torch.testing.assert_close(r_at(big, small), r_at(pooled, small))
    torch.testing.assert_close(r_nst(small, big), r_nst(small, pooled))


def test_convreg_rules():
    same = make_r_convreg((2, 16, 8, 8), (2, 32, 8, 8))
    assert same.conv.kernel_size == (1, 1) and same.conv.bias is not None
    assert sorted(same.state_dict()) == sorted([
        "conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
        "bn.running_var", "bn.num_batches_tracked"])
    down = make_r_convreg((2, 16, 16, 16), (2, 32, 8, 8))
    assert down.conv.kernel_size == (3, 3) and down.conv.stride == (2, 2)
    up = make_r_convreg((2, 16, 8, 8), (2, 32, 16, 16))
    assert isinstance(up.conv, torch.nn.ConvTranspose2d)
    assert up(torch.randn(2, 16, 8, 8)).shape == (2, 32, 16, 16)
    odd = make_r_convreg((2, 16, 10, 10), (2, 32, 8, 8))
    assert odd.conv.kernel_size == (3, 3) and odd(torch.randn(2, 16, 10, 10)).shape[-1] == 8


@pytest.mark.parametrize("method", list(R_FLAGS))
def test_loss_composition(method):
    student, teacher = _model("resnet20"), _model("wrn_40_1")
    student.eval()  # the reference puts it in train mode and restores eval afterwards
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    loss = repdistiller_loss(method, student, teacher, x, y)
    assert not student.training and loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert student.conv1.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    if method in ("student", "fitnet", "at", "nst_poly"):
        gamma, alpha, beta = R_FLAGS[method]
        student.train()
        with torch.no_grad():
            _, logit_s = repdistiller_feats(student, x)
        ce = F.cross_entropy(logit_s, y)
        if method == "student":
            torch.testing.assert_close(loss.detach(), ce)
        else:
            assert loss.item() > ce.item()  # beta * a positive feature loss on top of CE


@pytest.mark.parametrize("name", ["resnet20", "wrn_16_2", "vgg8"])
def test_stage0_is_repdistillers_f0(name):
    """The stem output, R's feat[0] (FSP pairs it with stage1)."""

    model = build_model(name, 100).eval()
    x = torch.randn(2, 3, 32, 32)
    feats, _ = repdistiller_feats(model, x)
    rec = TapRecorder(model, model.tap_map, ("stage0",))
    taps = rec.collect(model(x))
    torch.testing.assert_close(taps["stage0"], feats[0])
