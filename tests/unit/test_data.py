"""Data: sources, stratified seeded splits, the one preprocessing spec (identical in the Dataset and
in the bundle's standalone preprocess.py), clear errors for bad data, sample grids, calibration_data."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgemml.config import DataConfig, PreprocessConfig, SplitConfig
from edgemml.data import (
    ImageDataset,
    data_files,
    load_data,
    load_image,
    preprocess_batch,
    preprocess_image,
    save_sample_grid,
)
from edgemml.data.calibration import write_digits
from edgemml.errors import InputError

REPO = Path(__file__).resolve().parents[2]
PREPROCESS_PY = REPO / "edgemml" / "data" / "preprocess.py"


def _load(tmp: Path, source: str, *, seed: int = 0, pre: PreprocessConfig | None = None, **kw):
    return load_data(DataConfig(source=source, **kw), pre or PreprocessConfig(), seed=seed, base_dir=tmp)


# ------------------------------------------------------------------------------------------------
# A tiny image-folder set made of crops of real photos (offline: skimage / sklearn bundled images)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("photos") / "set"
    china, flower = load_sample_images().images
    photos = {"cat": skd.chelsea(), "coffee": skd.coffee(), "rocket": skd.rocket(), "china": china,
              "flower": flower, "camera": skd.camera()}
    rng = np.random.default_rng(0)
    for name, img in photos.items():
        folder = root / name
        folder.mkdir(parents=True)
        h, w = img.shape[:2]
        for i in range(6):
            y, x = rng.integers(0, h - 96), rng.integers(0, w - 128)
            crop = Image.fromarray(img[y:y + 96, x:x + 128])
            if name == "flower" and i % 2:
                crop.save(folder / f"{i:02d}.jpg", quality=90)
            elif name == "china" and i == 0:
                crop.convert("RGBA").save(folder / f"{i:02d}.png")  # alpha channel
            elif name == "china" and i == 1:
                crop.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / f"{i:02d}.png")
            else:
                crop.save(folder / f"{i:02d}.png")  # camera: grayscale PNGs
    (root / "cat" / "notes.txt").write_text("not an image, ignored")
    return root


def test_image_folder(photo_tree: Path) -> None:
    splits = _load(photo_tree.parent, "set", split=SplitConfig(train=0.5, val=0.0, test=0.5))
    assert splits.classes == ["camera", "cat", "china", "coffee", "flower", "rocket"]
    assert len(splits.train) == 18 and len(splits.val) == 0 and len(splits.test) == 18
    assert splits.train.class_counts() == {c: 3 for c in splits.classes}
    for i in range(len(splits.train)):
        x, y = splits.train[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 6
    # grayscale source converts to 3 equal channels when the spec asks for rgb
    cam = next(i for i in range(len(splits.train)) if splits.train.labels[i] == 0)
    x, _ = splits.train[cam]
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    files = data_files(DataConfig(source="set"), photo_tree.parent)
    assert len(files) == 36 and all(f.suffix in (".png", ".jpg") for f in files)


@pytest.mark.parametrize("pre", [
    PreprocessConfig(),
    PreprocessConfig(size=(40, 24), resize="shorter_center_crop", interpolation="bicubic",
                     channels="bgr", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    PreprocessConfig(size=(28, 28), resize="letterbox", channels="gray", layout="NHWC",
                     interpolation="nearest", mean=[0.1], std=[0.3]),
])
def test_training_and_bundle_preprocessing_identical(photo_tree: Path, tmp_path: Path,
                                                     pre: PreprocessConfig) -> None:
    """The Dataset item equals what the bundle computes from the same file with a standalone copy
    of preprocess.py (imported with torch and edgemml unavailable)."""
    splits = _load(photo_tree.parent, "set", pre=pre, split=SplitConfig(train=1.0, val=0, test=0))
    ds = splits.train
    spec = pre.model_dump(mode="json")
    files = [str(f) for f in ds.files]
    expected = np.stack([ds[i][0].numpy() for i in range(len(ds))])

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copy(PREPROCESS_PY, bundle / "preprocess.py")
    np.save(bundle / "expected.npy", expected)
    script = (
        "import sys, json, numpy as np\n"
        "sys.modules['torch'] = None; sys.modules['edgemml'] = None\n"
        "from preprocess import load_image, preprocess_batch\n"
        f"spec = json.loads({json_str(spec)!r}); files = json.loads({json_str(files)!r})\n"
        "got = preprocess_batch([load_image(f) for f in files], spec)\n"
        "exp = np.load('expected.npy')\n"
        "assert got.dtype == np.float32 and got.shape == exp.shape, (got.shape, exp.shape)\n"
        "assert np.array_equal(got, exp), float(np.abs(got - exp).max())\n"
        "print('identical', got.shape)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=bundle, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    h, w = pre.size
    c = 1 if pre.channels == "gray" else 3
    assert expected.shape[1:] == ((c, h, w) if pre.layout == "NCHW" else (h, w, c))
    # the same call in-process, and plain PIL.Image.open for ordinary RGB files
    for i, f in enumerate(files):
        assert np.array_equal(preprocess_image(load_image(f), spec), expected[i])
        with Image.open(f) as im:
            if im.mode == "RGB":
                assert np.array_equal(preprocess_image(im, spec), expected[i])


def json_str(value: object) -> str:
    import json

    return json.dumps(value)


def test_preprocess_imports_only_numpy_and_pillow() -> None:
    tree = ast.parse(PREPROCESS_PY.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots <= {"__future__", "numpy", "PIL", "pathlib", "typing"}, roots


def test_preprocess_math() -> None:
    img = np.zeros((4, 6, 3), np.uint8)
    img[..., 0] = 255  # pure red
    spec = {"size": [4, 6], "channels": "bgr", "mean": [0.5], "std": [0.5], "layout": "NHWC"}
    out = preprocess_image(img, spec)
    assert out.shape == (4, 6, 3) and out.dtype == np.float32
    assert np.allclose(out[..., 2], 1.0) and np.allclose(out[..., 0], -1.0)  # red went last
    wide = np.full((10, 40), 200, np.uint8)
    lb = preprocess_image(wide, {"size": [20, 20], "resize": "letterbox", "channels": "gray",
                                 "mean": [0], "std": [1]})
    assert lb.shape == (1, 20, 20) and lb[0, 0, 0] == 0 and lb[0, 10, 10] == pytest.approx(200 / 255)
    crop = preprocess_image(wide, {"size": [20, 20], "resize": "shorter_center_crop",
                                   "channels": "rgb"})
    assert crop.shape == (3, 20, 20)
    rgba = np.full((5, 5, 4), 100, np.uint8)
    assert preprocess_image(rgba, {"size": [5, 5]}).shape == (3, 5, 5)
    assert preprocess_batch([], {"size": [8, 8], "channels": "gray"}).shape == (0, 1, 8, 8)
    with pytest.raises(ValueError, match="shape"):
        preprocess_image(np.zeros((5, 5, 2), np.uint8), {})
    with pytest.raises(ValueError, match="unknown preprocess key"):
        preprocess_image(img, {"sise": [2, 2]})


# ------------------------------------------------------------------------------------------------
# Built-ins and splits
# ------------------------------------------------------------------------------------------------


def test_builtin_digits_stratified_split(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    splits = _load(tmp_path, "builtin:digits", seed=3)
    assert splits.classes == [str(i) for i in range(10)] and splits.source == "builtin:digits"
    per_class = np.bincount(load_digits().target)
    assert len(splits.val) == len(splits.test) == 270  # round(1797 * 0.15)
    for c, n in enumerate(per_class):
        n_val = splits.val.class_counts()[str(c)]
        n_test = splits.test.class_counts()[str(c)]
        assert abs(n_val - n * 0.15) < 1 and abs(n_test - n * 0.15) < 1
        assert splits.train.class_counts()[str(c)] == n - n_val - n_test
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    raw = splits.train.raw_image(0)
    assert raw.size == (8, 8) and raw.mode == "L"
    x, y = splits.train[0]
    assert x.shape == (3, 32, 32)
    # seeded: same seed same split, other seed other split, no overlap between splits
    again = _load(tmp_path, "builtin:digits", seed=3)
    other = _load(tmp_path, "builtin:digits", seed=4)
    assert np.array_equal(again.test.images, splits.test.images)
    assert not np.array_equal(other.test.images, splits.test.images)
    assert data_files(DataConfig(source="builtin:digits"), tmp_path) == []


def test_builtin_printed_digits(tmp_path: Path) -> None:
    pre = PreprocessConfig(size=(32, 32))
    a = _load(tmp_path, "builtin:printed-digits", samples=120, pre=pre, seed=1,
              split=SplitConfig(train=0.5, val=0.25, test=0.25))
    assert a.classes == [str(i) for i in range(10)]
    assert (len(a.train), len(a.val), len(a.test)) == (60, 30, 30)
    assert a.train.raw_image(0).mode == "RGB" and a.train.raw_image(0).size == (32, 32)
    assert a.train[0][0].shape == (3, 32, 32)
    b = _load(tmp_path, "builtin:printed-digits", samples=120, pre=pre, seed=1,
              split=SplitConfig(train=0.5, val=0.25, test=0.25))
    assert np.array_equal(a.train.images, b.train.images)  # deterministic
    c = _load(tmp_path, "builtin:printed-digits", samples=120, pre=pre, seed=2,
              split=SplitConfig(train=0.5, val=0.25, test=0.25))
    assert not np.array_equal(a.train.images, c.train.images)
    d = _load(tmp_path, "builtin:printed-digits", samples=30, options={"image_size": 24, "fonts":
              ["DejaVuSans.ttf", "pillow-default"]}, split=SplitConfig(train=1.0, val=0, test=0))
    assert d.train.images.shape == (30, 24, 24, 3)
    with pytest.raises(InputError, match="unknown font"):
        _load(tmp_path, "builtin:printed-digits", samples=10, options={"fonts": ["Comic.ttf"]})
    with pytest.raises(InputError, match="unknown option"):
        _load(tmp_path, "builtin:printed-digits", samples=10, options={"colour": "red"})


def test_train_per_class_and_samples(tmp_path: Path) -> None:
    splits = _load(tmp_path, "builtin:digits", train_per_class=5, seed=0)
    assert splits.train.class_counts() == {str(i): 5 for i in range(10)}
    assert len(splits.test) > 200  # the other splits keep everything
    sub = _load(tmp_path, "builtin:digits", samples=200, split=SplitConfig(train=0.5, val=0.25,
                                                                            test=0.25))
    assert len(sub.train) + len(sub.val) + len(sub.test) == 200


def test_with_augment(tmp_path: Path) -> None:
    splits = _load(tmp_path, "builtin:digits", pre=PreprocessConfig(size=(8, 8), channels="gray"))
    flipped = splits.with_augment("train", lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    x0, _ = splits.train[0]
    x1, _ = flipped[0]
    assert torch.equal(x1, torch.flip(x0, dims=[2]))
    assert splits.train.augment is None and len(flipped) == len(splits.train)


def test_explicit_split_folders(photo_tree: Path, tmp_path: Path) -> None:
    for split, names in (("train", ["00", "01", "02", "03"]), ("val", ["04"]), ("test", ["05"])):
        for cls in ("cat", "rocket"):
            (tmp_path / split / cls).mkdir(parents=True)
            for n in names:
                src = photo_tree / cls / f"{n}.png"
                shutil.copy(src, tmp_path / split / cls / src.name)
    cfg = DataConfig(source=".", splits={"train": Path("train"), "val": Path("val"),
                                         "test": Path("test")})
    splits = load_data(cfg, PreprocessConfig(), seed=0, base_dir=tmp_path)
    assert splits.classes == ["cat", "rocket"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 2)
    assert len(data_files(cfg, tmp_path)) == 12


def test_npz_source(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 12, 10, 3), dtype=np.uint8)
    y = np.arange(40) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y, classes=np.array(["a", "b", "c", "d"]))
    s = _load(tmp_path, "d.npz", split=SplitConfig(train=0.5, val=0.25, test=0.25))
    assert s.classes == ["a", "b", "c", "d"] and len(s.train) == 20
    assert s.train[0][0].shape == (3, 32, 32)
    assert data_files(DataConfig(source="d.npz"), tmp_path) == [tmp_path / "d.npz"]
    # NCHW floats in 0..1 and string labels
    np.savez(tmp_path / "f.npz", x=x.transpose(0, 3, 1, 2) / 255.0, y=np.array(["u", "v"] * 20))
    f = _load(tmp_path, "f.npz", split=SplitConfig(train=1.0, val=0, test=0))
    assert f.classes == ["u", "v"]
    assert f.train.images.shape == (40, 12, 10, 3) and np.array_equal(f.train.images, x)
    # renaming with data.classes
    r = _load(tmp_path, "d.npz", classes=["w", "x", "y", "z"])
    assert r.classes == ["w", "x", "y", "z"]


@pytest.mark.parametrize("arrays,match", [
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, 2, 5]),
      "classes": np.array(["a", "b", "c"])}, "labels outside the class list"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, -1, 0])}, "labels outside"),
    ({"x": np.zeros((4, 8, 8, 2), np.uint8), "y": np.zeros(4, int)}, "shape"),
    ({"x": np.zeros((4, 8, 8), np.uint8)}, "missing array 'y'"),
    ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.zeros(3, int)}, "4 samples but y has 3"),
    ({"x": np.full((4, 8, 8), 300.0), "y": np.zeros(4, int)}, "0..255"),
])
def test_npz_errors(tmp_path: Path, arrays: dict, match: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=match) as exc:
        _load(tmp_path, "bad.npz")
    assert "bad.npz" in str(exc.value)


def test_npz_with_pickled_objects_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "obj.npz", x=np.array([object()] * 4, dtype=object), y=np.zeros(4, int))
    with pytest.raises(InputError, match="obj.npz"):
        _load(tmp_path, "obj.npz")


def test_folder_errors(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("RGB", (8, 8)).save(root / "a" / "x.png")
    with pytest.raises(InputError, match="class folder .*b has no images"):
        _load(tmp_path, "imgs")
    Image.new("RGB", (8, 8)).save(root / "b" / "ok.png")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InputError, match="broken.png"):
        _load(tmp_path, "imgs")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x.png")
    with pytest.raises(InputError, match="no class folders"):
        _load(tmp_path, "flat")
    with pytest.raises(InputError, match="not found"):
        _load(tmp_path, "missing_dir")
    with pytest.raises(InputError, match="unknown built-in"):
        _load(tmp_path, "builtin:mnist")


def _tree(root: Path, layout: dict[str, int]) -> Path:
    for name, n in layout.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("L", (8, 8), color=20 * i).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("layout, match", [
    ({"a\u2028b": 3, "c": 3}, r"class name 'a\\u2028b' contains a line break"),  # shifted labels.txt
    ({"a\nb": 3, "c": 3}, r"class name 'a\\nb' contains a line break"),  # crashed the sample grid
    ({"a\tb": 3, "c": 3}, r"class name 'a\\tb' contains a control character"),
    ({"only": 6}, r"has 1 class \('only'\); a classifier needs at least 2"),
])
def test_class_names_that_break_labels_and_single_classes_are_refused(
        tmp_path: Path, layout: dict[str, int], match: str) -> None:
    _tree(tmp_path / "imgs", layout)
    with pytest.raises(InputError, match=match):
        _load(tmp_path, "imgs")


def test_what_an_image_folder_holds_but_is_not_read_is_reported(tmp_path: Path) -> None:
    root = _tree(tmp_path / "imgs", {"a": 4, "b": 4, ".thumbs": 2})
    (root / "b" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "c").symlink_to(tmp_path / "no-folder")
    Image.new("L", (8, 8)).save(root / "loose.png")
    Image.new("L", (8, 8)).save(root / "a" / "._a.png")
    splits = _load(tmp_path, "imgs", split=SplitConfig(train=1.0, val=0.0, test=0.0))
    notes = "\n".join(splits.notes)
    assert splits.classes == ["a", "b"] and len(splits.train) == 8
    assert "ignored hidden folders '.thumbs'" in notes
    assert "ignored 2 symbolic link(s) that point nowhere: 'b/gone.png', 'c'" in notes
    assert "ignored 1 image(s) outside the class folders: 'loose.png'" in notes
    assert "ignored 1 hidden image file(s): 'a/._a.png'" in notes


def test_class_without_training_samples_is_reported(tmp_path: Path) -> None:
    x = np.zeros((6, 4, 4), np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(6, np.int64), classes=np.array(["a", "b"]))
    splits = _load(tmp_path, "d.npz")
    assert any("without any training sample" in n and "'b'" in n for n in splits.notes)


def test_sample_grid_draws_any_class_name(tmp_path: Path) -> None:
    imgs = [np.full((8, 8), 40 * i, np.uint8) for i in range(4)]
    out = save_sample_grid(imgs, [0, 0, 1, 1], ["line\nbreak", "sep\u2028arator"], tmp_path / "g.png")
    assert out.stat().st_size > 100


def test_dataset_rejects_impossible_channels() -> None:
    ds = ImageDataset([np.zeros((4, 4, 2), np.uint8)], [0], ["a"], PreprocessConfig())
    with pytest.raises(InputError, match="shape"):
        ds[0]


def test_calibration_folder_option(tmp_path: Path) -> None:
    splits = load_data(DataConfig(source="builtin:digits", calibration=REPO / "calibration_data" /
                                  "digits"), PreprocessConfig(), seed=0, base_dir=tmp_path)
    assert len(splits.calibration) == 300 and splits.calibration.class_counts()["7"] == 30


# ------------------------------------------------------------------------------------------------
# Sample grids and the shipped calibration data
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["builtin:printed-digits", "builtin:digits"])
def test_sample_grid_png(tmp_path: Path, source: str) -> None:
    splits = _load(tmp_path, source, samples=200 if "printed" in source else None)
    out = save_sample_grid(splits.train, None, splits.classes,
                           tmp_path / f"grid_{source.split(':')[1]}.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        w, h = im.size
        assert 10 * 48 <= w <= 2000 and 10 * 48 <= h <= 2000
        assert np.asarray(im).std() > 20  # not blank
    # plain arrays + labels work too
    imgs = [splits.train.images[i] for i in range(12)]
    save_sample_grid(imgs, splits.train.labels[:12].tolist(), splits.classes, tmp_path / "g2.png")
    assert (tmp_path / "g2.png").stat().st_size > 100


def test_shipped_calibration_data_is_regenerable(tmp_path: Path) -> None:
    shipped = REPO / "calibration_data" / "digits"
    files = sorted(shipped.rglob("*.png"))
    assert len(files) == 300
    assert sorted(p.name for p in shipped.iterdir()) == [str(i) for i in range(10)]
    with Image.open(files[0]) as im:
        assert im.size == (8, 8) and im.mode == "L"
    write_digits(tmp_path)
    for f in files:
        assert (tmp_path / "digits" / f.relative_to(shipped)).read_bytes() == f.read_bytes()
    assert (REPO / "calibration_data" / "README.md").is_file()
