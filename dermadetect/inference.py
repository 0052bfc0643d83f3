"""Predictor: any uploaded image -> probabilities for every class, a CAM and an overlay, or a readable error.

The demo, the CLI and the tests all go through it. Images are checked before a tensor is made: format,
size limits (before decoding), truncation; large JPEGs are decoded at reduced scale.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import create_transform

from .explain import CamExplainer, cam_on_image, check_opacity
from .hub import LoadedModel, load_model
from .labels import melanoma_index, readable_name

ACCEPTED_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP", "BMP": "BMP", "TIFF": "TIFF",
                    "GIF": "GIF"}
MIN_SIDE = 32
DEFAULT_MAX_PIXELS = 64_000_000      # an 8000x8000 upload; larger files are refused before decoding
WORKING_SIDE = 1024                  # images are handled (and overlays drawn) with the long side at most this
UPLOAD_HINT = "upload a dermoscopy photo as JPEG, PNG, WebP, BMP, TIFF or GIF"


class InvalidImageError(ValueError):
    """The upload cannot be used; the message says why and what to upload instead."""


class NotAnImageError(InvalidImageError):
    pass


class CorruptImageError(InvalidImageError):
    pass


class ImageTooSmallError(InvalidImageError):
    pass


class ImageTooLargeError(InvalidImageError):
    pass


@dataclass(frozen=True)
class Prediction:
    probabilities: dict[str, float]   # every class, in the model's label order; sums to 1 (calibrated, if fitted)
    top_label: str                    # the model's call: the most probable class, or its balanced decision rule
    explained_label: str
    cam: np.ndarray                   # (H, W) in [0, 1] at the model's input resolution
    overlay: Image.Image              # the CAM on the (EXIF-rotated, possibly reduced) upload
    image_size: tuple[int, int]       # the size of the image the overlay is drawn on
    ood_score: float | None = None    # the guard's "not dermoscopy" score (None: the model has no guard)
    out_of_distribution: bool = False  # the score is above the model's threshold: probably not dermoscopy
    melanoma_flag: bool | None = None  # P(melanoma) at or above the validation-chosen threshold (None: no threshold)

    @property
    def readable(self) -> dict[str, float]:
        return {readable_name(k): v for k, v in self.probabilities.items()}


def open_image(source, max_pixels: int = DEFAULT_MAX_PIXELS, working_side: int = WORKING_SIDE) -> Image.Image:
    """Path, bytes, file object, PIL image or array -> an RGB PIL image, long side <= working_side.

    Raises an InvalidImageError subclass for anything that is not a usable image."""
    if isinstance(source, np.ndarray):
        source = Image.fromarray(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
        elif isinstance(source, (str, Path)) and not Path(source).is_file():
            raise NotAnImageError(f"file {source} does not exist; {UPLOAD_HINT}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(source)
        except UnidentifiedImageError as exc:
            raise NotAnImageError(f"this file is not an image that can be opened; {UPLOAD_HINT}") from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError("the image has too many pixels to open safely; upload one under "
                                     f"{max_pixels / 1e6:.0f} megapixels") from exc
    if image.format and image.format not in ACCEPTED_FORMATS:
        raise NotAnImageError(f"{image.format} images are not accepted; {UPLOAD_HINT}")
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(f"the image is {width}x{height} ({width * height / 1e6:.0f} megapixels), over "
                                 f"the {max_pixels / 1e6:.0f} megapixel limit; upload a smaller image")
    if min(width, height) < MIN_SIDE:
        raise ImageTooSmallError(f"the image is {width}x{height}; it needs at least {MIN_SIDE} pixels per side, "
                                 "and the model sees lesions best at 224 px and above")
    try:
        if image.format == "JPEG" or image.format == "MPO":
            # the JPEG decoder scales by 1/2, 1/4 or 1/8 for free: keep both sides >= working_side / 2
            image.draft("RGB", (working_side // 2, working_side // 2))
        image.load()  # first frame only for GIF/TIFF/WebP animations
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(f"the image file is damaged or truncated; {UPLOAD_HINT}") from exc
    image = to_rgb(image)
    if max(image.size) > working_side:
        image.thumbnail((working_side, working_side), Image.LANCZOS, reducing_gap=2.0)
    if min(image.size) < MIN_SIDE:  # a strip: fitting its long side into working_side leaves a sliver
        raise ImageTooSmallError(f"the image is {width}x{height}, too narrow for its length: at the {working_side}-"
                                 f"pixel working size its short side is under {MIN_SIDE} pixels; crop it to the lesion")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited on white, 16-bit scaled (not clipped) to 8 bit."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(array.max(), 1.0)
        if image.mode in ("I", "F") and array.max() <= 255:
            peak = 255.0
        image = Image.fromarray(np.uint8(np.clip(array / peak, 0, 1) * 255 + 0.5))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


class Predictor:
    """A loaded model with its own preprocessing and labels; call `predict` on uploads."""

    def __init__(self, source: str | LoadedModel, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.loaded = source if isinstance(source, LoadedModel) else load_model(source)
        self.label_names = self.loaded.label_names
        self.data_config = self.loaded.data_config
        self.settings = self.loaded.settings
        self.transform = create_transform(**self.data_config, is_training=False)
        self.explainer = CamExplainer(self.loaded.model, self.loaded.architecture, self.settings)
        self.default_method = self.settings.cam_method
        self.melanoma_index = melanoma_index(self.label_names)
        self.ood = self.loaded.ood
        self.max_pixels = max_pixels

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image).unsqueeze(0)

    def overlay(self, upload, cam: np.ndarray, opacity: float) -> Image.Image:
        """A computed CAM drawn again on its upload at another opacity: no model call."""
        return cam_on_image(cam, open_image(upload, self.max_pixels), self.data_config, opacity)

    def predict(self, upload, explain: str | int | None = None, method: str | None = None,
                opacity: float = 0.5) -> Prediction:
        """Probabilities, the model's call and the CAM of `explain` (a label or index; default: the call),
        by `method` (default: the model's own, chosen by ROAD faithfulness at training time)."""
        if isinstance(explain, str) and explain not in self.label_names:
            raise ValueError(f"unknown class {explain!r}; choose one of {list(self.label_names)}")
        check_opacity(opacity)  # before the forward pass and the CAM are spent on the call
        image = open_image(upload, self.max_pixels)
        class_index = self.label_names.index(explain) if isinstance(explain, str) else explain
        result = self.explainer(self.preprocess(image), class_index, method or self.default_method)
        probabilities = {name: float(p) for name, p in zip(self.label_names, result.probabilities)}
        ood_score = float(self.ood.score(result.guard_features[None])[0]) if self.ood else None
        threshold = self.settings.melanoma_threshold
        melanoma_flag = (bool(result.probabilities[self.melanoma_index] >= threshold)
                         if threshold is not None and self.melanoma_index is not None else None)
        return Prediction(probabilities=probabilities,
                          top_label=self.label_names[result.decision],
                          explained_label=self.label_names[result.class_index], cam=result.cam,
                          overlay=cam_on_image(result.cam, image, self.data_config, opacity),
                          image_size=image.size, ood_score=ood_score,
                          out_of_distribution=bool(ood_score is not None and ood_score > self.ood.threshold),
                          melanoma_flag=melanoma_flag)
