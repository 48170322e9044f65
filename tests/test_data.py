"""Dataset readers on files written in the official formats, subsetting, bad layouts."""
import pickle
import sys
import zipfile

import numpy as np
import pytest
import torch

from ancer.data import CIFAR10_CLASSES, class_names, load_dataset, resize_center_crop
from ancer.errors import ArgumentError, DatasetError

Image = pytest.importorskip("PIL.Image")

SYNSETS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]


def _batch(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), rng.integers(0, 10, size=n).tolist()


@pytest.fixture
def cifar_batches(tmp_path):
    """Small batches in both official layouts: the test batch (7 images) and five train
    batches (3 images each), as uint8 N×3072 (channel, row, column) with labels."""
    batches = {"test_batch": _batch(7, 0)}
    batches.update({f"data_batch_{i}": _batch(3, i) for i in range(1, 6)})
    py, bin_ = tmp_path / "py" / "cifar-10-batches-py", tmp_path / "bin" / "cifar-10-batches-bin"
    py.mkdir(parents=True)
    bin_.mkdir(parents=True)
    for name, (data, labels) in batches.items():
        with open(py / name, "wb") as f:
            batch = {b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": []}
            pickle.dump(batch, f, protocol=2)
        records = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], data], axis=1)
        records.tofile(bin_ / f"{name}.bin")
    return tmp_path, batches


def _exact(ds, data, labels):
    assert len(ds) == len(data) and ds.num_classes == 10 and ds.name == "cifar10"
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
        assert torch.equal((x * 255).round().to(torch.uint8).flatten(), torch.from_numpy(data[i]))
        assert y == labels[i] and isinstance(y, int)


@pytest.mark.parametrize("layout", ["py", "bin"])
def test_cifar10_readers_return_exact_pixels_and_labels(cifar_batches, layout):
    root, batches = cifar_batches
    data, labels = batches["test_batch"]
    _exact(load_dataset("cifar10", root / layout), data, labels)
    inner = root / layout / f"cifar-10-batches-{layout}"
    _exact(load_dataset("cifar10", inner, split="test"), data, labels)
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    _exact(load_dataset("cifar10", inner, split="train"),
           np.concatenate([d for d, _ in train]), sum((l for _, l in train), []))
    assert load_dataset("cifar10", inner).classes[3] == "cat"


def test_cohen_style_subsetting(cifar_batches):
    root, batches = cifar_batches
    data, labels = batches["test_batch"]
    ds = load_dataset("cifar10", root / "py", skip=2)
    assert ds.indices == [0, 2, 4, 6] and ds[1][1] == labels[2]
    assert load_dataset("cifar10", root / "py", skip=2, max=5).indices == [0, 2, 4]
    assert load_dataset("cifar10", root / "py", max=3).indices == [0, 1, 2]
    ds = load_dataset("cifar10", root / "py", indices=[6, 1])
    assert ds.indices == [6, 1] and ds[0][1] == labels[6] and ds[-1][1] == labels[1]
    with pytest.raises(IndexError):
        ds[2]


@pytest.mark.parametrize(
    "kw",
    [{"skip": 0}, {"skip": 1.5}, {"max": 0}, {"indices": [7]}, {"indices": [-1]},
     {"indices": [1], "skip": 2}, {"split": "validation"}, {"synsets": "x"}],
)
def test_bad_subset_arguments(cifar_batches, kw):
    with pytest.raises(ArgumentError):
        load_dataset("cifar10", cifar_batches[0] / "py", **kw)


