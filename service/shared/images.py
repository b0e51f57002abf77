"""The image codecs of the service, and the storage key of every image.

Stored images are PNG bytes under a storage key `{job_id}/{attempt}/{image_id}` (attempt 0 is the
request's input image) in the blob store (service/blobs/store.py; never in Redis): each attempt writes
its own keys, so a stale attempt can never overwrite what the current one produced, and the job
hash says which attempt each image id points to.

Uploads are decoded defensively: allowed formats only (no FITS & co.), the pixel count checked
from the header before any decoding (decompression bombs). Then they are reduced to what the
model will use: RGB with transparency on white, and BAGEL's input resize (model/spec/sizing.py) when
it shrinks the image, so a 4096^2 upload is stored (and costs) what a 1024^2 one does. The model
applies the same rule again and gets the same pixels: the rule is idempotent on its own output,
and an image it would enlarge is stored as it came. Re-encoded as PNG without metadata.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from strokes.model.spec.sizing import resize_size, to_rgb

INPUT_IMAGE_ID = "input"
ALLOWED_UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")
OUTPUT_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class InvalidUpload(ValueError):
    """The upload is not a usable image."""


class UploadTooLarge(ValueError):
    """The upload decodes to more pixels than allowed."""


class DamagedImage(ValueError):
    """A stored image cannot be decoded (damaged in the store): the job's input, not the worker,
    is at fault (a worker fails the job `invalid_input`)."""


def model_size(width: int, height: int, resize: tuple[int, int, int, int]) -> tuple[int, int]:
    """The (width, height) the model draws an edit of a (width, height) input at: BAGEL's input
    resize (model/spec/sizing.py), which enlarges small images too."""
    max_size, min_size, stride, max_pixels = resize
    return resize_size(width, height, max_size, min_size, stride, max_pixels)


def storage_key(job_id: str, attempt: int, image_id: str) -> str:
    return f"{job_id}/{attempt}/{image_id}"


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3) pixels, got {pixels.dtype} {pixels.shape}")
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG", compress_level=1)
    return out.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Stored PNG bytes -> uint8 (H, W, 3); DamagedImage when they do not decode (PIL raises
    OSError for a truncated or corrupt file, which must not pass for an I/O failure)."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DamagedImage(f"the stored image does not decode ({type(exc).__name__}: {exc})") from exc


def transcode(png: bytes, fmt: str) -> bytes:
    """Stored PNG -> the requested output format."""
    if fmt == "png":
        return png
    with Image.open(io.BytesIO(png), formats=["PNG"]) as im:
        out = io.BytesIO()
        if fmt == "jpeg":
            im.convert("RGB").save(out, format="JPEG", quality=92)
        elif fmt == "webp":
            im.save(out, format="WEBP", quality=90)
        else:
            raise ValueError(f"unknown format {fmt}")
        return out.getvalue()


def _base64_payload(text: str) -> bytes:
    text = text.strip()
    if text.startswith("data:"):
        header, sep, body = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InvalidUpload("a data URL must be base64: data:image/png;base64,...")
        mime = header[5:-7].lower()
        if mime not in ("image/png", "image/jpeg", "image/jpg", "image/webp"):
            raise InvalidUpload(f"unsupported image type {mime or '(none)'}: use PNG, JPEG or WebP")
        text = body
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidUpload("input_image is not valid base64") from exc


def reduce_for_model(img: Image.Image, resize: tuple[int, int, int, int]) -> Image.Image:
    """An upload as the model will use it: RGB (transparency on white), BAGEL's input resize when
    that shrinks it. `resize` = (longest side, shortest side, stride, max pixels)."""
    rgb = to_rgb(img)
    w, h = resize_size(rgb.width, rgb.height, *resize)
    if w * h >= rgb.width * rgb.height:
        return rgb  # the model enlarges it itself; storing it larger would only cost more
    return rgb.resize((w, h), resample=Image.Resampling.BICUBIC)


def decode_upload(
    text: str, max_pixels: int, resize: tuple[int, int, int, int] | None = None
) -> tuple[bytes, int, int]:
    """A base64 / data-URL upload -> (clean PNG bytes, width, height) as stored: reduced with
    `resize` (see reduce_for_model) when given. Raises InvalidUpload/UploadTooLarge."""
    raw = _base64_payload(text)
    if not raw:
        raise InvalidUpload("input_image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=list(ALLOWED_UPLOAD_FORMATS)) as im:
                width, height = im.size  # from the header: nothing decoded yet
                if width < 1 or height < 1:
                    raise InvalidUpload("input_image has no pixels")
                if width * height > max_pixels:
                    raise UploadTooLarge(
                        f"input_image is {width}x{height}; at most {max_pixels} pixels are allowed"
                    )
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)
                im.load()  # decodes; metadata is dropped below
                rgb = reduce_for_model(im, resize) if resize is not None else to_rgb(im)
    except (InvalidUpload, UploadTooLarge):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UploadTooLarge("input_image decodes to too many pixels") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidUpload("input_image is not a readable PNG, JPEG or WebP image") from exc
    rgb.info = {}  # no ICC profile, text chunks or EXIF carried over
    out = io.BytesIO()
    rgb.save(out, format="PNG", compress_level=1)
    return out.getvalue(), rgb.width, rgb.height
