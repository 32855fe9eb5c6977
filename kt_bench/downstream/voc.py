"""PASCAL VOC 2007 detection data, read from torchvision's ``VOCDetection`` layout:
``<root>/VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/Main/<split>.txt}``.

Targets are torchvision's detection targets: ``boxes`` (N, 4) in xyxy float pixels, with
VOC's 1-based ``xmin``/``ymin`` less one (so a box spans ``xmax - xmin + 1`` pixels),
``labels`` 1..20 over :data:`VOC_CLASSES` (0 is the background). Objects marked ``difficult``
are left out of training targets and kept in evaluation targets with ``iscrowd = 1``, so the
evaluation neither counts them as misses nor counts detections of them as false positives
(VOC's rule).

This module registers no downstream kind."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from kt_bench.core.errors import KtBenchError

#: The 20 VOC classes in the standard order; class ``VOC_CLASSES[i]`` has label ``i + 1``.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
#: Images per split of VOC 2007, for estimates made without the data at hand.
VOC2007_SIZES = {"train": 2501, "val": 2510, "trainval": 5011, "test": 4952}
#: Where torchvision's ``VOCDetection(root, year="2007")`` keeps VOC 2007 under its root.
VOC2007_SUBFOLDER = Path("VOCdevkit") / "VOC2007"


@dataclass
class Annotation:
    """The objects of one image: ``boxes`` (N, 4) xyxy float pixels, ``labels`` (N,) 1..20,
    ``difficult`` (N,) bool."""

    boxes: torch.Tensor
    labels: torch.Tensor
    difficult: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def voc_folder(root: Path) -> Path:
    """The VOC 2007 folder under ``root`` (``root/VOCdevkit/VOC2007``, or ``root`` itself where
    it holds ``Annotations``); a one-line error naming the folder where it is missing."""
    if (root / "Annotations").is_dir():
        return root
    folder = root / VOC2007_SUBFOLDER
    if not folder.is_dir():
        raise KtBenchError(
            f"VOC 2007 not found: {folder} is missing (torchvision's "
            f"VOCDetection(root='{root}', year='2007', download=True) puts it there)")
    return folder


def split_ids(folder: Path, split: str, max_images: int = 0) -> list[str]:
    """The image ids of ``split`` (``ImageSets/Main/<split>.txt``), the first ``max_images``
    of them where that is above 0."""
    path = folder / "ImageSets" / "Main" / f"{split}.txt"
    try:
        ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise KtBenchError(f"VOC split '{split}' not found: {path} is missing") from None
    if not ids:
        raise KtBenchError(f"VOC split '{split}' is empty: {path} lists no images")
    return ids[:max_images] if max_images > 0 else ids


def _number(obj: ET.Element, tag: str, path: Path) -> float:
    text = obj.findtext(f"bndbox/{tag}")
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise KtBenchError(f"{path}: an object's bndbox/{tag} is {text!r}, not a number"
                           ) from None


def read_annotation(path: Path) -> Annotation:
    """The objects of one VOC annotation file; a one-line error naming the file where it
    cannot be read, is not XML or names a class outside :data:`VOC_CLASSES`."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise KtBenchError(f"VOC annotation missing: {path}") from None
    except ET.ParseError as exc:
        raise KtBenchError(f"{path}: not a VOC annotation ({exc})") from None
    boxes, labels, difficult = [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise KtBenchError(f"{path}: unknown VOC class {name!r}")
        x1, y1, x2, y2 = (_number(obj, tag, path) for tag in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x1 - 1, y1 - 1, x2, y2])
        labels.append(VOC_CLASSES.index(name) + 1)
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    return Annotation(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                      torch.tensor(labels, dtype=torch.int64),
                      torch.tensor(difficult, dtype=torch.bool))


def training_target(ann: Annotation) -> dict[str, torch.Tensor]:
    """A training target: the objects that are not difficult."""
    keep = ~ann.difficult
    return {"boxes": ann.boxes[keep], "labels": ann.labels[keep]}


def evaluation_target(ann: Annotation) -> dict[str, torch.Tensor]:
    """An evaluation target: every object, the difficult ones with ``iscrowd = 1`` (ignored)."""
    return {"boxes": ann.boxes, "labels": ann.labels, "iscrowd": ann.difficult.long()}


def flipped(image: torch.Tensor, target: dict[str, torch.Tensor]
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``image`` (C, H, W) and its ``target`` mirrored left to right."""
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = width - target["boxes"][:, 2], width - target["boxes"][:, 0]
    return image.flip(-1), {**target, "boxes": boxes}


class VocDetection(Dataset):
    """One VOC 2007 split as (image, target) pairs: images float (3, H, W) in [0, 1] at their
    own size, targets as :func:`training_target` (``train``) or :func:`evaluation_target`.
    Items are indexed by ``(index, flip)``: the sampler decides the flips, so they follow the
    sampler's seed whatever process loads them. Every annotation is read and every image file
    checked up front; a split whose annotations hold no object at all is a one-line error."""

    def __init__(self, folder: Path, split: str, train: bool, max_images: int = 0
                 ) -> None:
        self.folder, self.split, self.train = folder, split, train
        self.ids = split_ids(folder, split, max_images)
        self.annotations = [read_annotation(folder / "Annotations" / f"{i}.xml")
                            for i in self.ids]
        for image_id in self.ids:
            if not self.image_path(image_id).is_file():
                raise KtBenchError(f"VOC image missing: {self.image_path(image_id)}")
        if not any(len(ann) for ann in self.annotations):
            raise KtBenchError(
                f"VOC split '{split}' of {folder} has no boxes: none of its "
                f"{len(self.ids)} annotations holds an <object>")

    def image_path(self, image_id: str) -> Path:
        """The JPEG of image ``image_id``."""
        return self.folder / "JPEGImages" / f"{image_id}.jpg"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index, flip = key
        with Image.open(self.image_path(self.ids[index])) as img:
            image = pil_to_tensor(img.convert("RGB")).float().div_(255)
        ann = self.annotations[index]
        target = training_target(ann) if self.train else evaluation_target(ann)
        return flipped(image, target) if flip else (image, target)
