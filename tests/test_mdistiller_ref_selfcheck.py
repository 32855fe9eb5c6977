"""The re-statement of mdistiller's feature extraction (tests/ref_mdistiller_features.py)
walks the same layers kt-bench's taps name: a check of the re-statement that the ReviewKD and
OFD comparisons rely on."""

from __future__ import annotations

import torch

from kt_bench.models import build_model
from kt_bench.models.taps import TapRecorder

from .methods.mdistiller import PAIRS, STAGES3, VGG_LAYERS
from .ref_mdistiller_features import mdistiller_feats


def test_ref_feature_dicts_agree_with_the_taps():
    """The re-statement walks the same layers the taps name (a check of the re-statement)."""
    for pair in PAIRS:
        torch.manual_seed(0)
        model = build_model(pair[1], 100).eval()
        layers = VGG_LAYERS if pair[1].startswith("vgg") else STAGES3
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        wanted = [*layers, *(f"{k}_pre" for k in layers), "pool"]
        recorder = TapRecorder(model, model.tap_map, wanted)
        with torch.no_grad():
            taps = recorder.collect(model(x))
            logits, feats = mdistiller_feats(model, x)
        recorder.remove()
        torch.testing.assert_close(logits, taps["logits"], rtol=1e-5, atol=1e-5)
        for i, k in enumerate(layers, start=1):
            torch.testing.assert_close(feats["feats"][i], taps[k])
            torch.testing.assert_close(feats["preact_feats"][i], taps[f"{k}_pre"])
        torch.testing.assert_close(feats["pooled_feat"], taps["pool"], rtol=1e-5, atol=1e-6)
