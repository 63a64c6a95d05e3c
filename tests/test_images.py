"""Image decoding + preprocessing: DALI and PIL backends on real files written to tmp_path.

Tolerance for DALI vs PIL: both resize in float with the same bilinear /
antialiased triangle filter and clamped borders, so they differ only by float
rounding (measured max |diff| ~1e-6 after CLIP normalisation on these images).
The bound asserted, 1e-4, is 150x below one 8-bit step after normalisation
(1 / (255 * 0.2613) = 0.015): a different filter, border rule, rounding to
uint8 or decoder (e.g. JPEG upsampling) would all exceed it.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from megatron_stgc.data import images as images_module
from megatron_stgc.data.images import (CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, BadImage,
                                       ImageLoaderUnavailable, ImagePreprocessor, dali_available)

PARITY_TOL = 1e-4  # DALI vs PIL, after normalisation (see module docstring)
NORM_TOL = 1e-5  # a constant image vs the closed form (c / 255 - mean) / std

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not installed")
BACKENDS = [pytest.param("dali", marks=needs_dali), "pil"]


def _gradient(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                     (x * 37 + y * 11) % 256], axis=-1).astype(np.uint8)


def _shapes(h: int, w: int) -> Image.Image:
    image = Image.new("RGB", (w, h), (20, 40, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((w // 8, h // 8, w * 5 // 8, h * 5 // 8), fill=(250, 220, 10))
    draw.rectangle((w // 2, h // 3, w - 3, h - 4), fill=(200, 30, 60), outline=(0, 0, 0))
    draw.line((0, h - 1, w - 1, 0), fill=(255, 255, 255), width=2)
    return image


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    files = {}

    def save(name, image, **kwargs):
        path = root / name
        image.save(path, **kwargs)
        files[name] = str(path)

    save("gradient_48x64.png", Image.fromarray(_gradient(48, 64)))
    save("shapes_40x40.jpg", _shapes(40, 40), quality=90)
    save("shapes_45x70.jpg", _shapes(45, 70), quality=75)  # 4:2:0 chroma, odd size
    save("tiny_8x8.png", Image.fromarray(_gradient(8, 8)))  # upscaled 4x
    save("gray_50x30.png", Image.fromarray(_gradient(50, 30)[:, :, 0]).convert("L"))
    save("gray_37x53.jpg", _shapes(37, 53).convert("L"), quality=85)
    save("exact_32x32.png", Image.fromarray(_gradient(32, 32)))
    save("noise_100x77.png", Image.fromarray(rng.integers(0, 256, (100, 77, 3), dtype=np.uint8)))
    save("rgba_20x30.png", Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)))
    save("palette_33x21.png", _shapes(33, 21).quantize(8))
    rotated = _shapes(24, 40)
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    save("exif_rotated_24x40.jpg", rotated, quality=90, exif=exif)

    save("constant_17x23.png", Image.new("RGB", (23, 17), (200, 30, 120)))
    save("animation.gif", _shapes(30, 30).quantize(16))  # DALI has no GIF decoder

    garbage = root / "garbage.png"
    garbage.write_bytes(b"this is not an image, only some text " * 10)
    files["garbage.png"] = str(garbage)
    buffer = io.BytesIO()
    _shapes(64, 64).save(buffer, "JPEG", quality=90)
    truncated = root / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    files["truncated.jpg"] = str(truncated)
    empty = root / "empty.png"
    empty.write_bytes(b"")
    files["empty.png"] = str(empty)
    files["missing.png"] = str(root / "no_such_dir" / "missing.png")
    return files


PARITY_FILES = ["gradient_48x64.png", "shapes_40x40.jpg", "shapes_45x70.jpg", "tiny_8x8.png",
                "gray_50x30.png", "gray_37x53.jpg", "exact_32x32.png", "noise_100x77.png",
                "rgba_20x30.png", "palette_33x21.png", "exif_rotated_24x40.jpg"]


# ---------------------------------------------------------------------- DALI == PIL


@needs_dali
@pytest.mark.parametrize("img_h,img_w", [(32, 32), (24, 40)])
def test_dali_and_pil_agree(image_dir, img_h, img_w):
    paths = [image_dir[name] for name in PARITY_FILES]
    dali = ImagePreprocessor(img_h, img_w, CLIP_MEAN, CLIP_STD, backend="dali", max_batch=16)
    pil = ImagePreprocessor(img_h, img_w, CLIP_MEAN, CLIP_STD, backend="pil")
    assert (dali.backend_name, pil.backend_name) == ("dali", "pil")
    from_dali, from_pil = dali(paths), pil(paths)
    assert from_dali.shape == from_pil.shape == (len(paths), 3, img_h, img_w)
    diff = (from_dali - from_pil).abs().amax(dim=(1, 2, 3))
    print(f"\nDALI vs PIL max |diff| at {img_h}x{img_w}: " + ", ".join(
        f"{name}={d:.2e}" for name, d in zip(PARITY_FILES, diff.tolist())))
    assert diff.max().item() < PARITY_TOL, dict(zip(PARITY_FILES, diff.tolist()))
    assert dali.stats["pil_fallbacks"] == 0  # every one of these decoded by DALI itself


# ---------------------------------------------------------------------- shape, normalisation


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mean,std", [(CLIP_MEAN, CLIP_STD), (SIGLIP_MEAN, SIGLIP_STD)])
def test_constant_colour_normalises_exactly(image_dir, backend, mean, std):
    loader = ImagePreprocessor(32, 32, mean, std, backend=backend)
    out = loader([image_dir["constant_17x23.png"]])
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    assert out.device == torch.device("cpu") and out.is_contiguous()
    expected = (torch.tensor([200.0, 30.0, 120.0], dtype=torch.float64) / 255
                - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std, dtype=torch.float64)
    err = (out[0].double() - expected[:, None, None]).abs().max().item()
    assert err < NORM_TOL, err


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_grayscale_and_orientation(image_dir, backend):
    loader = ImagePreprocessor(24, 40, CLIP_MEAN, CLIP_STD, backend=backend)
    names = ["gray_50x30.png", "tiny_8x8.png", "exif_rotated_24x40.jpg"]
    out, failures = loader.load([image_dir[n] for n in names])
    assert failures == [] and out.shape == (3, 3, 24, 40) and out.dtype == torch.float32
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    pixels = out * std + mean  # back to [0, 1]
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5
    gray = pixels[0]
    assert (gray[0] - gray[1]).abs().max() < 1e-5 and (gray[0] - gray[2]).abs().max() < 1e-5
    # identity size: a 32x32 image resized to 32x32 is the image itself
    exact = ImagePreprocessor(32, 32, CLIP_MEAN, CLIP_STD, backend=backend)([
        image_dir["exact_32x32.png"]])[0]
    raw = torch.from_numpy(_gradient(32, 32)).permute(2, 0, 1).float() / 255
    assert ((exact * std + mean) - raw).abs().max() < 1e-5
    # EXIF orientation 6 is applied: the 24x40 (h x w) JPEG is shown 40x24, so its
    # top-left (after display rotation) is the stored bottom-left corner
    upright = ImagePreprocessor(40, 24, CLIP_MEAN, CLIP_STD, backend=backend)(
        [image_dir["exif_rotated_24x40.jpg"]])[0] * std + mean
    stored = np.asarray(Image.open(image_dir["exif_rotated_24x40.jpg"]).convert("RGB"))
    rotated = torch.from_numpy(np.rot90(stored, k=-1).copy()).permute(2, 0, 1).float() / 255
    assert (upright - rotated).abs().max() < 1e-5


# ---------------------------------------------------------------------- bad images


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_batch", [64, 3])
def test_bad_images_are_reported_and_the_rest_load(image_dir, backend, max_batch):
    names = ["gradient_48x64.png", "garbage.png", "shapes_40x40.jpg", "missing.png",
             "truncated.jpg", "gray_50x30.png", "empty.png", "tiny_8x8.png"]
    loader = ImagePreprocessor(32, 32, CLIP_MEAN, CLIP_STD, backend=backend, max_batch=max_batch)
    out, failures = loader.load([image_dir[n] for n in names])
    kinds = {names[i]: (error.kind, error.path) for i, error in failures}
    assert kinds == {
        "garbage.png": ("corrupt_image", image_dir["garbage.png"]),
        "missing.png": ("missing_image", image_dir["missing.png"]),
        "truncated.jpg": ("corrupt_image", image_dir["truncated.jpg"]),
        "empty.png": ("corrupt_image", image_dir["empty.png"]),
    }
    assert all(isinstance(error, BadImage) for _, error in failures)
    assert [i for i, _ in failures] == sorted(i for i, _ in failures)
    good = ["gradient_48x64.png", "shapes_40x40.jpg", "gray_50x30.png", "tiny_8x8.png"]
    alone = torch.cat([loader([image_dir[n]]) for n in good])
    assert out.shape == (4, 3, 32, 32) and torch.equal(out, alone)
    assert loader.stats["bad"] == 4
    # __call__ raises the first failure
    with pytest.raises(BadImage) as raised:
        loader([image_dir["tiny_8x8.png"], image_dir["missing.png"]])
    assert raised.value.kind == "missing_image" and raised.value.path == image_dir["missing.png"]
    # all bad -> an empty batch, not an error
    none, failures = loader.load([image_dir["garbage.png"]])
    assert none.shape == (0, 3, 32, 32) and [e.kind for _, e in failures] == ["corrupt_image"]
    # the loader still works after the failures (DALI rebuilds its pipeline)
    assert torch.equal(loader([image_dir[n] for n in good]), alone)


@needs_dali
def test_dali_falls_back_to_pil_only_for_images_it_cannot_decode(image_dir):
    paths = [image_dir["animation.gif"], image_dir["tiny_8x8.png"]]
    loader = ImagePreprocessor(32, 32, CLIP_MEAN, CLIP_STD, backend="dali")
    out, failures = loader.load(paths)
    assert failures == [] and loader.stats["pil_fallbacks"] == 1
    pil = ImagePreprocessor(32, 32, CLIP_MEAN, CLIP_STD, backend="pil")(paths)
    assert (out - pil).abs().max() < PARITY_TOL
    strict = ImagePreprocessor(32, 32, CLIP_MEAN, CLIP_STD, backend="dali", pil_fallback=False)
    out, failures = strict.load(paths)
    assert out.shape[0] == 1 and [(i, e.kind) for i, e in failures] == [(0, "corrupt_image")]


# ---------------------------------------------------------------------- backend choice


def test_dali_missing_gives_a_clear_error(monkeypatch, image_dir):
    def no_dali():
        raise ImportError("No module named 'nvidia.dali'")

    monkeypatch.setattr(images_module, "_import_dali", no_dali)
    assert not images_module.dali_available()
    with pytest.raises(ImageLoaderUnavailable, match="--image-loader"):
        ImagePreprocessor(32, 32, CLIP_MEAN, CLIP_STD, backend="dali")
    auto = ImagePreprocessor(32, 32, CLIP_MEAN, CLIP_STD, backend="auto")
    assert auto.backend_name == "pil" and auto.describe().startswith("pil")
    assert auto([image_dir["tiny_8x8.png"]]).shape == (1, 3, 32, 32)


def test_auto_backend_and_arguments():
    auto = ImagePreprocessor(16, 16, SIGLIP_MEAN, SIGLIP_STD, backend="auto")
    assert auto.backend_name == ("dali" if dali_available() else "pil")
    assert auto.describe().startswith(auto.backend_name) and "16x16" in auto.describe()
    with pytest.raises(ValueError, match="image-loader"):
        ImagePreprocessor(16, 16, backend="opencv")
    with pytest.raises(ValueError):
        ImagePreprocessor(0, 16)
    with pytest.raises(ValueError):
        ImagePreprocessor(16, 16, mean=(0.5, 0.5), std=(0.5, 0.5))
    with pytest.raises(ValueError):
        BadImage("unreadable", "x.png")


@pytest.mark.parametrize("backend", BACKENDS)
def test_pickles_after_use(image_dir, backend):
    loader = ImagePreprocessor(32, 32, CLIP_MEAN, CLIP_STD, backend=backend)
    before = loader([image_dir["shapes_40x40.jpg"]])
    copy = pickle.loads(pickle.dumps(loader))
    assert torch.equal(copy([image_dir["shapes_40x40.jpg"]]), before)
    error = pickle.loads(pickle.dumps(BadImage("corrupt_image", "a.png", "bad")))
    assert (error.kind, error.path, error.detail) == ("corrupt_image", "a.png", "bad")


_FORK_CHECK = """
import multiprocessing, sys
import torch
from megatron_stgc.data.images import CLIP_MEAN, CLIP_STD, ImagePreprocessor

LOADER = ImagePreprocessor(32, 32, CLIP_MEAN, CLIP_STD, backend="dali")

def load_in_child(path):
    return LOADER([path])

path = sys.argv[1]
expected = LOADER([path])  # the parent's pipeline is built here
with multiprocessing.get_context("fork").Pool(1) as pool:
    got = pool.map_async(load_in_child, [path]).get(timeout=60)
assert torch.equal(got[0], expected), "the forked child decoded differently"
assert torch.equal(LOADER([path]), expected), "the parent's pipeline broke"
print("fork-ok")
"""


@needs_dali
def test_forked_child_of_a_used_dali_loader_builds_its_own_pipeline(image_dir):
    """Destroying the parent's pipeline in the child would hang: the child must leave it be.

    Run in a fresh interpreter: forking the long-lived pytest process (threads left by ~180
    earlier tests) once hung the child for 60 s in CI, whatever the loader does."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FORK_CHECK, image_dir["shapes_40x40.jpg"]],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "fork-ok" in done.stdout, done.stdout + done.stderr[-3000:]
