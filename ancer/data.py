"""Datasets read from local disk in their standard layouts, as (x, label) pairs.

``x`` is a float32 tensor C×H×W in [0, 1] (models normalize inside, as in Cohen et al. 2019) and
``label`` an int. Readers:

- ``cifar10``: CIFAR-10 (Krizhevsky 2009) from the official ``cifar-10-batches-py``
  pickles or ``cifar-10-batches-bin`` records, loaded eagerly into one uint8 tensor;
- ``imagenet``: the ILSVRC-2012 validation set in class folders ``val/<synset>/*.JPEG``,
  decoded lazily, resized to 256 on the short side and center-cropped to 224 (the test
  transform of Cohen et al. 2019, locuslab/smoothing ``code/datasets.py``), labels being
  positions in the full sorted list of 1000 synsets;
- ``folder``: a plain class folder ``root/<class>/*.png|jpg`` (classes sorted), as is;
- ``npz``: arrays ``x`` and ``y`` in a ``.npz`` file.

:func:`load_dataset` is the one entry point; it also subsets the data as Cohen et al.'s
``certify.py`` does (``skip``, ``max``) or by an explicit index list. ``dataset.indices``
keeps each item's original index, for the ``idx`` column of results. Pillow is needed
only for image files.
"""
import copy
import numbers
import pickle
import re
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ancer.errors import ArgumentError, DatasetError

PathLike = Union[str, Path]

_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp"}
_SYNSET = re.compile(r"^n\d{8}$")


class ImageDataset:
    """A sequence of (x, label) pairs with ``name``, ``num_classes``, ``classes`` (class
    names or None) and ``indices`` (the original index of each item)."""

    def __init__(self, name: str, num_classes: int, size: int, classes: Optional[List[str]] = None):
        self.name = name
        self.num_classes = num_classes
        self.classes = classes
        self.indices: List[int] = list(range(size))
        self._size = size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"dataset indices must be integers, got {type(i).__name__}")
        return self._load(self.indices[i])

    def _load(self, j: int) -> Tuple[torch.Tensor, int]:
        """The item of original index ``j``."""
        raise NotImplementedError

    def subset(
        self, skip: int = 1, max: Optional[int] = None, indices: Optional[Sequence[int]] = None
    ) -> "ImageDataset":
        """A view of the items of original indices ``indices``, or, as in Cohen et al.'s
        ``certify.py``, of every ``skip``-th index below ``max`` (``max`` bounds the
        original index, not the count: skip=20, max=10000 gives 0, 20, ..., 9980)."""
        out = copy.copy(self)
        out.indices = _select(self._size, skip, max, indices)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, len={len(self)}, num_classes={self.num_classes})"


class ArrayDataset(ImageDataset):
    """Images held in memory: uint8 N×C×H×W (scaled by 1/255) or float N×C×H×W in [0, 1]."""

    def __init__(
        self,
        name: str,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        classes: Optional[List[str]] = None,
    ):
        super().__init__(name, num_classes, len(images), classes)
        self.images = images
        self.labels = labels

    def _load(self, j: int) -> Tuple[torch.Tensor, int]:
        x = self.images[j]
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)
        return x, int(self.labels[j])


class ImageFileDataset(ImageDataset):
    """Images decoded from files when accessed, through ``transform`` (a PIL image to a
    PIL image), converted to RGB."""

    def __init__(
        self,
        name: str,
        files: List[Path],
        labels: List[int],
        classes: List[str],
        transform: Optional[Callable[[Any], Any]] = None,
    ):
        super().__init__(name, len(classes), len(files), classes)
        self.files = files
        self.labels = labels
        self.transform = transform
        self._image = _pil_image()

    def _load(self, j: int) -> Tuple[torch.Tensor, int]:
        try:
            with self._image.open(self.files[j]) as img:
                img = img.convert("RGB")
        except OSError as exc:  # PIL.UnidentifiedImageError is an OSError
            raise DatasetError(f"cannot decode image {str(self.files[j])!r}: {exc}") from None
        if self.transform is not None:
            img = self.transform(img)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        return x.float().div_(255), self.labels[j]


