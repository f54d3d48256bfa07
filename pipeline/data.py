"""Data sets by name, held in memory as tensors; every batch is ``(x, y, sample_id)``.

``sample_id`` is the index in dataset order (after ``data.subset``), the row of the logit store.
Images stay uint8 (N, C, H, W) until a batch is on the training device, where it is normalised
and augmented (random crop with 4 px zero padding + horizontal flip), so an epoch never decodes
or copies the whole set. Randomness of an epoch depends only on (seed, epoch): a resumed run
sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .config import DataConfig

__all__ = [
    "ArrayDataset", "DataSplits", "DATASETS", "load_data", "load_train_labels", "epoch_batches",
    "augment_batch", "cache_dir",
]


@dataclass(frozen=True)
class ArrayDataset:
    """One split in memory. x: (N, C, H, W) uint8 images or (N, F) float32 features; y: (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    kind: str  # "images" | "features"
    classes: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()  # per-channel mean of x/255 (images), for normalisation
    std: tuple[float, ...] = ()
    source_index: np.ndarray | None = field(default=None, compare=False)  # row in the full split

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.x[index], int(self.y[index]), int(index)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def take(self, ids: np.ndarray) -> "ArrayDataset":
        """The samples ``ids`` (ascending), renumbered 0..len(ids)-1 in that order."""
        index = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        source = np.asarray(ids) if self.source_index is None else self.source_index[np.asarray(ids)]
        return replace(self, x=self.x[index], y=self.y[index], source_index=source)


@dataclass(frozen=True)
class DataSplits:
    name: str
    train: ArrayDataset
    test: ArrayDataset
    info: dict  # what the store records: name, split, subset, root

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def cache_dir() -> Path:
    return Path(os.environ.get("TDDYUN_CACHE", Path.home() / ".cache" / "tddyun"))


# ---------------------------------------------------------------------------------------------
# Loaders, one per name
# ---------------------------------------------------------------------------------------------
def _image_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x.float().div_(255)
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def _images(x: np.ndarray, y: np.ndarray, classes, num_classes: int, stats=None) -> ArrayDataset:
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))
    mean, std = stats if stats is not None else _image_stats(xt)
    return ArrayDataset(xt, torch.from_numpy(np.asarray(y, dtype=np.int64)), num_classes, "images",
                        tuple(classes), mean, std)


def _load_digits(cfg: DataConfig) -> tuple[ArrayDataset, ArrayDataset]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # 8x8 images with values 0..16 -> uint8 0..255, one channel
    x = np.clip(bunch.images * 16.0, 0, 255).astype(np.uint8)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    idx = np.arange(len(y))
    train_idx, test_idx = train_test_split(idx, test_size=cfg.test_fraction, random_state=cfg.seed, stratify=y)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    classes = [str(c) for c in range(10)]
    train = _images(x[train_idx], y[train_idx], classes, 10)
    test = _images(x[test_idx], y[test_idx], classes, 10, stats=(train.mean, train.std))
    return train, test


def _load_synthetic(cfg: DataConfig) -> tuple[ArrayDataset, ArrayDataset]:
    """Gaussian blobs with overlapping classes, so samples differ in difficulty."""
    rng = np.random.default_rng(cfg.seed)
    k, f = cfg.synthetic_classes, cfg.synthetic_features
    centers = rng.normal(0.0, 1.5, size=(k, f))

    def draw(n: int) -> ArrayDataset:
        y = np.arange(n) % k
        rng.shuffle(y)
        x = centers[y] + rng.normal(0.0, 1.0, size=(n, f))
        return ArrayDataset(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)), k,
                            "features", tuple(str(c) for c in range(k)))

    return draw(cfg.synthetic_samples), draw(cfg.synthetic_test_samples)


