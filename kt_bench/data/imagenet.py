"""``imagenet``: ILSVRC-2012 from an ImageFolder tree (``<root>/imagenet/{train,val}``)."""

from __future__ import annotations

import torch

from kt_bench.core.errors import KtBenchError
from kt_bench.data.bundle import DatasetInfo, LoaderData, register_dataset
from kt_bench.data.bundle import data_root as resolve_data_root

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _info(image_size: int = 224, classes: int | None = None,
          per_class: int | None = None) -> DatasetInfo:
    n = classes or 1000
    return DatasetInfo(n, 3, image_size, n * (per_class or 1281))


def _subset(folder, classes: int | None, per_class: int | None):
    """The samples of the first ``classes`` classes, at most ``per_class`` of each."""
    if classes is None and per_class is None:
        return folder
    seen: dict[int, int] = {}
    keep = []
    for i, (_, label) in enumerate(folder.samples):
        if (classes is None or label < classes) and seen.get(label, 0) < (per_class or 10**9):
            seen[label] = seen.get(label, 0) + 1
            keep.append(i)
    return torch.utils.data.Subset(folder, keep)


@register_dataset("imagenet", info=_info)
def imagenet(data_root: str | None = None, image_size: int = 224, resize: int = 256,
             classes: int | None = None, per_class: int | None = None,
             workers: int = 8) -> LoaderData:
    """ILSVRC-2012 (or any ImageFolder tree of the same layout), streamed with workers.

    Train: RandomResizedCrop(image_size) and horizontal flip; test: Resize(resize) then
    CenterCrop(image_size); both normalised with the usual ImageNet mean and std (the NST
    authors put a BatchNorm layer first instead; the usual normalisation is used here).
    ImageNet cannot be downloaded: place it as ``<data-root>/imagenet/train/<class>/*.JPEG``
    and ``<data-root>/imagenet/val/<class>/*.JPEG``. ``classes`` keeps the first N classes
    (sorted by folder name) and ``per_class`` the first N training images of each.
    """
    import torchvision
    from torchvision import transforms as T

    root = resolve_data_root(data_root) / "imagenet"
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise KtBenchError(f"ImageNet is not at {root / split}; ImageNet cannot be "
                               "downloaded: place its train/ and val/ ImageFolder trees under "
                               f"{root} (or pass --data-root)")
    norm = [T.ToTensor(), T.Normalize(MEAN, STD)]
    train = torchvision.datasets.ImageFolder(
        str(root / "train"),
        T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *norm]))
    test = torchvision.datasets.ImageFolder(
        str(root / "val"), T.Compose([T.Resize(resize), T.CenterCrop(image_size), *norm]))
    if train.classes != test.classes:
        raise KtBenchError(f"{root / 'train'} and {root / 'val'} hold different classes")
    n = len(train.classes)
    if classes is not None and not 1 <= classes <= n:
        raise KtBenchError(f"imagenet: classes = {classes}, but {root / 'train'} has {n}")
    num_classes = classes or n
    return LoaderData("imagenet", _subset(train, classes, per_class),
                      _subset(test, classes, None), num_classes, workers)

