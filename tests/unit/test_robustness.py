"""edgemml.robustness on a small CNN trained here to a real accuracy (scikit-learn's 8x8 digits,
~95 % held-out top-1 after a few seconds): the attacks lower accuracy inside their budget and on the
8-bit grid, the model is left untouched, the corruptions follow Hendrycks' reference formulas and
grow with severity, and the pass replays crafted sets on runners (a transfer attack) with drops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgemml import robustness as rb
from edgemml.runtimes import Runner

SPEC = {"size": [8, 8], "channels": "gray", "mean": [0.5], "std": [0.5]}


@pytest.fixture(scope="module")
def digits() -> dict:
    from sklearn.datasets import load_digits

    torch.set_num_threads(1)
    d = load_digits()
    images = np.clip(np.rint(d.images / 16.0 * 255.0), 0, 255).astype(np.uint8)[..., None]
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:1400], order[1400:]
    space = rb.PixelSpace.from_spec(SPEC)
    x = space.from_uint8_nhwc(images)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(d.target[train])
    for step in range(300):
        idx = torch.randint(0, len(xt), (64,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return {"model": model, "space": space, "x": x[test], "y": d.target[test],
            "images": images[test]}


def _top1(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.inference_mode():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean() * 100)


def test_model_is_trained(digits: dict) -> None:
    assert _top1(digits["model"], digits["x"], digits["y"]) > 90


@pytest.mark.parametrize("spec", [
    {"channels": "gray", "mean": [0.5], "std": [0.5]},
    {"channels": "rgb", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    {"channels": "bgr", "mean": [0.4], "std": [0.3], "layout": "NHWC"},
])
def test_pixel_space_matches_preprocess(spec: dict) -> None:
    """Inputs made by edgemml's preprocess_image map back to their exact 8-bit pixels."""
    from edgemml.data.preprocess import preprocess_image

    img = np.random.default_rng(1).integers(0, 256, (8, 8, 3), np.uint8)
    full = {"size": [8, 8], **spec}
    x = preprocess_image(img, full)[None]
    space = rb.PixelSpace.from_spec(full)
    assert space.on_8bit_grid(x)
    pixels = space.to_uint8_nhwc(x)
    np.testing.assert_allclose(space.from_uint8_nhwc(pixels), x, atol=1e-6)
    if spec["channels"] == "gray":
        assert pixels.shape[-1] == 1
    else:
        np.testing.assert_array_equal(pixels[0], img[..., ::-1] if spec["channels"] == "bgr"
                                      else img)


def test_fgsm_stays_in_budget_on_the_grid_and_lowers_accuracy(digits: dict) -> None:
    space, x, y = digits["space"], digits["x"], digits["y"]
    box = rb.attacks.WhiteBox(digits["model"], space)
    sets = box.fgsm(x, y, [2 / 255, 16 / 255, 32 / 255], quantize=True)
    clean = _top1(digits["model"], x, y)
    accs = [_top1(digits["model"], v, y) for v in sets.values()]
    assert accs[-1] < clean - 20, (clean, accs)        # the attack works
    assert accs[0] >= accs[1] >= accs[2]                # larger budget, lower accuracy
    base = space.to_uint8_nhwc(x).astype(int)
    for eps, inputs in sets.items():
        assert np.abs(space.to_uint8_nhwc(inputs).astype(int) - base).max() <= round(eps * 255)
        assert space.on_8bit_grid(inputs)               # replayable as real 8-bit images


def test_pgd_is_seeded_in_budget_and_stronger_than_fgsm(digits: dict) -> None:
    space, x, y = digits["space"], digits["x"][:200], digits["y"][:200]
    box = rb.attacks.WhiteBox(digits["model"], space, batch_size=64)
    kw = dict(eps=24 / 255, steps=5, step_size=None, random_start=True, quantize=True)
    a = box.pgd(x, y, seed=3, **kw)
    np.testing.assert_array_equal(a, rb.attacks.WhiteBox(digits["model"], space, batch_size=128)
                                  .pgd(x, y, seed=3, **kw))  # the batch size changes nothing
    assert not np.array_equal(a, box.pgd(x, y, seed=4, **kw))  # the seed is used
    fgsm = box.fgsm(x, y, [24 / 255], quantize=True)[24 / 255]
    assert _top1(digits["model"], a, y) < _top1(digits["model"], fgsm, y)
    delta = space.to_uint8_nhwc(a).astype(int) - space.to_uint8_nhwc(x).astype(int)
    assert np.abs(delta).max() <= 24