# ----------------------------------------------------------------------------- helpers


def _pil_image():
    """The ``PIL.Image`` module, or a DatasetError saying how to install Pillow."""
    try:
        from PIL import Image
    except ImportError:
        raise DatasetError(
            "reading image files needs Pillow, an optional dependency: "
            "pip install pillow (or pip install 'ancer[images]')"
        ) from None
    return Image


def _listing(path: Path, limit: int = 8) -> str:
    """What a directory holds, for error messages."""
    if not path.exists():
        return "nothing (the path does not exist)"
    if not path.is_dir():
        return "a file, not a directory"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not entries:
        return "an empty directory"
    more = f", ... ({len(entries)} entries)" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _select(size: int, skip: int, max: Optional[int], indices: Optional[Sequence[int]]) -> List[int]:
    """Validate the subsetting arguments and return the selected original indices."""
    if not _is_int(skip) or skip < 1:
        raise ArgumentError(f"skip must be an integer >= 1, got {skip!r}")
    if max is not None and (not _is_int(max) or max < 1):
        raise ArgumentError(f"max must be None or an integer >= 1, got {max!r}")
    if indices is None:
        stop = size if max is None else min(size, int(max))
        return list(range(0, stop, int(skip)))
    if skip != 1 or max is not None:
        raise ArgumentError("give either indices or skip/max, not both")
    indices = list(indices)
    bad = [i for i in indices if not _is_int(i) or not 0 <= i < size]
    if bad:
        raise ArgumentError(f"indices must be integers in [0, {size}), got {bad[0]!r}")
    return [int(i) for i in indices]


# ----------------------------------------------------------------------------- CIFAR-10


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles the official CIFAR batches only: numpy arrays, lists, dicts, strings.
    Any other global is refused, so a forged file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


_CIFAR_FILES = {
    "py": {"test": ["test_batch"], "train": [f"data_batch_{i}" for i in range(1, 6)]},
    "bin": {"test": ["test_batch.bin"], "train": [f"data_batch_{i}.bin" for i in range(1, 6)]},
}
#: CIFAR-10's class names in label order (Krizhevsky 2009, ``batches.meta``)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _read_cifar_pickle(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, LookupError, TypeError, ValueError, AttributeError) as exc:
        raise DatasetError(
            f"{str(path)!r} is not an official CIFAR-10 pickle batch (a dict with b'data' "
            f"uint8 N×3072 and b'labels'): {type(exc).__name__}: {exc}"
        ) from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DatasetError(
            f"{str(path)!r}: expected b'data' uint8 of shape (N, 3072) and N labels, found "
            f"{data.dtype} {data.shape} and {len(labels)} labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar_bin(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise DatasetError(
            f"{str(path)!r} is not a CIFAR-10 binary batch: its size {raw.size} is not a "
            "multiple of 3073 bytes (1 label + 3072 pixels per record); truncated?"
        )
    records = raw.reshape(-1, 3073)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def _cifar_dir(root: Path) -> Tuple[Path, str]:
    for candidate in (root, root / "cifar-10-batches-py", root / "cifar-10-batches-bin"):
        for kind, files in _CIFAR_FILES.items():
            if any((candidate / f).is_file() for split in files.values() for f in split):
                return candidate, kind
    raise DatasetError(
        f"no CIFAR-10 batches in {str(root)!r}: expected cifar-10-batches-py (test_batch, "
        "data_batch_1..5) or cifar-10-batches-bin (test_batch.bin, data_batch_1..5.bin), "
        f"the folder itself or inside it; found: {_listing(root)}"
    )


