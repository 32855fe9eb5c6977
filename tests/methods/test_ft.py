"""``ft``: the factor-transfer loss against a loop-level formula and finite differences, its
paraphraser and translator against RepDistiller's, both stages of a configured method against
an independent re-statement of RepDistiller's (tests/ref_repdistiller_init.py), and its
initialisation stage (which trains the paraphraser alone) through the engine."""

from __future__ import annotations

import math

import pytest
import torch
from kt_bench.methods.ft import FT, Paraphraser, Translator, factor_map, ft_loss
from torch import nn

from kt_bench.api.method import build_method, method_config

from ..ref_repdistiller_init import R_INIT_EPOCHS, RParaphraser, RTranslator, r_factor_transfer
from . import stages
from .composition import assert_config_error, gen

# ---- ft_loss ---------------------------------------------------------------------------------

def _factor_loops(f: torch.Tensor) -> list[list[float]]:
    b, c, h, w = f.shape
    out = []
    for n in range(b):
        q = [sum(f[n, k, y, x].item() ** 2 for k in range(c)) / c
             for y in range(h) for x in range(w)]
        norm = math.sqrt(sum(v * v for v in q))
        out.append([v / norm for v in q])
    return out


@pytest.mark.parametrize("s_shape,t_shape", [((2, 3, 4, 4), (2, 3, 4, 4)),
                                             ((2, 4, 4, 4), (2, 2, 2, 2)),
                                             ((3, 2, 2, 2), (3, 5, 4, 4))])
def test_ft_loss_is_the_mean_absolute_difference_of_normalised_factors(s_shape, t_shape):
    g = gen(sum(s_shape) * 3 + sum(t_shape))
    f_s = torch.randn(*s_shape, dtype=torch.float64, generator=g)
    f_t = torch.randn(*t_shape, dtype=torch.float64, generator=g)
    h = min(s_shape[2], t_shape[2])
    p_s = torch.tensor(stages.pool_loops(f_s, h), dtype=torch.float64)
    p_t = torch.tensor(stages.pool_loops(f_t, h), dtype=torch.float64)
    q_s, q_t = _factor_loops(p_s), _factor_loops(p_t)
    want = sum(abs(a - b) for n in range(len(q_s)) for a, b in zip(q_s[n], q_t[n], strict=True))
    want /= len(q_s) * h * h
    assert ft_loss(f_s, f_t).item() == pytest.approx(want, rel=1e-12)
    assert ft_loss(f_s, f_t).item() == pytest.approx(r_factor_transfer(f_s, f_t).item(),
                                                     rel=1e-12)
    assert torch.allclose(factor_map(p_s), torch.tensor(q_s, dtype=torch.float64))
    # invariant to a positive scale of either factor
    assert ft_loss(3 * f_s, f_t).item() == pytest.approx(ft_loss(f_s, f_t).item(), rel=1e-9)


def test_ft_loss_gradient_matches_finite_differences_and_skips_the_teacher():
    g = gen(9)
    f_s = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g)
    f_t = torch.randn(2, 2, 2, 2, dtype=torch.float64, generator=g).requires_grad_(True)
    stages.check_gradient(lambda v: ft_loss(v, f_t), f_s, rel=1e-5)
    ft_loss(f_s.clone().requires_grad_(True), f_t).backward()
    assert f_t.grad is None


def test_the_math_is_float32_under_bf16():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert ft_loss(a.bfloat16(), b.bfloat16()).dtype == torch.float32


# ---- the modules against R's -----------------------------------------------------------------

@pytest.mark.parametrize("c_s,c_t,rate", [(16, 64, 0.5), (8, 6, 0.5), (4, 10, 0.25)])
def test_paraphraser_and_translator_equal_rs(c_s, c_t, rate):
    g = gen(c_s + c_t)
    torch.manual_seed(1)
    para, trans = Paraphraser(c_t, rate), Translator(c_s, c_t, rate)
    r_para, r_trans = RParaphraser((1, c_t, 4, 4), rate), RTranslator((1, c_s), (1, c_t), rate)
    r_para.load_state_dict(para.state_dict())  # fails unless the layers line up
    r_trans.load_state_dict(trans.state_dict())
    f_t = torch.randn(2, c_t, 4, 4, generator=g)
    f_s = torch.randn(2, c_s, 4, 4, generator=g)
    factor, rec = para(f_t)
    r_factor, r_rec = r_para(f_t)
    assert factor.shape[1] == int(c_t * rate) and rec.shape == f_t.shape
    assert torch.allclose(factor, r_factor) and torch.allclose(rec, r_rec)
    assert torch.allclose(r_para(f_t, is_factor=True), factor)
    assert torch.allclose(trans(f_s), r_trans(f_s), atol=1e-6)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in para.modules()) == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in trans.modules()) == 3


# ---- options ---------------------------------------------------------------------------------

def test_defaults_are_rs():
    assert method_config("ft")["ft"] == {
        "weight": 200.0, "tap": "stage3", "rate": 0.5, "init_epochs": R_INIT_EPOCHS,
        "init_lr": None, "ce_weight": None}
    assert build_method("ft").needs.init.trains_student is False
    ft = build_method("ft", {"ft": {"init_lr": 0.01, "init_epochs": 3}})
    assert (ft.needs.init.lr, ft.needs.init_epochs) == (0.01, 3)


@pytest.mark.parametrize("options,match", [({"rate": 0.0}, "rate"),
                                           ({"init_lr": -0.1}, "init_lr")])
def test_bad_options_are_config_errors(options, match):
    assert_config_error("ft", options, match)


def test_a_rate_that_leaves_no_factor_channel_is_an_error():
    method = FT(rate=0.1)
    with pytest.raises(ValueError, match="no factor channel"):
        method.setup({"stage3": torch.Size([2, 8, 4, 4])}, {"stage3": torch.Size([2, 8, 4, 4])})


def test_ft_weighs_its_reconstruction_then_its_transfer_term():
    stages.check_stage_weights(FT(), {"ft.rec": 1.0}, {"ft": 200.0})


# ---- both stages against R's, and through the engine -----------------------------------------

class TestInitialisationStage(stages.InitialisationStageTests):
    """``ft``'s two stages: one batch of each against R's, and runs through the engine."""

    name = "ft"
    pairs = [("resnet56", "resnet20"), ("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2")]