def test_the_attack_leaves_the_model_untouched(digits: dict) -> None:
    model = digits["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    rb.attacks.WhiteBox(model, digits["space"]).pgd(
        digits["x"][:32], digits["y"][:32], eps=4 / 255, steps=2, step_size=None,
        random_start=True, seed=0, quantize=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    for g, p in zip(grads, model.parameters()):  # no weight gradient computed or accumulated
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)


# ---- corruptions ---------------------------------------------------------------------------------


def _images(rgb: bool) -> np.ndarray:
    return np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3 if rgb else 1), np.uint8)


@pytest.mark.parametrize("rgb", [False, True])
@pytest.mark.parametrize("severity", [1, 5])
def test_gaussian_blur_is_skimage_gaussian(rgb: bool, severity: int) -> None:
    """Hendrycks: gaussian(x / 255, sigma=c, multichannel=True), channel_axis=-1 since skimage
    0.19."""
    from skimage.filters import gaussian

    imgs = _images(rgb)
    c = rb.SEVERITY_TABLES["imagenet-c"]["gaussian_blur"][severity - 1]
    want = np.stack([(np.clip(gaussian(i / 255.0, sigma=c, channel_axis=-1), 0, 1) * 255)
                     .astype(np.uint8) for i in imgs])
    got = rb.corrupt(imgs, "gaussian_blur", severity, table="imagenet-c")
    assert np.abs(got.astype(int) - want).max() <= 1  # float rounding at .999 boundaries only
    assert (got == want).mean() > 0.999


@pytest.mark.parametrize("severity", [1, 5])
def test_brightness_is_skimage_hsv(severity: int) -> None:
    from skimage.color import hsv2rgb, rgb2hsv

    imgs = _images(True)
    c = rb.SEVERITY_TABLES["cifar-10-c"]["brightness"][severity - 1]
    want = []
    for i in imgs:
        hsv = rgb2hsv(i / 255.0)
        hsv[:, :, 2] = np.clip(hsv[:, :, 2] + c, 0, 1)
        want.append((np.clip(hsv2rgb(hsv), 0, 1) * 255).astype(np.uint8))
    got = rb.corrupt(imgs, "brightness", severity, table="cifar-10-c")
    assert np.abs(got.astype(int) - np.stack(want)).max() <= 1