def cifar10(root: PathLike, split: str = "test") -> ArrayDataset:
    """CIFAR-10 from the official ``cifar-10-batches-py`` or ``-bin`` directory (``root``
    or its parent). ``split`` is ``"test"`` (``test_batch``, 10,000 images) or
    ``"train"`` (``data_batch_1..5``, 50,000 images, in that order)."""
    if split not in ("test", "train"):
        raise ArgumentError(f"split must be 'test' or 'train' for cifar10, got {split!r}")
    folder, kind = _cifar_dir(Path(root))
    names = _CIFAR_FILES[kind][split]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DatasetError(
            f"{str(folder)!r} lacks {', '.join(missing)} for the {split} split; found: {_listing(folder)}"
        )
    read = _read_cifar_pickle if kind == "py" else _read_cifar_bin
    parts = [read(folder / n) for n in names]
    labels = np.concatenate([p[1] for p in parts])
    if labels.min() < 0 or labels.max() > 9:
        raise DatasetError(f"CIFAR-10 labels must be in 0..9; {str(folder)!r} has {labels.max()}")
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate([p[0] for p in parts])))
    return ArrayDataset("cifar10", images, torch.from_numpy(labels), 10, list(CIFAR10_CLASSES))


# ----------------------------------------------------------------------------- image folders


def _image_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


