"""--image-aspect-ratio pad: MoE-LLaVA's expand2square (moellava/mm_utils.py:14-25) before the
resize, in the DALI and the PIL paths, on real non-square PNG files.

* DALI == PIL within 1e-4 after normalisation (the bound of tests/test_images.py) for wide
  and tall images, odd and even differences, down- and upscaling, CLIP and SigLIP means;
* the padding itself against the obvious construction (PIL ``Image.new`` in the 8-bit
  colour ``int(255 * mean)`` + ``paste`` at ``(side - size) // 2``, as MoE-LLaVA builds it),
  exactly where no resize follows;
* a square image comes out the same as with ``resize``.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from megatron_stgc.data.images import (CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD,
                                       ImagePreprocessor, dali_available, pad_colour)

PARITY_TOL = 1e-4
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not installed")
SIZES = [(20, 33), (33, 20), (10, 16), (16, 10), (64, 96), (7, 30)]  # (height, width)


def _pixels(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pad")
    paths = {}
    for i, (h, w) in enumerate(SIZES):
        path = root / f"img_{h}x{w}.png"
        Image.fromarray(_pixels(h, w, i)).save(path)
        paths[(h, w)] = str(path)
    square = root / "square.png"
    Image.fromarray(_pixels(24, 24, 99)).save(square)
    paths["square"] = str(square)
    return paths


def _their_expand2square(array: np.ndarray, colour) -> np.ndarray:
    image = Image.fromarray(array)
    width, height = image.size
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(colour))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return np.asarray(canvas, dtype=np.float32)


def _normalised(array: np.ndarray, mean, std) -> np.ndarray:
    return ((array / 255.0 - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


@pytest.mark.parametrize("mean,std,colour", [(CLIP_MEAN, CLIP_STD, (122, 116, 104)),
                                             (SIGLIP_MEAN, SIGLIP_STD, (127, 127, 127))])
def test_padding_colour_and_placement(files, mean, std, colour):
    assert pad_colour(mean) == colour
    backends = ["pil"] + (["dali"] if dali_available() else [])
    for index, (h, w) in enumerate(SIZES[:4]):
        side = max(h, w)  # no resize after the padding: exact
        expected = _normalised(_their_expand2square(_pixels(h, w, index), colour), mean, std)
        for backend in backends:
            loader = ImagePreprocessor(side, side, mean, std, backend=backend,
                                       pad_to_square=True)
            got = loader([files[(h, w)]])[0].numpy()
            np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"{backend} {h}x{w}")
            assert np.allclose(got[:, 0, 0], _normalised(np.array([[colour]], np.float32),
                                                         mean, std)[:, 0, 0], atol=1e-5)


@needs_dali
@pytest.mark.parametrize("target", [(32, 32), (24, 40)])
def test_dali_equals_pil_on_non_square_images(files, target):
    paths = [files[size] for size in SIZES]
    pil = ImagePreprocessor(*target, CLIP_MEAN, CLIP_STD, backend="pil", pad_to_square=True)
    dali = ImagePreprocessor(*target, CLIP_MEAN, CLIP_STD, backend="dali", pad_to_square=True)
    a, b = pil(paths), dali(paths)
    assert a.shape == b.shape == (len(paths), 3, *target)
    assert float((a - b).abs().max()) < PARITY_TOL
    stretched = ImagePreprocessor(*target, CLIP_MEAN, CLIP_STD, backend="pil")(paths)
    assert float((a - stretched).abs().max()) > 0.1  # padding changed the picture


def test_square_images_are_not_changed_by_padding(files):
    backends = ["pil"] + (["dali"] if dali_available() else [])
    for backend in backends:
        padded = ImagePreprocessor(16, 16, backend=backend, pad_to_square=True)([files["square"]])
        plain = ImagePreprocessor(16, 16, backend=backend)([files["square"]])
        assert float((padded - plain).abs().max()) == 0.0
