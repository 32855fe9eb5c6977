"""The crd-cifar100 grid's cells carry exactly the options each method's composition test
checked against its reference code (tests/methods/test_<method>.py)."""

from __future__ import annotations

import pytest

from kt_bench.api.method import method_config

from .methods.composition import CELLS


def _verified_options(name: str, pair: tuple[str, str]) -> dict | None:
    """The options each method's composition test checked against its reference code, for
    ``pair`` (None where the reference has no configuration for it)."""
    from .methods.mdistiller import grid_options as m_feature_grid_options
    from .methods.relational import grid_options as relational_grid_options
    from .methods.stages import grid_options as init_grid_options
    from .methods.test_crd import GRID_OPTIONS as CRD
    from .methods.trainable_parts import GRID_OPTIONS as CC_VID
    from .methods.trainable_parts import VGG_LAYERS
    from .ref_logit_methods import LS_KD_PAIRS, M_DKD_BETA

    if name in ("sp", "pkt", "rkd"):
        return relational_grid_options(pair, name)
    if name in ("ab", "ft", "fsp"):
        return init_grid_options(name, pair)
    if name in ("reviewkd", "ofd"):
        return m_feature_grid_options(name, pair)
    if name in ("cc", "vid"):
        options = dict(CC_VID[name])
        if name == "vid" and pair[0].startswith("vgg"):
            options["layers"] = VGG_LAYERS
        return options
    if name == "dkd":
        return {"beta": M_DKD_BETA[pair]} if pair in M_DKD_BETA else None
    if name == "crd":
        return CRD["crd"]
    if name == "kd_ls":
        T, weight = LS_KD_PAIRS[pair]
        return {"ce_weight": 0.1, "T": T, "weight": weight}
    return {}  # dist: the defaults are the authors' configuration


@pytest.mark.parametrize("name", ["sp", "pkt", "rkd", "cc", "vid", "dkd", "dist", "kd_ls",
                                  "crd", "ab", "ft", "fsp", "reviewkd", "ofd"])
def test_the_grid_runs_the_configurations_the_reference_tests_verified(name):
    """Each method's composition test checks kt-bench's loss against its reference code for
    given options; the grid's cells must carry exactly those."""
    pairs = {(t, s) for t, s, _ in CELLS}
    assert len(pairs) == 7
    for pair in sorted(pairs):
        options = _verified_options(name, pair)
        cell = CELLS[(*pair, name)]
        if options is None:  # no reference configuration: the grid says it runs the default
            assert name == "dkd" and pair == ("resnet110", "resnet20")
            assert cell.method_config == method_config("dkd")
            continue
        assert cell.method_config == method_config(name, {name: options}), pair


def test_the_grids_crd_plus_kd_is_the_one_verified():
    """tests/methods/test_crd.py checks crd+kd with CE 1, KD 1 (RepDistiller's -a 1 -b 0.8)."""
    from .methods.test_crd import GRID_OPTIONS as CRD

    verified = method_config("crd+kd", {**CRD, "kd": {**CRD["kd"], "ce_weight": 1.0}})
    for pair in {(t, s) for t, s, _ in CELLS}:
        assert CELLS[(*pair, "crd+kd")].method_config == verified
    assert CELLS[("resnet56", "resnet20", "kd")].method_config["kd"]["ce_weight"] == 0.1