def _class_dirs(root: Path) -> List[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def resize_center_crop(img: Any, resize: int = 256, crop: int = 224) -> Any:
    """Resize a PIL image so its short side is ``resize`` (bilinear), then cut the central
    ``crop``×``crop`` square: torchvision's ``Resize(256)`` + ``CenterCrop(224)``, the
    ImageNet test transform of Cohen et al. 2019."""
    w, h = img.size
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    img = img.resize(size, _pil_image().BILINEAR)
    left = int(round((size[0] - crop) / 2.0))
    top = int(round((size[1] - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


def _read_synsets(synsets: Union[PathLike, Sequence[str]]) -> List[str]:
    if isinstance(synsets, (str, Path)):
        path = Path(synsets)
        if not path.is_file():
            raise DatasetError(f"synset list {str(path)!r} does not exist")
        lines = path.read_text().splitlines()
        names = [line.split()[0] for line in lines if line.strip()]
    else:
        names = list(synsets)
        if not all(isinstance(s, str) for s in names):
            raise ArgumentError("synsets must be a path or a list of synset strings")
    if not names or len(set(names)) != len(names):
        raise DatasetError("the synset list must be non-empty and without duplicates")
    return names


#: names of a synset list that the ImageNet reader finds by itself in or beside the folder
_SYNSET_FILES = ("synsets.txt", "LOC_synset_mapping.txt")


def _synset_file_beside(folder: Path) -> Optional[Path]:
    """The first synset list found in ``folder`` or its parent, if any."""
    for place in (folder, folder.parent):
        for name in _SYNSET_FILES:
            if (place / name).is_file():
                return place / name
    return None


def imagenet(
    root: PathLike, split: str = "test", synsets: Optional[Union[PathLike, Sequence[str]]] = None
) -> ImageFileDataset:
    """ImageNet (ILSVRC-2012) images in class folders ``<split dir>/<synset>/*.JPEG``.

    ``root`` is the folder of synset folders or its parent holding ``val/`` (``split``
    ``"test"`` or ``"val"``) or ``train/``. Labels are positions in ``synsets`` (a path to
    a file whose lines start with a synset, like ``synsets.txt`` or
    ``LOC_synset_mapping.txt``, or a list), by default such a file found in the folder or
    beside it; without one the folder must hold all 1000 classes, numbered in sorted order as
    torchvision's ``ImageFolder`` does. Items are in
    class order, then file-name order, resized and center-cropped to 3×224×224.
    """
    if split not in ("test", "val", "train"):
        raise ArgumentError(f"split must be 'test', 'val' or 'train' for imagenet, got {split!r}")
    root = Path(root)
    sub = root / ("train" if split == "train" else "val")
    folder = sub if sub.is_dir() else root
    dirs = [d for d in _class_dirs(folder) if _SYNSET.match(d.name)] if folder.is_dir() else []
    if not dirs:
        raise DatasetError(
            f"no ImageNet class folders in {str(root)!r}: expected folders named by synset "
            f"(n01440764/*.JPEG, ...) in it or in {sub.name}/; found: {_listing(folder)}"
        )
    if synsets is None:
        synsets = _synset_file_beside(folder)
    if synsets is None:
        if len(dirs) != 1000:
            raise DatasetError(
                f"{str(folder)!r} holds {len(dirs)} of ImageNet's 1000 classes, so numbering "
                "the folders present would give wrong labels; give the list of all 1000 "
                "synsets in label order (certify --synsets FILE, or synsets= in Python), or "
                f"put it beside the folder as one of {', '.join(_SYNSET_FILES)}"
            )
        order = [d.name for d in dirs]
    else:
        order = _read_synsets(synsets)
    position = {s: i for i, s in enumerate(order)}
    unknown = [d.name for d in dirs if d.name not in position]
    if unknown:
        raise DatasetError(f"class folders not in the synset list: {', '.join(unknown[:5])}")
    files, labels = [], []
    for d in dirs:
        found = _image_files(d)
        files += found
        labels += [position[d.name]] * len(found)
    if not files:
        raise DatasetError(f"no image files (*.JPEG, *.png...) in the class folders of {str(folder)!r}")
    return ImageFileDataset("imagenet", files, labels, order, resize_center_crop)


def image_folder(
    root: PathLike,
    classes: Optional[Union[PathLike, Sequence[str]]] = None,
    labels_sorted: bool = False,
) -> ImageFileDataset:
    """Images in class folders ``root/<class>/*.png|jpg|...``, decoded as they are (RGB).
    The unzipped CIFAR-10 JPEG copies (``test/<class>/*.jpg``) are read this way.

    Without ``classes`` the folders define the classes, numbered in sorted order (as for
    training). With ``classes``, a model's class names in label order (a list, or a file
    whose lines start with a name, like a synset list), each folder is labelled by the
    position of its name there, so ``cat/`` and ``dog/`` are CIFAR-10's 3 and 5, not 0 and
    1. Folders not named after the model's classes are refused, unless ``labels_sorted``
    says that the folders in sorted order are the model's labels 0, 1, ...
    """
    root = Path(root)
    dirs = _class_dirs(root) if root.is_dir() else []
    names = [d.name for d in dirs]
    if classes is None or labels_sorted:
        order = names
    else:
        order = _read_synsets(classes)
        known = set(order)
        unknown = [name for name in names if name not in known]
        if unknown:
            raise DatasetError(
                f"class folder {unknown[0]!r} of {str(root)!r} is not one of the model's "
                f"{len(order)} classes ({_few(order)}): name each folder after its class, or, "
                "if the folders in sorted order are the model's labels 0, 1, ..., say so "
                "with labels_sorted=True (certify: --labels-sorted)"
            )
    position = {name: label for label, name in enumerate(order)}
    files, labels = [], []
    for d in dirs:
        found = _image_files(d)
        files += found
        labels += [position[d.name]] * len(found)
    if not files:
        raise DatasetError(
            f"no class folders of images in {str(root)!r}: expected <class>/<image>.png|jpg "
            f"inside it; found: {_listing(root)}"
        )
    return ImageFileDataset("folder", files, labels, list(order))


def _few(names: Sequence[str], limit: int = 4) -> str:
    """The first names of a list, for messages."""
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def class_names(
    dataset: Optional[str],
    synsets: Optional[Union[PathLike, Sequence[str]]] = None,
    near: Optional[PathLike] = None,
) -> Optional[List[str]]:
    """The class names, in label order, of a model trained on ``dataset``: CIFAR-10's ten
    names, or for ImageNet the synsets of ``synsets`` or of a synset list found in or beside
    the folder ``near``; None when unknown."""
    if dataset == "cifar10":
        return list(CIFAR10_CLASSES)
    if dataset in ("imagenet", "imagenet32"):
        if synsets is None and near is not None and Path(near).is_dir():
            synsets = _synset_file_beside(Path(near))
        return None if synsets is None else _read_synsets(synsets)
    return None


# ----------------------------------------------------------------------------- npz


def npz(path: PathLike, num_classes: Optional[int] = None) -> ArrayDataset:
    """Arrays from a ``.npz`` file: ``x`` either uint8 N×H×W×C (as images are stored,
    e.g. ``cifar10-test-exact-first100.npz``) or float N×C×H×W in [0, 1], and ``y``
    integer labels. ``num_classes`` defaults to ``max(y) + 1``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"npz file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            if "x" not in keys or "y" not in keys:
                raise DatasetError(f"{str(path)!r} must hold arrays 'x' and 'y'; found {keys}")
            x, y = f["x"], f["y"]
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetError(f"cannot read {str(path)!r} as a .npz archive: {exc}") from None
    if x.ndim != 4:
        raise DatasetError(f"{str(path)!r}: x must have 4 dimensions, found shape {x.shape}")
    if x.dtype == np.uint8:
        if x.shape[3] not in (1, 3):
            raise DatasetError(f"{str(path)!r}: uint8 x must be N×H×W×C with C 1 or 3, found {x.shape}")
        images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    elif np.issubdtype(x.dtype, np.floating):
        if x.shape[1] not in (1, 3) or x.min() < 0 or x.max() > 1:
            raise DatasetError(
                f"{str(path)!r}: float x must be N×C×H×W (C 1 or 3) in [0, 1], found shape "
                f"{x.shape} with values in [{x.min()}, {x.max()}]"
            )
        images = torch.from_numpy(x.astype(np.float32))
    else:
        raise DatasetError(f"{str(path)!r}: x must be uint8 or float, found {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),) or (len(y) and y.min() < 0):
        raise DatasetError(
            f"{str(path)!r}: y must hold {len(x)} non-negative integer labels, found {y.dtype} {y.shape}"
        )
    if num_classes is None:
        num_classes = int(y.max()) + 1
    elif not _is_int(num_classes) or num_classes < 1:
        raise ArgumentError(f"num_classes must be a positive integer, got {num_classes!r}")
    elif len(y) and int(y.max()) >= num_classes:
        raise DatasetError(
            f"{str(path)!r} holds label {int(y.max())}, but the model has {num_classes} classes "
            f"(num_classes; certify takes it from --model), so labels must be 0..{num_classes - 1}: "
            "check that --data belongs to --model, or relabel its y"
        )
    return ArrayDataset("npz", images, torch.from_numpy(y.astype(np.int64)), int(num_classes))


# ----------------------------------------------------------------------------- entry point

_READERS = {
    "cifar10": (cifar10, {"split"}),
    "imagenet": (imagenet, {"split", "synsets"}),
    "folder": (image_folder, {"classes", "labels_sorted"}),
    "npz": (npz, {"num_classes"}),
}


def load_dataset(
    name: str,
    root: PathLike,
    split: str = "test",
    skip: int = 1,
    max: Optional[int] = None,
    indices: Optional[Sequence[int]] = None,
    **kw: Any,
) -> ImageDataset:
    """Read a dataset from local disk and select the items to use.

    Parameters
    ----------
    name : str
        ``"cifar10"``, ``"imagenet"``, ``"folder"`` or ``"npz"``.
    root : str or Path
        Its directory (for ``npz``, the file).
    split : str
        ``"test"`` or ``"train"`` (and ``"val"``, the same as ``"test"``, for imagenet).
        Only cifar10 and imagenet have splits; the others need the default.
    skip, max : int
        Every ``skip``-th item with original index below ``max`` (None: all), as Cohen et
        al.'s ``certify.py`` selects its test points.
    indices : sequence of int, optional
        Original indices to take instead of ``skip``/``max``.
    **kw
        ``synsets`` for imagenet (see :func:`imagenet`), ``classes`` and ``labels_sorted``
        for folder (see :func:`image_folder`), ``num_classes`` for npz.

    Returns
    -------
    ImageDataset
        ``ds[i]`` is ``(x, label)``, ``x`` float32 C×H×W in [0, 1]; ``ds.indices[i]`` is
        the item's original index.
    """
    if name not in _READERS:
        raise ArgumentError(f"unknown dataset {name!r}; expected one of {sorted(_READERS)}")
    reader, accepted = _READERS[name]
    unknown = sorted(set(kw) - (accepted - {"split"}))
    if unknown:
        allowed = sorted(accepted - {"split"}) or "none"
        raise ArgumentError(f"{name} takes no argument {unknown[0]!r} (accepted: {allowed})")
    if "split" in accepted:
        kw["split"] = split
    elif split != "test":
        raise ArgumentError(f"{name} datasets have no splits; point root at the data to read")
    return reader(root, **kw).subset(skip, max, indices)
