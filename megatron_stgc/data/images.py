"""Image files -> normalised ``[n, 3, H, W]`` float32 tensors for the vision tower.

Two backends give the same numbers (within ~1e-4 after normalisation, see
``tests/test_images.py``):

* ``dali``: one NVIDIA DALI pipeline per preprocessor, built on first use and
  reused: ``fn.external_source`` (encoded bytes) -> ``fn.decoders.image``
  (``"mixed"``, i.e. nvJPEG on the GPU, when CUDA is available, else ``"cpu"``)
  -> ``fn.resize`` -> ``fn.crop_mirror_normalize`` (CHW float).
* ``pil``: Pillow + numpy, the same transform.

``backend="auto"`` takes DALI when ``import nvidia.dali`` works, else PIL.

The transform, for every image:

1. decode to RGB, 8 bits per channel. EXIF orientation is applied (DALI's
   decoder does this by default; the PIL path calls ``ImageOps.exif_transpose``).
   Grayscale, palette, 1-bit, LA / RGBA (alpha dropped, not composited) and CMYK
   become RGB; 16-bit grayscale is scaled ``round(v / 257)`` like DALI does.
2. resize to exactly ``(img_h, img_w)`` (stretched; see ``pad_to_square`` below) with a
   bilinear ("triangle") filter that is anti-aliased when downscaling: DALI's
   ``INTERP_LINEAR`` + ``antialias=True`` and Pillow's ``Image.BILINEAR`` are
   the same filter (support 1 pixel when upscaling, widened by the scale
   factor when downscaling), the one interpolation the two implement alike.
   They differ only at the borders (Pillow renormalises the weights inside the
   image, DALI clamps, i.e. repeats the edge pixel); the PIL path therefore
   pads by edge replication and resizes a ``box`` inside the padded image, which
   reproduces DALI's clamping. Resizing happens in float (DALI
   ``dtype=FLOAT``, Pillow mode ``"F"`` per channel): no 8-bit rounding after
   the resize, so the backends agree to float precision, not just to 1/255.
   With ``pad_to_square`` (``--image-aspect-ratio pad``, MoE-LLaVA's ``expand2square``,
   moellava/mm_utils.py:14-25, called with ``tuple(int(x * 255) for x in image_mean)``:
   moellava/train/train.py:985-986) the decoded image is first centred on a square canvas of
   side max(width, height) filled with the 8-bit mean colour (``int(255 * mean)`` per
   channel), at offset ``(side - width) // 2`` / ``(side - height) // 2`` like
   ``Image.paste``; then resized as above. DALI: ``fn.slice`` of the decoded image with a
   negative anchor and ``out_of_bounds_policy="pad"``; PIL path: numpy. (MoE-LLaVA's CLIP
   processor then resizes bicubically and centre-crops; on a square image the crop is a
   no-op; the filter is bilinear here.)
3. ``(x / 255 - mean) / std`` per channel (computed as
   ``(x - 255 mean) / (255 std)``), HWC -> CHW.

Unusable images raise / report :class:`BadImage` with ``kind`` ``"missing_image"``
(the path is not a readable file), ``"corrupt_image"`` (it cannot be decoded) or
``"image_too_large"`` (width x height, read from the file header by Pillow before any
decoding, exceeds ``max_pixels``: a decompression bomb costs nothing; both backends).
The data set counts them by kind and skips the sample. Missing files are
checked before decoding. DALI fails a whole batch at run time on one bad image
(a ``RuntimeError``, and the pipeline object is unusable afterwards), so on a
failure the pipeline is rebuilt (~2 ms) and the batch is bisected down to the
bad images: one corrupt file costs only itself (about ``2 log2(batch)`` extra
small runs). An image DALI cannot decode but Pillow can (e.g. GIF, which DALI
does not support, or a PNG whose IEND chunk is missing) is decoded by the PIL
path instead (counted in ``stats["pil_fallbacks"]``, logged) when
``pil_fallback=True``; it is a :class:`BadImage` only when both fail.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
IMAGE_TOO_LARGE = "image_too_large"  # more pixels than max_pixels (header, before decoding)
DEFAULT_MAX_PIXELS = 40_000_000
BACKENDS = ("auto", "dali", "pil")

# Exceptions DALI raises from Pipeline.run() on undecodable input (RuntimeError;
# IndexError when a failed pipeline object is used again).
_DALI_RUN_ERRORS = (RuntimeError, IndexError)

_logged: set[str] = set()
_inherited_pipelines: list = []  # DALI pipelines inherited through fork(): never destroyed


class BadImage(Exception):
    """An image that cannot be used: ``kind`` is "missing_image" or "corrupt_image"."""

    def __init__(self, kind: str, path: str, detail: str = ""):
        if kind not in (MISSING_IMAGE, CORRUPT_IMAGE, IMAGE_TOO_LARGE):
            raise ValueError(f"unknown BadImage kind {kind!r}")
        self.kind = kind
        self.path = path
        self.detail = detail
        super().__init__(f"{kind}: {path}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):
        return (BadImage, (self.kind, self.path, self.detail))


class ImageLoaderUnavailable(RuntimeError):
    """The requested --image-loader backend cannot be used on this machine."""


def _import_dali():
    """(fn, types, pipeline_def) from nvidia.dali; ImportError if DALI is not installed."""
    import nvidia.dali as dali  # noqa: F401
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    return fn, types, pipeline_def


def dali_available() -> bool:
    try:
        _import_dali()
    except ImportError:
        return False
    return True


def _log_once(message: str, level: int = logging.INFO) -> None:
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


# ---------------------------------------------------------------------- PIL path


def _exif_transposed(image):
    from PIL import ImageOps
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block: keep the pixels as stored
        return image


def _rgb_float(image) -> np.ndarray:
    """[h, w, 3] float32 in 0..255 from any Pillow mode (as DALI's decoder maps it)."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # Pillow's own I;16 -> RGB conversion clips at 255; DALI scales to 8 bits.
        values = np.asarray(image).astype(np.float64)
        gray = np.round(np.clip(values, 0, 65535) / 257.0).astype(np.float32)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        gray = np.round(np.clip(np.asarray(image, dtype=np.float32), 0, 255))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float32)


