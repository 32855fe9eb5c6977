"""Combinations of the logit methods (kd, kd_ls, dkd, dist) build and return every member's
term and weight."""

from __future__ import annotations

import pytest
from kt_bench.methods.dkd import dkd_loss

from kt_bench.api.method import Batch, build_method, method_config
from kt_bench.api.plugins import load_builtin_methods

from .methods.loops import draw

load_builtin_methods()


@pytest.mark.parametrize("spec", ["kd+dkd", "dkd+dist", "dist+kd_ls", "kd+kd_ls"])
def test_combinations_build_and_return_every_member_term(spec):
    method = build_method(spec, method_config(spec))
    s, t, y = draw(4, 10, seed=43)
    terms = method.terms({"logits": s.float()}, {"logits": t.float()}, Batch(y, 3, 240))
    names = spec.split("+")
    assert set(terms) == set(names)
    weights = method.term_weights(3, 240)
    assert set(weights) == set(names)
    if "dkd" in names:
        assert weights["dkd"] == pytest.approx(4 / 20)
        assert terms["dkd"].item() == pytest.approx(dkd_loss(s, t, y).item(), rel=1e-5)
