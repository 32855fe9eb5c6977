"""``ab``: the hinge loss against a loop-level formula and finite differences, its connectors
against RepDistiller's, its taps against R's pre-activation features, both stages of a
configured method against an independent re-statement of RepDistiller's
(tests/ref_repdistiller_init.py), and its initialisation stage through the engine."""

from __future__ import annotations

import pytest
import torch
from kt_bench.methods.ab import AB, ab_loss, build_connector, stage_weights
from torch import nn

from kt_bench.api.method import build_method, method_config
from kt_bench.models import build_model
from kt_bench.models.taps import TapRecorder

from ..ref_repdistiller_init import R_INIT_EPOCHS, RConnector, repdistiller_preact_feats
from . import stages
from .composition import assert_config_error, gen

# ---- ab_loss ---------------------------------------------------------------------------------

def _ab_loops(s: torch.Tensor, t: torch.Tensor, m: float) -> float:
    total = 0.0
    for a, b in zip(s.flatten().tolist(), t.flatten().tolist(), strict=True):
        if b <= 0 and a > -m:
            total += (a + m) ** 2
        if b > 0 and a <= m:
            total += (a - m) ** 2
    return total


@pytest.mark.parametrize("shape,margin", [((2, 3, 4, 4), 1.0), ((3, 5, 2, 3), 0.5),
                                          ((2, 1, 1, 1), 2.0)])
def test_ab_loss_is_the_margin_squared_hinge_sum(shape, margin):
    g = gen(sum(shape))
    s = torch.randn(*shape, dtype=torch.float64, generator=g) * 2
    t = torch.randn(*shape, dtype=torch.float64, generator=g)
    assert ab_loss(s, t, margin).item() == pytest.approx(_ab_loops(s, t, margin), rel=1e-12)
    # beyond the margin on the teacher's side: nothing to learn
    done = torch.where(t > 0, margin + 0.1 + s.abs(), -margin - 0.1 - s.abs())
    assert ab_loss(done, t, margin).item() == 0.0


def test_ab_loss_by_hand():
    s = torch.tensor([0.5, -2.0, 3.0, -0.2])
    t = torch.tensor([1.0, -1.0, -1.0, 0.0])
    # (0.5 − 1)² (teacher on, below the margin); 0 (off, beyond −1); (3 + 1)² (off, above −1);
    # (−0.2 + 1)² (t = 0 counts as off)
    assert ab_loss(s, t).item() == pytest.approx(0.25 + 16.0 + 0.64)


def test_ab_loss_gradient_matches_finite_differences_and_skips_the_teacher():
    g = gen(3)
    s = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g) * 2
    s = torch.where((s.abs() - 1).abs() < 0.05, s + 0.2, s)  # away from the kinks at ±margin
    t = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g)
    stages.check_gradient(lambda v: ab_loss(v, t), s)
    t_var = t.clone().requires_grad_(True)
    ab_loss(s.clone().requires_grad_(True), t_var).backward()
    assert t_var.grad is None


def test_ab_loss_rejects_unequal_shapes():
    with pytest.raises(ValueError, match="one shape"):
        ab_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4))


@pytest.mark.parametrize("n,weights", [(3, [0.25, 0.5, 1.0]), (4, [0.125, 0.25, 0.5, 1.0])])
def test_stage_weights_are_rs(n, weights):
    assert stage_weights(n) == weights


def test_the_math_is_float32_under_bf16():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert ab_loss(a.bfloat16(), b.bfloat16()).dtype == torch.float32


# ---- the connectors against R's --------------------------------------------------------------

@pytest.mark.parametrize("s_shape,t_shape", [((2, 16, 8, 8), (2, 32, 8, 8)),
                                             ((2, 16, 8, 8), (2, 16, 4, 4)),
                                             ((2, 16, 4, 4), (2, 8, 8, 8))])
def test_a_connector_equals_rs_convreg_without_relu(s_shape, t_shape):
    g = gen(s_shape[1] + t_shape[2])
    torch.manual_seed(0)
    ours = nn.ModuleList([build_connector(torch.Size(s_shape), torch.Size(t_shape))])
    ref = RConnector([s_shape], [t_shape])
    ref.connectors.load_state_dict(ours.state_dict())  # same layers, same names
    x = torch.randn(*s_shape, generator=g) - 0.5
    out = ours[0](x)
    assert out.shape[1:] == t_shape[1:]
    assert torch.allclose(out, ref([x])[0], rtol=1e-6, atol=1e-6)
    assert (out < 0).any()  # no ReLU at the end


def test_equal_shapes_need_no_connector():
    shape = torch.Size((2, 16, 8, 8))
    assert isinstance(build_connector(shape, shape), nn.Identity)


# ---- options ---------------------------------------------------------------------------------

def test_defaults_are_rs():
    assert method_config("ab")["ab"] == {
        "weight": 1.0, "layers": ["stage1_pre", "stage2_pre", "stage3_pre"], "margin": 1.0,
        "init_epochs": R_INIT_EPOCHS, "init_lr": None, "ce_weight": None}
    assert build_method("ab").needs.init.trains_student is True


@pytest.mark.parametrize("options,match", [
    ({"margin": -1.0}, "margin"), ({"init_lr": 0.0}, "init_lr"),
    ({"layers": "stage1_pre"}, "layers"), ({"init_epochs": -1}, "init_epochs"),
])
def test_bad_options_are_config_errors(options, match):
    assert_config_error("ab", options, match)


def test_ab_adds_nothing_in_the_main_stage():
    stages.check_stage_weights(AB(), {"ab": 1.0}, {})


def test_preact_taps_are_rs_preact_features():
    """The taps AB reads are R's preact=True stage features (re-stated independently)."""
    for name, n in (("resnet20", 3), ("vgg8", 4), ("wrn_16_2", 3)):
        model = build_model(name, 100).eval()
        x = torch.randn(2, 3, 32, 32, generator=gen(1))
        taps = [f"stage{k}_pre" for k in range(1, n + 1)]
        recorder = TapRecorder(model, model.tap_map, taps)
        with torch.no_grad():
            got = recorder.collect(model(x))
            feats, _ = repdistiller_preact_feats(model, x)
        recorder.remove()
        for k, tap in enumerate(taps, start=1):
            assert torch.allclose(got[tap], feats[k], rtol=1e-5, atol=1e-6), (name, tap)


# ---- both stages against R's, and through the engine -----------------------------------------

class TestInitialisationStage(stages.InitialisationStageTests):
    """``ab``'s two stages: one batch of each against R's, and runs through the engine."""

    name = "ab"
    pairs = [("resnet56", "resnet20"), ("vgg13", "vgg8"), ("resnet8x4", "resnet8")]