def test_contrast_noise_and_jpeg_formulas() -> None:
    from io import BytesIO

    from PIL import Image

    imgs = _images(False)
    x = imgs / 255.0
    m = x.mean(axis=(1, 2), keepdims=True)
    want = (np.clip((x - m) * 0.3 + m, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(rb.corrupt(imgs, "contrast", 4, table="cifar-10-c"), want)
    noisy = rb.corrupt(imgs, "gaussian_noise", 5, seed=(7, 0))
    np.testing.assert_array_equal(noisy, rb.corrupt(imgs, "gaussian_noise", 5, seed=(7, 0)))
    assert not np.array_equal(noisy, rb.corrupt(imgs, "gaussian_noise", 5, seed=(7, 1)))
    buf = BytesIO()
    Image.fromarray(imgs[0, ..., 0]).save(buf, format="JPEG", quality=7)
    np.testing.assert_array_equal(rb.corrupt(imgs[:1], "jpeg", 5)[0, ..., 0],
                                  np.asarray(Image.open(buf)))


@pytest.mark.parametrize("name", rb.CORRUPTIONS)
def test_severity_grows(name: str, digits: dict) -> None:
    imgs = digits["images"][:64]
    dist = [np.abs(rb.corrupt(imgs, name, s).astype(int) - imgs).mean() for s in range(1, 6)]
    assert all(a <= b + 1e-9 for a, b in zip(dist, dist[1:])), dist
    assert dist[-1] > dist[0]


def test_table_auto_and_bad_arguments() -> None:
    small, big = _images(False), np.zeros((1, 224, 224, 3), np.uint8)
    assert rb.resolve_table("auto", small.shape) == "cifar-10-c"
    assert rb.resolve_table("auto", big.shape) == "imagenet-c"
    with pytest.raises(ValueError, match="severity"):
        rb.corrupt(small, "contrast", 6)
    with pytest.raises(ValueError, match="unknown corruption"):
        rb.corrupt(small, "fog", 1)
    with pytest.raises(ValueError, match="uint8"):
        rb.corrupt(small.astype(np.float32), "contrast", 1)


# ---- the pass: crafted on torch, replayed on runners ---------------------------------------------


def _chunks(x: np.ndarray, y: np.ndarray, size: int = rb.CHUNK):
    for i in range(0, len(y), size):
        yield x[i:i + size], y[i:i + size]


def test_the_pass_replays_on_runners_with_drops_and_transfer(digits: dict) -> None:
    from edgemml import runtimes

    model, space, x, y = digits["model"], digits["space"], digits["x"], digits["y"]
    ref = runtimes.backend("torch").open_module(model, threads=1, name="torch")

    def coarse(batch: np.ndarray) -> np.ndarray:  # an "int8-like" artifact with a static batch
        assert len(batch) == 7
        return np.round(ref(batch), 0)

    art = Runner("onnx-int8", "test", 1, "int8", coarse, static_batch=7)
    settings = rb.Settings(fgsm_eps=(16 / 255, 32 / 255), pgd_eps=16 / 255, pgd_steps=3,
                           corruptions=("contrast", "gaussian_noise"), severities=(1, 5))
    seen: list[int] = []
    run = rb.measure([rb.Member("torch", ref, model=model),
                      rb.Member("onnx-int8", art, source="torch", reference="torch")],
                     _chunks(x, y, 150), space, settings, advance=seen.append)
    assert sum(seen) == run.n == len(y) and run.table == "imagenet-c"
    torch_r, int8_r = run.results["torch"], run.results["onnx-int8"]
    assert [s.key for s in torch_r.sets] == [
        "clean", "fgsm@16/255", "fgsm@32/255", "pgd@16/255", "contrast@1", "contrast@5",
        "gaussian_noise@1", "gaussian_noise@5"]
    top1 = {s.key: s.top1_pct for s in torch_r.sets}
    assert top1["clean"] == pytest.approx(_top1(model, x, y))   # the one accuracy function
    assert top1["fgsm@32/255"] < top1["clean"] - 20               # the attack works
    assert top1["pgd@16/255"] <= top1["fgsm@16/255"]              # iterating is no weaker
    for c in ("contrast", "gaussian_noise"):                       # severity 5 hurts more
        assert top1[f"{c}@5"] < top1[f"{c}@1"], top1
    assert not torch_r.transfer and torch_r.crafted_on == "torch"
    assert int8_r.transfer and int8_r.reference == "torch"
    assert int8_r.reference_inputs == "same inputs"
    for s in int8_r.sets:
        assert s.drop_vs_reference_pp == pytest.approx(s.reference_top1_pct - s.top1_pct)
    d = torch_r.as_dict()
    assert d["worst_drop_pp"] == 0.0 and d["worst_top1_set"] in top1
    assert d["worst_top1_pct"] == min(v for k, v in top1.items() if k != "clean")
    assert set(run.timing) == {"replay torch", "replay onnx-int8", "attack on torch",
                               "corruptions"}
    assert all(t["wall_s"] > 0 and t["cpu_s"] >= 0 for t in run.timing.values())
    g = rb.gap(int8_r, torch_r, "int8 vs fp32")
    assert g["inputs"] == "same inputs" and g["sets_pp"]["clean"] == pytest.approx(
        top1["clean"] - int8_r.sets[0].top1_pct)


def test_without_a_torch_model_only_corruptions_are_measured(digits: dict) -> None:
    from edgemml import runtimes

    runner = runtimes.backend("torch").open_module(digits["model"], threads=1, name="onnx-fp32")
    run = rb.measure([rb.Member("onnx-fp32", runner)], _chunks(digits["x"], digits["y"]),
                     digits["space"], rb.Settings(corruptions=("contrast",), severities=(5,)))
    result = run.results["onnx-fp32"]
    assert [s.key for s in result.sets] == ["clean", "contrast@5"]
    assert result.crafted_on is None and not result.transfer
    assert "no torch model" in result.notes[0]
    assert rb.eps_label(4 / 255) == "4/255" and rb.eps_label(0.01) == "0.01"