def test_cifar_bad_files(cifar_batches, tmp_path):
    root = cifar_batches[0]
    with pytest.raises(DatasetError, match=r"expected cifar-10-batches-py.*found: bin/, py/"):
        load_dataset("cifar10", root)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("cifar10", root / "nowhere")
    only_test = tmp_path / "only" / "cifar-10-batches-py"
    only_test.mkdir(parents=True)
    (only_test / "test_batch").write_bytes((root / "py" / "cifar-10-batches-py" / "test_batch").read_bytes())
    with pytest.raises(DatasetError, match="lacks data_batch_1"):
        load_dataset("cifar10", only_test, split="train")
    cut = tmp_path / "cut" / "cifar-10-batches-bin"
    cut.mkdir(parents=True)
    (cut / "test_batch.bin").write_bytes(b"\x00" * 3074)
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("cifar10", cut)


class _Evil:
    def __reduce__(self):
        return (print, ("this must not run",))


def test_cifar_pickle_reader_refuses_other_globals(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DatasetError, match="refusing to load global .*print"):
        load_dataset("cifar10", tmp_path)
    assert "must not run" not in capsys.readouterr().out


def _jpeg(path, size, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, quality=95)


@pytest.fixture
def imagenet_val(tmp_path):
    """val/<synset>/*.JPEG for two of the five synsets, of different sizes and modes."""
    _jpeg(tmp_path / "val" / SYNSETS[1] / "a.JPEG", (300, 260), (200, 30, 30))
    _jpeg(tmp_path / "val" / SYNSETS[1] / "b.JPEG", (240, 500), (30, 200, 30))
    (tmp_path / "val" / SYNSETS[3]).mkdir()
    Image.new("L", (256, 256), 90).save(tmp_path / "val" / SYNSETS[3] / "c.JPEG")
    (tmp_path / "val" / SYNSETS[3] / "notes.txt").write_text("not an image")
    return tmp_path


def test_imagenet_reader_decodes_with_full_synset_labels(imagenet_val, tmp_path):
    synsets_txt = tmp_path / "synsets.txt"
    synsets_txt.write_text("".join(f"{s} name_{i}\n" for i, s in enumerate(SYNSETS)))
    for synsets in (synsets_txt, SYNSETS):
        ds = load_dataset("imagenet", imagenet_val, synsets=synsets)
        assert (len(ds), ds.num_classes, ds.name, ds.indices) == (3, 5, "imagenet", [0, 1, 2])
        items = [ds[i] for i in range(3)]
        assert [y for _, y in items] == [1, 1, 3]
        for x, _ in items:
            assert x.shape == (3, 224, 224) and x.dtype == torch.float32
            assert 0 <= x.min() and x.max() <= 1
        assert torch.allclose(items[0][0].mean(dim=(1, 2)), torch.tensor([200, 30, 30]) / 255, atol=0.03)
        assert torch.allclose(items[2][0], torch.full((3, 224, 224), 90 / 255), atol=0.03)
    ds = load_dataset("imagenet", imagenet_val / "val", split="val", synsets=SYNSETS, indices=[2])
    assert ds[0][1] == 3


def test_imagenet_without_synset_list_refuses_partial_folder(imagenet_val):
    with pytest.raises(DatasetError, match="holds 2 of ImageNet's 1000 classes.*--synsets FILE"):
        load_dataset("imagenet", imagenet_val)
    with pytest.raises(DatasetError, match="not in the synset list: n01491361"):
        load_dataset("imagenet", imagenet_val, synsets=SYNSETS[:2])


@pytest.mark.parametrize("name", ["synsets.txt", "LOC_synset_mapping.txt"])
@pytest.mark.parametrize("where", ["val", "."])
def test_imagenet_finds_a_synset_list_in_or_beside_the_folder(imagenet_val, name, where):
    (imagenet_val / where / name).write_text("".join(f"{s} name {i}\n" for i, s in enumerate(SYNSETS)))
    ds = load_dataset("imagenet", imagenet_val / "val", split="val")
    assert ds.num_classes == 5 and [ds[i][1] for i in range(3)] == [1, 1, 3]


