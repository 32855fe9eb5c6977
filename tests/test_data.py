"""The embedded digits dataset, the synthetic one and the batched augmentation."""

import torch

from kt_bench.core.options import Spec
from kt_bench.data import load_dataset
from kt_bench.data.augment import random_crop_flip
from kt_bench.data.digits import read_digits, stratified_split


def test_digits_is_a_fixed_stratified_split_of_the_real_images():
    data = load_dataset(Spec("digits", {"image_size": 16, "augment": False}))
    assert data.train.images.shape == (1438, 1, 16, 16)
    assert data.test.images.shape == (359, 1, 16, 16)
    assert data.num_classes == 10 and data.augment is None
    # every class is in the test split in proportion (about 36 of ~180 each)
    counts = torch.bincount(data.test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    again = load_dataset(Spec("digits", {"image_size": 16, "augment": False}))
    assert torch.equal(data.train.images, again.train.images)
    assert abs(data.train.images.mean().item()) < 1e-4  # normalised with train statistics


def test_digits_are_read_exactly_as_scikit_learn_loads_them(monkeypatch):
    import importlib.util

    import numpy as np
    from sklearn.datasets import load_digits

    images, target = read_digits()
    raw = load_digits()
    assert np.array_equal(images, raw.images) and images.dtype == raw.images.dtype
    assert np.array_equal(target, raw.target) and images.shape == (1797, 8, 8)
    # where the shipped file is not found, scikit-learn's own loader is used
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    again, labels = read_digits()
    assert np.array_equal(again, raw.images) and np.array_equal(labels, raw.target)


def test_stratified_split_is_disjoint_and_complete():
    labels = torch.arange(50).numpy() % 5
    tr, te = stratified_split(labels, 0.2)
    assert len(set(tr) & set(te)) == 0 and sorted([*tr, *te]) == list(range(50))
    assert len(te) == 10


def test_random_crop_flip_is_a_shifted_and_possibly_mirrored_window():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6) + 1
    gen = torch.Generator().manual_seed(3)
    out = random_crop_flip(x, gen, pad=2, flip=True)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for n in range(2):
        windows = [padded[n, :, i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
        candidates = windows + [w.flip(2) for w in windows]
        assert any(torch.equal(out[n], w) for w in candidates)


def test_random_crop_flip_offsets_are_uniform():
    """Per sample the same distribution as RandomCrop(padding=p) + RandomHorizontalFlip."""
    n, pad = 4000, 2
    x = torch.zeros(n, 1, 5, 5)
    x[:, :, 2, 2] = 1.0  # a single bright pixel reveals the offset
    out = random_crop_flip(x, torch.Generator().manual_seed(0), pad=pad, flip=False)
    pos = out.flatten(1).argmax(1)
    rows, cols = pos // 5, pos % 5
    visible = out.flatten(1).amax(1) > 0
    assert visible.all()  # a shift of at most pad=2 keeps the centre pixel in view
    for coord in (rows, cols):
        freq = torch.bincount(coord, minlength=5).float() / n
        assert torch.allclose(freq, torch.full((5,), 0.2), atol=0.03)
    flips = random_crop_flip(torch.arange(4.0).view(1, 1, 1, 4).repeat(n, 1, 1, 1),
                             torch.Generator().manual_seed(1), pad=0, flip=True)
    assert abs((flips[:, 0, 0, 0] == 3).float().mean().item() - 0.5) < 0.03


def test_synthetic_dataset_has_the_asked_shape():
    data = load_dataset(Spec("synthetic", {"n_train": 20, "n_test": 10, "image_size": 8,
                                           "num_classes": 4}))
    assert data.train.images.shape == (20, 3, 8, 8)
    assert set(data.test.labels.tolist()) == {0, 1, 2, 3}


def test_batched_crop_flip_matches_torchvision_transform_statistics():
    """Where the image's centre pixel lands, over many draws: ours vs RandomCrop(padding) +
    RandomHorizontalFlip applied per image by torchvision."""
    from PIL import Image
    from torchvision import transforms as T

    size, pad, n = 8, 2, 3000
    img = torch.zeros(1, size, size, dtype=torch.uint8)
    img[0, 3, 5] = 255  # one bright pixel, off-centre so flips show

    def histogram(outs: torch.Tensor) -> torch.Tensor:
        pos = outs.flatten(1).argmax(1)
        return torch.bincount(pos, minlength=size * size).float() / len(outs)

    ours = random_crop_flip(img.expand(n, 3, size, size).clone(),
                            torch.Generator().manual_seed(0), pad=pad, flip=True)
    tv = T.Compose([T.RandomCrop(size, padding=pad), T.RandomHorizontalFlip(), T.PILToTensor()])
    torch.manual_seed(0)
    pil = Image.fromarray(img.expand(3, size, size).permute(1, 2, 0).numpy())
    theirs = torch.stack([tv(pil) for _ in range(n)])
    h_ours, h_theirs = histogram(ours[:, :1]), histogram(theirs[:, :1])
    # rows 1..5 x columns 3..7 unflipped and 0..4 flipped (columns 3, 4 in both): 5 x 8
    assert torch.equal(h_ours > 0, h_theirs > 0) and (h_ours > 0).sum() == 40
    assert torch.allclose(h_ours, h_theirs, atol=0.015)
    # mean pixel intensity (the padding is black in both)
    assert abs(ours.float().mean() - theirs.float().mean()) < 0.5
