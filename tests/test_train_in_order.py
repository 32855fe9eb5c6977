"""``train_in_order`` of streamed datasets: the training images as the test split's pipeline
sees them (no random augmentation), the same every time, for features computed once."""

from __future__ import annotations

import pytest
import torch

from kt_bench.core.options import Spec
from kt_bench.data import LoaderData, load_dataset
from kt_bench.data.imagenet import MEAN, STD
from tests.fixtures import write_image_folder

CPU = torch.device("cpu")
CLASSES, TRAIN_PER_CLASS = 3, 3


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A data root holding ``imagenet/{train,val}``: 3 classes of 40-pixel JPEGs."""
    root = tmp_path_factory.mktemp("in_order")
    write_image_folder(root, CLASSES, TRAIN_PER_CLASS, val_per_class=1)
    return root


def gathered(batches) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of ``batches``, concatenated."""
    xs, ys = zip(*batches, strict=True)
    return torch.cat(xs), torch.cat(ys)


def eval_pipeline_of(root, per_class: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training files through the ImageNet test pipeline (resize 36, centre crop 32),
    built here independently: the first ``per_class`` images of each class."""
    import torchvision
    from torchvision import transforms as T

    folder = torchvision.datasets.ImageFolder(
        str(root / "imagenet" / "train"),
        T.Compose([T.Resize(36), T.CenterCrop(32), T.ToTensor(), T.Normalize(MEAN, STD)]))
    seen: dict[int, int] = {}
    images, labels = [], []
    for i, (_, label) in enumerate(folder.samples):
        seen[label] = seen.get(label, 0) + 1
        if per_class is None or seen[label] <= per_class:
            images.append(folder[i][0])
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


@pytest.mark.parametrize("per_class", [None, 2])  # a plain ImageFolder, and a Subset of one
def test_imagenet_train_in_order_is_the_test_pipeline_every_time(data_root, per_class):
    options = {"image_size": 32, "resize": 36, "workers": 0}
    if per_class is not None:
        options.update(classes=CLASSES, per_class=per_class)
    data = load_dataset(Spec("imagenet", options), str(data_root))
    assert isinstance(data, LoaderData)
    images, labels = gathered(data.train_in_order(4, CPU))
    again, _ = gathered(data.train_in_order(4, CPU))
    assert torch.equal(images, again)
    want_images, want_labels = eval_pipeline_of(data_root, per_class)
    assert images.shape == (CLASSES * (per_class or TRAIN_PER_CLASS), 3, 32, 32)
    assert torch.equal(labels, want_labels) and torch.equal(images, want_images)
    # the training batches still go through the random resized crop
    augmented, _ = gathered(data.train_batches(0, 0, 64, CPU))
    assert not torch.equal(augmented.sort(0).values, images.sort(0).values)


def test_streamed_user_images_in_order_match_the_cached_form(data_root):
    options = {"root": str(data_root / "imagenet"), "image_size": 24, "workers": 0}
    streamed = load_dataset(Spec("imagefolder", {**options, "cache": "stream"}), str(data_root))
    cached = load_dataset(Spec("imagefolder", {**options, "cache": "memory"}), str(data_root))
    assert isinstance(streamed, LoaderData) and not isinstance(cached, LoaderData)
    images, labels = gathered(streamed.train_in_order(4, CPU))
    want_images, want_labels = gathered(cached.train_in_order(4, CPU))
    assert torch.equal(labels, want_labels)
    # the same uint8 pixels, normalised in a different order of float operations
    assert torch.allclose(images, want_images, atol=1e-5)


class NoTransform(torch.utils.data.Dataset):
    """Random images drawn at each read, and no ``transform`` attribute."""

    targets = [0, 1, 0, 1, 0]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.rand(1, 2, 2), self.targets[index]


def test_a_dataset_without_transform_keeps_its_own_draws_seeded_alike():
    data = LoaderData("plain", NoTransform(), NoTransform(), 2, workers=0)
    images, labels = gathered(data.train_in_order(2, CPU))
    again, _ = gathered(data.train_in_order(2, CPU))
    assert torch.equal(images, again) and labels.tolist() == NoTransform.targets
    want = torch.stack([torch.rand(1, 2, 2, generator=torch.Generator().manual_seed(0))
                        for _ in NoTransform.targets])
    assert torch.equal(images, want)