def _resize_plane(plane: np.ndarray, img_h: int, img_w: int) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of one float32 plane, clamped borders."""
    from PIL import Image
    h, w = plane.shape
    pad_y = math.ceil(max(h / img_h, 1.0)) + 2  # > the filter's support in source pixels
    pad_x = math.ceil(max(w / img_w, 1.0)) + 2
    padded = np.pad(plane, ((pad_y, pad_y), (pad_x, pad_x)), mode="edge")
    resized = Image.fromarray(np.ascontiguousarray(padded, dtype=np.float32)).resize(
        (img_w, img_h), Image.BILINEAR, box=(pad_x, pad_y, pad_x + w, pad_y + h))
    return np.asarray(resized, dtype=np.float32)


def pad_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    """The padding colour of --image-aspect-ratio pad: MoE-LLaVA's int(255 * mean)."""
    return tuple(int(m * 255) for m in mean)


def _expand_to_square(rgb: np.ndarray, colour: Sequence[int]) -> np.ndarray:
    """[h, w, 3] -> [side, side, 3], side = max(h, w), centred on ``colour`` like PIL's paste."""
    h, w = rgb.shape[:2]
    if h == w:
        return rgb
    side = max(h, w)
    canvas = np.empty((side, side, 3), dtype=rgb.dtype)
    canvas[:] = np.asarray(colour, dtype=rgb.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = rgb
    return canvas


def _pil_decode_resize(path: str, img_h: int, img_w: int,
                       pad_to: Sequence[int] | None = None) -> np.ndarray:
    """[3, img_h, img_w] float32 in 0..255 (padded to a square of colour ``pad_to`` first
    when given); raises BadImage."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.load()
            rgb = _rgb_float(_exif_transposed(image))
    except FileNotFoundError as error:
        raise BadImage(MISSING_IMAGE, path, str(error)) from error
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise BadImage(CORRUPT_IMAGE, path, f"{type(error).__name__}: {error}") from error
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise BadImage(CORRUPT_IMAGE, path, f"decoded to shape {rgb.shape}")
    if pad_to is not None:
        rgb = _expand_to_square(rgb, pad_to)
    if rgb.shape[:2] == (img_h, img_w):
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))
    return np.stack([_resize_plane(rgb[:, :, c], img_h, img_w) for c in range(3)])


# ---------------------------------------------------------------------- preprocessor


class ImagePreprocessor:
    """Decode + resize + normalise image files for a LLaVA-style vision tower.

    ``ImagePreprocessor(img_h, img_w, mean, std, backend="auto", device="cpu")``

    * ``load(paths) -> (images, failures)``: ``images`` is a float32 tensor
      ``[n_good, 3, img_h, img_w]`` on ``device`` holding the images that loaded,
      in the order of ``paths`` with the bad ones left out; ``failures`` is a
      list of ``(index into paths, BadImage)``. Never raises for a bad image.
    * ``__call__(paths) -> [len(paths), 3, img_h, img_w]``: raises the first
      failure's :class:`BadImage` if any image is unusable.
    * ``backend_name`` ("dali" | "pil"), ``describe()`` (a line for logs),
      ``stats`` (counters: images, bad, dali_retries, pil_fallbacks, rebuilds).

    ``backend``: "auto" (DALI if ``import nvidia.dali`` works, else PIL), "dali"
    (error if DALI is missing) or "pil". ``max_batch``: the DALI pipeline's batch
    size; larger requests are split, smaller ones run as they are.
    ``num_threads``: DALI CPU threads. ``dali_decode``: "auto" ("mixed" when
    CUDA is available, else "cpu"), "cpu" or "mixed". ``pil_fallback``: decode
    an image DALI rejects with the PIL path before calling it corrupt.

    The DALI pipeline is built lazily in the process that uses it (a child
    forked after the parent used it builds its own and leaves the inherited
    one alone) and is not pickled, so the object can be handed to workers;
    within a process, concurrent ``load`` calls on one object are serialised.
    """

    def __init__(self, img_h: int, img_w: int, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, backend: str = "auto",
                 device: str | torch.device = "cpu", *, max_batch: int = 64,
                 num_threads: int = 2, dali_decode: str = "auto", pil_fallback: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS, pad_to_square: bool = False):
        if int(img_h) <= 0 or int(img_w) <= 0:
            raise ValueError(f"image size must be positive, got {img_h}x{img_w}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean/std need 3 values, std > 0: got {mean}, {std}")
        if backend not in BACKENDS:
            raise ValueError(f"--image-loader must be one of {BACKENDS}, got {backend!r}")
        if dali_decode not in ("auto", "cpu", "mixed"):
            raise ValueError(f"dali_decode must be 'auto', 'cpu' or 'mixed', got {dali_decode!r}")
        if max_batch < 1 or num_threads < 1:
            raise ValueError("max_batch and num_threads must be >= 1")
        self.img_h, self.img_w = int(img_h), int(img_w)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.device = torch.device(device)
        self.max_batch = int(max_batch)
        self.num_threads = int(num_threads)
        self.pil_fallback = pil_fallback
        self.max_pixels = int(max_pixels)
        # --image-aspect-ratio pad: the 8-bit colour a non-square image is padded with
        self.pad_colour = pad_colour(self.mean) if pad_to_square else None
        self.requested_backend = backend
        self.stats = {"images": 0, "bad": 0, "dali_retries": 0, "pil_fallbacks": 0,
                      "rebuilds": 0}
        self._mean255 = np.array([255.0 * m for m in self.mean], np.float32)
        self._inv_std255 = np.array([1.0 / (255.0 * s) for s in self.std], np.float32)
        self._pipe = None
        self._pipe_pid = None
        self._lock = threading.Lock()  # one DALI pipeline: one load() at a time

        if backend == "pil":
            self.backend_name = "pil"
        else:
            try:
                _import_dali()
            except ImportError as error:
                if backend == "dali":
                    raise ImageLoaderUnavailable(
                        f"--image-loader dali: NVIDIA DALI cannot be imported ({error}). "
                        "Install it (pip install nvidia-dali-cuda120) or use --image-loader pil "
                        "(or auto, which falls back to PIL).") from error
                self.backend_name = "pil"
            else:
                self.backend_name = "dali"
        if self.backend_name == "dali":
            if dali_decode == "auto":
                dali_decode = "mixed" if torch.cuda.is_available() else "cpu"
            if dali_decode == "mixed" and not torch.cuda.is_available():
                raise ImageLoaderUnavailable(
                    "--image-loader dali with GPU decoding ('mixed') needs CUDA, which is not "
                    "available; use dali_decode='cpu'")
        self.dali_decode = dali_decode if self.backend_name == "dali" else None
        _log_once(f"image loader: {self.describe()} (requested --image-loader {backend})")

    # ------------------------------------------------------------------ info

    def describe(self) -> str:
        size = f"{self.img_h}x{self.img_w}"
        if self.pad_colour is not None:
            size = f"pad to square {self.pad_colour} -> {size}"
        if self.backend_name == "dali":
            import nvidia.dali as dali
            return (f"dali {getattr(dali, '__version__', '?')} (decode {self.dali_decode}, "
                    f"{self.num_threads} threads, max batch {self.max_batch}) -> {size}, "
                    f"bilinear antialiased")
        import PIL
        return f"pil {PIL.__version__} -> {size}, bilinear antialiased"

    def __repr__(self) -> str:
        return f"ImagePreprocessor({self.describe()})"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pipe"] = None
        state["_pipe_pid"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ API

    def __call__(self, paths: Sequence[str]) -> torch.Tensor:
        images, failures = self.load(paths)
        if failures:
            raise failures[0][1]
        return images

    def load(self, paths: Sequence[str]) -> tuple[torch.Tensor, list[tuple[int, BadImage]]]:
        """(float32 [n_good, 3, H, W] on ``device``, [(index, BadImage), ...])."""
        paths = [os.fspath(p) for p in paths]
        arrays: dict[int, np.ndarray] = {}
        failures: dict[int, BadImage] = {}
        for index, path in enumerate(paths):
            try:
                _check_pixel_count(path, self.max_pixels)
            except BadImage as error:
                failures[index] = error
        if self.backend_name == "dali":
            encoded = {}
            for index, path in enumerate(paths):
                if index in failures:
                    continue
                try:
                    encoded[index] = _read_bytes(path)
                except BadImage as error:
                    failures[index] = error
            order = list(encoded)
            with self._lock:
                for start in range(0, len(order), self.max_batch):
                    chunk = order[start:start + self.max_batch]
                    self._dali_group(chunk, encoded, paths, arrays, failures)
        else:
            for index, path in enumerate(paths):
                if index in failures:
                    continue
                try:
                    arrays[index] = self._pil_normalised(path)
                except BadImage as error:
                    failures[index] = error
        self.stats["images"] += len(paths)
        self.stats["bad"] += len(failures)
        good = [arrays[i] for i in range(len(paths)) if i in arrays]
        if good:
            images = torch.from_numpy(np.stack(good))
        else:
            images = torch.empty((0, 3, self.img_h, self.img_w), dtype=torch.float32)
        if images.device != self.device:
            images = images.to(self.device)
        return images, sorted(failures.items())

    # ------------------------------------------------------------------ PIL

    def _pil_normalised(self, path: str) -> np.ndarray:
        if not os.path.isfile(path):
            raise BadImage(MISSING_IMAGE, path, "no such file")
        pixels = _pil_decode_resize(path, self.img_h, self.img_w, self.pad_colour)
        return ((pixels - self._mean255[:, None, None])
                * self._inv_std255[:, None, None]).astype(np.float32)

    # ------------------------------------------------------------------ DALI

    def _build_pipeline(self):
        fn, types, pipeline_def = _import_dali()
        decode = self.dali_decode
        img_h, img_w = self.img_h, self.img_w
        mean255 = [255.0 * m for m in self.mean]
        std255 = [255.0 * s for s in self.std]
        colour = self.pad_colour

        @pipeline_def
        def graph():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, device="cpu")
            extra = {"jpeg_fancy_upsampling": True} if decode == "mixed" else {}
            image = fn.decoders.image(encoded, device=decode, output_type=types.RGB,
                                      adjust_orientation=True, **extra)
            if colour is not None:
                image = _dali_expand_to_square(fn, types, image, colour)
            image = fn.resize(image, resize_x=img_w, resize_y=img_h,
                              interp_type=types.INTERP_LINEAR, antialias=True,
                              dtype=types.FLOAT)
            return fn.crop_mirror_normalize(image, dtype=types.FLOAT, output_layout="CHW",
                                            mean=mean255, std=std255)

        device_id = torch.cuda.current_device() if decode == "mixed" else None
        pipe = graph(batch_size=self.max_batch, num_threads=self.num_threads,
                     device_id=device_id, prefetch_queue_depth=1)
        pipe.build()
        return pipe

    def _pipeline(self):
        if self._pipe is not None and self._pipe_pid != os.getpid():
            # Built before a fork: its worker threads do not exist in this process, and
            # destroying it here would hang (DALI joins them). Keep it alive, build anew.
            _inherited_pipelines.append(self._pipe)
            self._pipe = None
        if self._pipe is None:
            self._pipe = self._build_pipeline()
            self._pipe_pid = os.getpid()
        return self._pipe

    def _discard_pipeline(self) -> None:
        """After a failed run DALI's pipeline object is invalid: drop it, build anew on use."""
        self._pipe = None
        self.stats["rebuilds"] += 1

    def _dali_run(self, samples: list[np.ndarray]) -> np.ndarray:
        pipe = self._pipeline()
        pipe.feed_input("encoded", samples)
        (output,) = pipe.run()
        if not hasattr(output, "as_array"):  # "mixed" decoding: a TensorListGPU
            output = output.as_cpu()
        return output.as_array()  # a copy: [n, 3, H, W] float32

    def _dali_group(self, indices: list[int], encoded: dict[int, np.ndarray],
                    paths: list[str], arrays: dict, failures: dict) -> None:
        """Decode ``indices`` in one run; on failure bisect down to the bad images."""
        try:
            batch = self._dali_run([encoded[i] for i in indices])
        except _DALI_RUN_ERRORS as error:
            self._discard_pipeline()
            if len(indices) > 1:
                self.stats["dali_retries"] += 1
                middle = len(indices) // 2
                self._dali_group(indices[:middle], encoded, paths, arrays, failures)
                self._dali_group(indices[middle:], encoded, paths, arrays, failures)
                return
            index = indices[0]
            dali_detail = _dali_error_summary(error)
            if not self.pil_fallback:
                failures[index] = BadImage(CORRUPT_IMAGE, paths[index], f"DALI: {dali_detail}")
                return
            try:
                arrays[index] = self._pil_normalised(paths[index])
            except BadImage as pil_error:
                failures[index] = BadImage(
                    pil_error.kind, paths[index],
                    f"DALI: {dali_detail}; PIL: {pil_error.detail}")
            else:
                self.stats["pil_fallbacks"] += 1
                _log_once(f"image loader: DALI could not decode {paths[index]} "
                          f"({dali_detail}); decoded with PIL instead (later fallbacks are "
                          f"only counted)", logging.WARNING)
            return
        for row, index in enumerate(indices):
            arrays[index] = batch[row]


def _dali_expand_to_square(fn, types, image, colour):
    """The DALI graph of _expand_to_square: a [side, side] window of the HWC image starting
    ``(side - h) // 2`` rows / ``(side - w) // 2`` columns before it, out of bounds filled."""
    import nvidia.dali.math as dmath

    shape = image.shape(dtype=types.INT32) if hasattr(image, "shape") else \
        fn.shapes(image, dtype=types.INT32)
    h = fn.slice(shape, 0, 1, axes=[0])
    w = fn.slice(shape, 1, 1, axes=[0])
    side = dmath.max(h, w)
    anchor = fn.cat(-((side - h) // 2), -((side - w) // 2))  # numerators >= 0: no rounding issue
    return fn.slice(image, anchor, fn.cat(side, side), axis_names="HW",
                    out_of_bounds_policy="pad", fill_values=list(colour))


def _check_pixel_count(path: str, max_pixels: int) -> None:
    """BadImage(image_too_large) when the file's header says width x height > max_pixels.

    Pillow reads only the header here (no decoding). A file Pillow cannot identify, or that
    is missing, is left to the decoder, which reports it as missing or corrupt.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 - unreadable or unknown: the decoder's verdict counts
        return
    if width * height > max_pixels:
        raise BadImage(IMAGE_TOO_LARGE, path,
                       f"{width}x{height} = {width * height} pixels > {max_pixels} "
                       "(--max-image-pixels)")


def _read_bytes(path: str) -> np.ndarray:
    """The file's bytes as uint8 for DALI; BadImage(missing) if unreadable, (corrupt) if empty."""
    if not os.path.isfile(path):
        raise BadImage(MISSING_IMAGE, path, "no such file")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError as error:
        raise BadImage(MISSING_IMAGE, path, str(error)) from error
    except OSError as error:
        raise BadImage(MISSING_IMAGE, path, f"unreadable: {error}") from error
    if data.size == 0:
        raise BadImage(CORRUPT_IMAGE, path, "empty file")
    return data


def _dali_error_summary(error: Exception) -> str:
    """The informative tail of DALI's long error text (after its graph traceback)."""
    text = str(error)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and "no longer valid" not in line]
    summary = " ".join(lines)
    return (summary[:200] or type(error).__name__)