def _torchvision_cifar(cfg: DataConfig, cls_name: str, num_classes: int) -> tuple[ArrayDataset, ArrayDataset]:
    import torchvision

    root = Path(cfg.root) if cfg.root else cache_dir() / cls_name.lower()
    cls = getattr(torchvision.datasets, cls_name)
    try:
        train = cls(str(root), train=True, download=cfg.download)
        test = cls(str(root), train=False, download=cfg.download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{root}: data.name = {cls_name.lower()}: files not found ({exc}); set data.download = true, "
            f"or data.root to a folder holding the python version of the data set"
        ) from exc
    made = []
    stats = None
    for split in (train, test):
        x = np.asarray(split.data).transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        ds = _images(x, np.asarray(split.targets), split.classes, num_classes, stats)
        stats = (ds.mean, ds.std)
        made.append(ds)
    return made[0], made[1]


def _load_cifar10(cfg: DataConfig):
    return _torchvision_cifar(cfg, "CIFAR10", 10)


def _load_cifar100(cfg: DataConfig):
    return _torchvision_cifar(cfg, "CIFAR100", 100)


def _imagefolder_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise FileNotFoundError("data.root = '': expected the folder (or .tar.gz) holding train/ and test/")
    root = Path(cfg.root).expanduser()
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
        # Extract once into the cache; a marker file says the extraction finished.
        target = cache_dir() / root.name.split(".")[0]
        marker = target / ".extracted"
        if not marker.exists():
            target.mkdir(parents=True, exist_ok=True)
            with tarfile.open(root) as archive:
                archive.extractall(target, filter="data")
            marker.touch()
        found = [p.parent for p in target.rglob("train") if p.is_dir() and (p.parent / "test").is_dir()]
        if not found:
            raise FileNotFoundError(f"{root}: data.root: expected train/ and test/ inside the archive")
        return found[0]
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise FileNotFoundError(f"{root}: data.root: expected a folder with train/ and test/ (ImageFolder layout)")
    return root


def _decode_folder(split_dir: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images, labels, shape = [], [], None
    for label, name in enumerate(classes):
        for file in sorted((split_dir / name).iterdir()):
            if not file.is_file():
                continue
            with Image.open(file) as img:
                arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
            if shape is None:
                shape = arr.shape
            elif arr.shape != shape:
                raise ValueError(f"{file}: image shape: expected {shape} like the first image, found {arr.shape}")
            images.append(arr)
            labels.append(label)
    if not images:
        raise FileNotFoundError(f"{split_dir}: no images found")
    return np.stack(images).transpose(0, 3, 1, 2).copy(), np.asarray(labels, dtype=np.int64)


def _load_imagefolder(cfg: DataConfig) -> tuple[ArrayDataset, ArrayDataset]:
    """A root with train/<class>/* and test/<class>/*, decoded once into a cached uint8 array."""
    root = _imagefolder_root(cfg)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    made, stats = [], None
    for split in ("train", "test"):
        cached = cache_dir() / "imagefolder" / f"{key}-{split}.npz"
        if cached.exists():
            with np.load(cached) as npz:
                x, y = npz["x"], npz["y"]
        else:
            x, y = _decode_folder(root / split, classes)
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.stem}.tmp-{os.getpid()}.npz")
            np.savez(tmp, x=x, y=y)
            os.replace(tmp, cached)
        ds = _images(x, y, classes, len(classes), stats)
        stats = (ds.mean, ds.std)
        made.append(ds)
    return made[0], made[1]


DATASETS: dict[str, Callable[[DataConfig], tuple[ArrayDataset, ArrayDataset]]] = {
    "digits": _load_digits,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "imagefolder": _load_imagefolder,
    "synthetic": _load_synthetic,
}


def balanced_subset(labels: np.ndarray, k: int, *, seed: int, field: str = "data.subset",
                    largest: int | None = None) -> np.ndarray:
    """Ascending ids of a seeded, class-balanced subset of ``k`` samples (largest remainder quotas).

    field/largest: the config key named by the error, and the largest k it accepts (default n)."""
    n = len(labels)
    largest = n if largest is None else largest
    if not 0 < k <= largest:
        raise ValueError(f"{field} = {k}: expected an integer in [1, {largest}] "
                         f"(the training set has {n} samples)")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts / n * k
    quotas = np.floor(exact).astype(int)
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[: k - quotas.sum()]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in zip(classes, quotas)]
    return np.sort(np.concatenate(picked))