def test_imagenet_wrong_layout(tmp_path):
    _jpeg(tmp_path / "images" / "dog.jpg", (10, 10), (0, 0, 0))
    with pytest.raises(DatasetError, match=r"expected folders named by synset.*found: images/"):
        load_dataset("imagenet", tmp_path, synsets=SYNSETS)


def test_resize_center_crop_is_torchvisions():
    rows = np.repeat((np.arange(512) // 2).astype(np.uint8)[:, None], 256, axis=1)
    out = np.asarray(resize_center_crop(Image.fromarray(rows).convert("RGB")))
    assert out.shape == (224, 224, 3)
    assert out[0, 0, 0] == 144 // 2 and out[-1, 0, 0] == (144 + 223) // 2  # top = round((512 - 224) / 2)
    assert resize_center_crop(Image.new("RGB", (500, 375))).size == (224, 224)


def test_image_folder_reads_exact_pixels(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for cls in ("dog", "cat"):
        (tmp_path / cls).mkdir()
        for k in range(2):
            arrays[(cls, k)] = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
            Image.fromarray(arrays[(cls, k)]).save(tmp_path / cls / f"{k}.png")
    (tmp_path / ".hidden").mkdir()
    ds = load_dataset("folder", tmp_path)
    assert (ds.classes, ds.num_classes, len(ds)) == (["cat", "dog"], 2, 4)
    x, y = ds[3]
    assert y == 1 and x.shape == (3, 8, 6)
    expected = torch.from_numpy(arrays[("dog", 1)]).permute(2, 0, 1)
    assert torch.equal((x * 255).round().to(torch.uint8), expected)
    with pytest.raises(DatasetError, match=r"expected <class>/<image>.png\|jpg.*found: an empty directory"):
        load_dataset("folder", tmp_path / ".hidden")


def _class_folders(root, names):
    for name in names:
        (root / name).mkdir()
        Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(root / name / "0.png")


def test_image_folder_labels_folders_by_the_models_class_names(tmp_path):
    _class_folders(tmp_path, ("cat", "dog"))
    ds = load_dataset("folder", tmp_path, classes=CIFAR10_CLASSES)
    assert [ds[i][1] for i in range(len(ds))] == [3, 5] and ds.num_classes == 10
    (tmp_path / "synsets.txt").write_text("n0\nn1\ncat\nn3\nn4\ndog\n")  # a file of names
    assert [y for _, y in load_dataset("folder", tmp_path, classes=tmp_path / "synsets.txt")] == [2, 5]
    assert [y for _, y in load_dataset("folder", tmp_path)] == [0, 1]   # no model: sorted


def test_image_folder_refuses_names_the_model_does_not_have(tmp_path):
    _class_folders(tmp_path, ("cats", "dogs"))
    with pytest.raises(DatasetError, match=r"class folder 'cats' .* not one of the model's 10 "
                                           r"classes .*labels_sorted=True \(certify: --labels-sorted\)"):
        load_dataset("folder", tmp_path, classes=CIFAR10_CLASSES)
    ds = load_dataset("folder", tmp_path, classes=CIFAR10_CLASSES, labels_sorted=True)
    assert [y for _, y in ds] == [0, 1]


def test_class_names_of_a_model():
    assert class_names("cifar10")[3] == "cat" and class_names(None) is None
    assert class_names("imagenet") is None and class_names("imagenet", ["n1", "n2"]) == ["n1", "n2"]


def test_missing_pillow_gives_a_clear_message(tmp_path, monkeypatch):
    _jpeg(tmp_path / "a" / "x.jpg", (4, 4), (0, 0, 0))
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DatasetError, match="needs Pillow.*pip install pillow"):
        load_dataset("folder", tmp_path)


def test_npz_reader(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    y = np.array([3, 8, 8, 0, 6], dtype=np.uint8)
    np.savez(tmp_path / "u8.npz", x=x, y=y)
    ds = load_dataset("npz", tmp_path / "u8.npz", num_classes=10)
    assert (len(ds), ds.num_classes, ds[4][1]) == (5, 10, 6)
    assert torch.equal((ds[1][0] * 255).round().to(torch.uint8), torch.from_numpy(x[1]).permute(2, 0, 1))
    xf = rng.random((2, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=xf, y=np.array([0, 1]))
    ds = load_dataset("npz", tmp_path / "f.npz")
    assert ds.num_classes == 2 and torch.equal(ds[1][0], torch.from_numpy(xf[1]))

    np.savez(tmp_path / "keys.npz", images=x, y=y)
    with pytest.raises(DatasetError, match=r"must hold arrays 'x' and 'y'; found \['images', 'y'\]"):
        load_dataset("npz", tmp_path / "keys.npz")
    np.savez(tmp_path / "range.npz", x=xf * 3, y=np.array([0, 1]))
    with pytest.raises(DatasetError, match=r"in \[0, 1\]"):
        load_dataset("npz", tmp_path / "range.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset("npz", tmp_path / "junk.npz")
    with pytest.raises(DatasetError, match=r"u8.npz' holds label 8, but the model has 5 classes"):
        load_dataset("npz", tmp_path / "u8.npz", num_classes=5)
    with pytest.raises(ArgumentError, match="num_classes must be a positive integer"):
        load_dataset("npz", tmp_path / "u8.npz", num_classes=2.5)


def test_load_dataset_argument_errors(tmp_path):
    with pytest.raises(ArgumentError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(ArgumentError, match="takes no argument 'synsets'"):
        load_dataset("folder", tmp_path, synsets=SYNSETS)
    with pytest.raises(ArgumentError, match="no splits"):
        load_dataset("npz", tmp_path / "a.npz", split="train")


def test_shared_exact_cifar_sample(shared_data):
    path = shared_data / "cifar10" / "cifar10-test-exact-first100.npz"
    if not path.is_file():
        pytest.skip("exact CIFAR-10 sample absent")
    ds = load_dataset("npz", path, num_classes=10)
    assert len(ds) == 100 and ds[0][0].shape == (3, 32, 32)
    assert [ds[i][1] for i in range(10)] == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


def test_shared_imagenet_sample(shared_data, tmp_path):
    archive = shared_data / "imagenet-sample" / "imagenet-sample-val.zip"
    synsets = shared_data / "imagenet-sample" / "synsets.txt"
    if not archive.is_file() or not synsets.is_file():
        pytest.skip("ImageNet sample absent")
    with zipfile.ZipFile(archive) as z:
        members = sorted(n for n in z.namelist() if n.endswith(".JPEG"))[::100][:3]
        for name in members:
            z.extract(name, tmp_path)
    order = [line.split()[0] for line in synsets.read_text().splitlines() if line.strip()]
    ds = load_dataset("imagenet", tmp_path, synsets=synsets)
    assert ds.num_classes == 1000 and len(ds) == len(members)
    for i, name in enumerate(members):
        x, y = ds[i]
        assert x.shape == (3, 224, 224) and 0 <= x.min() and x.max() <= 1
        assert y == order.index(name.split("/")[1])


def test_shared_cifar_jpeg_zip_as_image_folder(shared_data, tmp_path):
    archive = shared_data / "cifar10" / "cifar10-test-jpeg.zip"
    if not archive.is_file():
        pytest.skip("CIFAR-10 JPEG zip absent")
    with zipfile.ZipFile(archive) as z:
        names = [n for n in z.namelist() if n.lower().endswith(".jpg")]
        for cls in ("airplane", "truck"):
            for name in [n for n in names if f"/{cls}/" in n][:2]:
                z.extract(name, tmp_path)
    ds = load_dataset("folder", tmp_path / "test")
    assert ds.classes == ["airplane", "truck"] and [ds[i][1] for i in range(4)] == [0, 0, 1, 1]
    assert ds[0][0].shape == (3, 32, 32)
