"""``fsp``: the FSP matrix and loss against loop-level formulas, RepDistiller's and finite
differences, its first tap against R's f0, both stages of a configured method against an
independent re-statement of RepDistiller's (tests/ref_repdistiller_init.py), its
initialisation stage through the engine, and pairs of unequal channel counts (``n/a``)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from kt_bench.methods.fsp import FSP, fsp_loss, fsp_matrix

from kt_bench.api.method import NotApplicable, build_method, method_config
from kt_bench.commands.main import main
from kt_bench.models import build_model
from kt_bench.models.taps import TapRecorder

from ..conftest import write_tiny_grid
from ..ref_repdistiller_init import R_INIT_EPOCHS, r_fsp
from ..repdistiller_ref import repdistiller_feats
from . import stages
from .composition import assert_config_error, gen, prepare

# ---- fsp_matrix, fsp_loss --------------------------------------------------------------------

def _fsp_loops(a: torch.Tensor, b: torch.Tensor) -> list:
    h = min(a.shape[2], b.shape[2])
    pa, pb = stages.pool_loops(a, h), stages.pool_loops(b, h)
    return [[[sum(pa[n][i][y][x] * pb[n][j][y][x] for y in range(h) for x in range(h)) / (h * h)
              for j in range(b.shape[1])] for i in range(a.shape[1])] for n in range(a.shape[0])]


@pytest.mark.parametrize("a_shape,b_shape", [((2, 3, 4, 4), (2, 5, 4, 4)),
                                             ((2, 2, 4, 4), (2, 3, 2, 2)),
                                             ((3, 4, 2, 2), (3, 1, 4, 4))])
def test_fsp_matrix_is_the_mean_product_over_positions(a_shape, b_shape):
    g = gen(sum(a_shape) + sum(b_shape))
    a = torch.randn(*a_shape, dtype=torch.float64, generator=g)
    b = torch.randn(*b_shape, dtype=torch.float64, generator=g)
    got = fsp_matrix(a, b)
    assert got.shape == (a_shape[0], a_shape[1], b_shape[1])
    want = torch.tensor(_fsp_loops(a, b), dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_fsp_loss_sums_the_pairs_mean_squared_differences():
    g = gen(7)
    shapes_s = [(2, 3, 4, 4), (2, 3, 4, 4), (2, 2, 2, 2)]
    feats_s = [torch.randn(*s, dtype=torch.float64, generator=g) for s in shapes_s]
    feats_t = [torch.randn(*s, dtype=torch.float64, generator=g) for s in shapes_s]
    want = 0.0
    for k in range(2):
        g_s = _fsp_loops(feats_s[k], feats_s[k + 1])
        g_t = _fsp_loops(feats_t[k], feats_t[k + 1])
        flat = [(x - y) ** 2 for n in range(2) for i in range(len(g_s[0]))
                for x, y in zip(g_s[n][i], g_t[n][i], strict=True)]
        want += sum(flat) / len(flat)
    assert fsp_loss(feats_s, feats_t).item() == pytest.approx(want, rel=1e-12)
    assert fsp_loss(feats_s, feats_s).item() == 0.0
    # and R's FSP (its (C_top, C_bot) layout) gives the same
    assert fsp_loss(feats_s, feats_t).item() == pytest.approx(
        sum(r_fsp(feats_s, feats_t)).item(), rel=1e-12)


def test_fsp_gradients_match_finite_differences_and_skip_the_teacher():
    g = gen(8)
    shapes = [(2, 2, 4, 4), (2, 3, 2, 2), (2, 2, 2, 2)]
    s = [torch.randn(*sh, dtype=torch.float64, generator=g) for sh in shapes]
    t = [torch.randn(*sh, dtype=torch.float64, generator=g).requires_grad_(True)
         for sh in shapes]
    for k in range(3):
        def fn(v, k=k):
            return fsp_loss([v if i == k else s[i] for i in range(3)], t)
        stages.check_gradient(fn, s[k], rel=1e-5)
    fsp_loss([x.clone().requires_grad_(True) for x in s], t).backward()
    assert all(x.grad is None for x in t)
    b = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=g)
    stages.check_gradient(lambda v: fsp_matrix(v, b).pow(2).sum(), s[0], rel=1e-5)


def test_fsp_loss_rejects_unequal_lists_and_channels():
    with pytest.raises(ValueError, match="length"):
        fsp_loss([torch.randn(2, 3, 2, 2)] * 2, [torch.randn(2, 3, 2, 2)] * 3)
    with pytest.raises(ValueError, match="equal channel"):
        fsp_loss([torch.randn(2, 3, 2, 2)] * 2, [torch.randn(2, 4, 2, 2)] * 2)


def test_the_math_is_float32_under_bf16():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert fsp_loss([a.bfloat16(), a.bfloat16()], [b.bfloat16(), b.bfloat16()]).dtype == (
        torch.float32)


# ---- options ---------------------------------------------------------------------------------

def test_defaults_are_rs():
    assert method_config("fsp")["fsp"] == {
        "weight": 1.0, "layers": ["stage0", "stage1", "stage2", "stage3"],
        "init_epochs": R_INIT_EPOCHS, "init_lr": None, "ce_weight": None}
    assert build_method("fsp").needs.init.trains_student is True


@pytest.mark.parametrize("options,match", [({"layers": ["stage1"]}, "at least 2"),
                                           ({"unknown": 1}, "unknown")])
def test_bad_options_are_config_errors(options, match):
    assert_config_error("fsp", options, match)


def test_fsp_adds_nothing_in_the_main_stage():
    stages.check_stage_weights(FSP(), {"fsp": 1.0}, {})


# ---- R's f0 as the stage0 tap ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet20", "wrn_16_2", "vgg8"])
def test_stage0_is_rs_f0(name):
    model = build_model(name, 100).eval()
    x = torch.randn(2, 3, 32, 32, generator=gen(0))
    recorder = TapRecorder(model, model.tap_map, ("stage0",))  # FSP's first layer
    with torch.no_grad():
        taps = recorder.collect(model(x))
        feats, _ = repdistiller_feats(model, x)
    recorder.remove()
    assert torch.equal(taps["stage0"], feats[0])


# ---- the one known difference from R's stages ------------------------------------------------

def test_known_deviation_is_only_the_final_bn_statistics():
    """The WRN exception of the stage comparison touches buffers of the final BN only, never
    a parameter."""
    model = build_model("wrn_16_2", 100)
    names = {n for n, _ in model.named_parameters()}
    assert not (stages.KNOWN[("fsp", "wrn_16_2")] & names)
    assert stages.KNOWN[("fsp", "wrn_16_2")] <= set(model.state_dict())


# ---- both stages against R's, and through the engine -----------------------------------------

class TestInitialisationStage(stages.InitialisationStageTests):
    """``fsp``'s two stages: one batch of each against R's, and runs through the engine."""

    name = "fsp"
    pairs = [("resnet56", "resnet20"), ("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2")]


# ---- where the channel counts differ ---------------------------------------------------------

def test_fsp_on_wrn_40_2_to_wrn_40_1_is_not_applicable():
    teacher = build_model("wrn_40_2", 100)
    student = build_model("wrn_40_1", 100)
    x = torch.randn(2, 3, 32, 32, generator=gen(0))
    method = build_method("fsp", method_config("fsp", {"fsp": stages.GRID_OPTIONS["fsp"]}))
    with pytest.raises(NotApplicable, match=r"stage1 \(16 vs 32\)"):
        prepare(method, student, teacher, x)
    # R refuses the same pair
    with torch.no_grad():
        feat_s, _ = repdistiller_feats(student.eval(), x)
        feat_t, _ = repdistiller_feats(teacher.eval(), x)
    with pytest.raises(ValueError, match="num of channels not equal"):
        r_fsp(feat_s[:-1], feat_t[:-1])


def test_fsp_with_unequal_channels_gives_an_n_a_row(tmp_path, capsys):
    grid = write_tiny_grid(tmp_path, methods=("student", "fsp"))  # width 0.5 -> 0.25
    out = tmp_path / "out"
    assert main(["run", "--grid", str(grid), "--out", str(out), "--no-report"]) == 0
    rows = pd.read_csv(out / "results.csv", keep_default_na=False).set_index("method")
    assert rows.loc["fsp", "status"] == "n/a"
    assert "FSP needs equal student and teacher channel counts" in rows.loc["fsp", "error"]
    assert rows.loc["student", "status"] == "ok"