def eval_split_of(cfg: DataConfig) -> str:
    """The split every accuracy is measured on: ``validation`` when data.validation is set, else ``test``."""
    return "test" if cfg.validation is None else "validation"


def load_data(cfg: DataConfig) -> DataSplits:
    """The configured data set's train and evaluation splits.

    The training subset is applied first; with ``data.validation = K`` a seeded class-balanced K of
    it are then held out and returned as ``test`` (the split every accuracy is measured on), so a
    tuning run never evaluates on the real test set. ``info["eval_split"]`` says which it is.
    """
    if cfg.name not in DATASETS:
        raise ValueError(f"data.name = {cfg.name!r}: unknown data set; valid names: {', '.join(DATASETS)}")
    train, test = DATASETS[cfg.name](cfg)
    if cfg.subset is not None:
        train = train.take(balanced_subset(train.y.numpy(), cfg.subset, seed=cfg.seed))
    if cfg.validation is not None:
        # its own seed stream: changing the validation size never reshuffles the subset
        held = balanced_subset(train.y.numpy(), cfg.validation, seed=cfg.seed + 1_000_003,
                               field="data.validation", largest=len(train) - 1)
        rest = np.setdiff1d(np.arange(len(train)), held)
        train, test = train.take(rest), train.take(held)
    info = {"name": cfg.name, "split": "train", "subset": cfg.subset, "root": cfg.root,
            "num_train": len(train), "num_test": len(test), "validation": cfg.validation,
            "eval_split": eval_split_of(cfg)}
    return DataSplits(cfg.name, train, test, info)


def load_train_labels(cfg: DataConfig) -> np.ndarray:
    """(N,) int labels of the configured training set, in dataset order (what the store fingerprints)."""
    return load_data(cfg).train.y.numpy()


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------
def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of one epoch: its shuffling and augmentation depend on (seed, epoch) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_batches(
    data: ArrayDataset, *, batch_size: int, shuffle: bool, generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield index tensors (B,) covering every sample once, shuffled with ``generator`` if asked."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    yield from order.split(batch_size)


def to_device_batch(
    data: ArrayDataset, ids: torch.Tensor, device: torch.device, *, augment: bool,
    generator: torch.Generator | None, channels_last: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, sample_id) of ``ids`` on ``device``: images normalised (and augmented) float32."""
    x = data.x[ids]
    y = data.y[ids]
    if data.kind == "images":
        x = x.to(device, non_blocking=True)
        if augment:  # draw on the CPU generator so the batch is the same on any device
            b = ids.shape[0]
            crops = torch.randint(0, 9, (b, 2), generator=generator)
            flips = torch.rand(b, generator=generator) < 0.5
            x = augment_batch(x, crops.to(device), flips.to(device))
        # (x/255 - mean)/std as one fused multiply-add
        scale = 1.0 / (255.0 * torch.tensor(data.std, device=device)).view(1, -1, 1, 1)
        shift = (-torch.tensor(data.mean, device=device) / torch.tensor(data.std, device=device)).view(1, -1, 1, 1)
        x = torch.addcmul(shift, x.float(), scale)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.to(device, non_blocking=True)
    return x, y.to(device, non_blocking=True), ids.to(device, non_blocking=True)


def augment_batch(x: torch.Tensor, crops: torch.Tensor, flips: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` px, and horizontal flip, for a whole batch at once.

    x: (B, C, H, W) any dtype (uint8 before normalisation, so the padding is black, as torchvision's
    RandomCrop); crops: (B, 2) int (row, column) offsets in [0, 2*pad]; flips: (B,) bool.
    One gather over flat pixel indices: far cheaper on CPU than per-sample slicing.
    """
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flips[:, None], cols.flip(0), cols)[:, None, :] + crops[:, 1, None, None]  # (B, 1, W)
    rows = torch.arange(h, device=x.device)[None, :, None] + crops[:, 0, None, None]  # (B, H, 1)
    flat = (rows * (w + 2 * pad) + cols).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, -1).gather(2, flat).view(b, c, h, w)
