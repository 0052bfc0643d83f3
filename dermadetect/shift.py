"""What people's uploads do to a dermoscopy image: lower resolution, JPEG compression, a changed aspect, a colour
cast, blur, rotation. Fixed versions score a model (`benchmarks/bench_robustness.py`); `RandomShift` draws them
at random for training."""

from __future__ import annotations

import io
import math
import random

from PIL import Image, ImageFilter


def rescale(image: Image.Image, side: int) -> Image.Image:
    """Down to `side` px on the short side and back: the detail of a `side` px copy at the original size."""
    scale = side / min(image.size)
    if scale >= 1:
        return image
    small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    return small.resize(image.size, Image.Resampling.BICUBIC)


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    data = io.BytesIO()
    image.convert("RGB").save(data, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(data.getvalue())).convert("RGB")


def stretch(image: Image.Image, aspect: float) -> Image.Image:
    """Widen (aspect > 1) or heighten (< 1) the content by `aspect` and crop back to the original frame: the
    distortion of a picture resized to another aspect without cropping."""
    width, height = image.size
    if aspect >= 1:
        wide = image.resize((round(width * aspect), height), Image.Resampling.BICUBIC)
        left = (wide.width - width) // 2
        return wide.crop((left, 0, left + width, height))
    tall = image.resize((width, round(height / aspect)), Image.Resampling.BICUBIC)
    top = (tall.height - height) // 2
    return tall.crop((0, top, width, top + height))


def colour_cast(image: Image.Image, gains: tuple[float, float, float]) -> Image.Image:
    """A white-balance shift: each channel scaled by its gain."""
    return Image.merge("RGB", [band.point(lambda v, g=g: min(255, round(v * g)))
                               for band, g in zip(image.convert("RGB").split(), gains)])


def blur(image: Image.Image, radius: float) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius))


def rotate(image: Image.Image, degrees: float) -> Image.Image:
    return image.rotate(degrees, resample=Image.Resampling.BILINEAR)


# The benchmark's fixed degradations, on 224 px images: name -> image -> image.
DEGRADATIONS = {
    "downscale_128": lambda im: rescale(im, 128),
    "downscale_160": lambda im: rescale(im, 160),
    "downscale_180": lambda im: rescale(im, 180),
    "jpeg_30": lambda im: jpeg(im, 30),
    "jpeg_60": lambda im: jpeg(im, 60),
    "aspect_4_3": lambda im: stretch(im, 4 / 3),
    "colour_cast": lambda im: colour_cast(im, (1.12, 1.0, 0.82)),  # a warm cast: tungsten light
    "blur": lambda im: blur(im, 1.5),
    "rotate_37": lambda im: rotate(im, 37),
}


class RandomShift:
    """Each of the upload shifts with probability `p`, drawn anew per image (in a training transform, before
    timm's crop): a lower-resolution copy (96-224 px on the short side of a 224 px image, the same share of
    larger ones), the content stretched by up to 4:3 either way, per-channel gains of 0.85-1.15, blur of
    radius 0-1.5, JPEG quality 25-95. Draws from Python's `random` (which `data.LabelledImages` seeds per
    image), or from `rng` for a copy that is the same on every run."""

    def __init__(self, p: float, reference_side: int = 224):
        self.p = p
        self.reference_side = reference_side

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> Image.Image:
        rng = rng or random
        if rng.random() < self.p:
            side = rng.uniform(96, self.reference_side) * min(image.size) / self.reference_side
            image = rescale(image, round(side))
        if rng.random() < self.p:
            image = stretch(image, math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3))))
        if rng.random() < self.p:
            image = colour_cast(image, tuple(rng.uniform(0.85, 1.15) for _ in range(3)))
        if rng.random() < self.p:
            image = blur(image, rng.uniform(0.0, 1.5))
        if rng.random() < self.p:
            image = jpeg(image, rng.randint(25, 95))
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


def random_view(image: Image.Image, rng: random.Random, min_area: float = 0.25) -> Image.Image:
    """A crop of 25-100% of the area at an aspect of 3:4 to 4:3, maybe mirrored or flipped: another framing of
    the same photo, as a visitor might take it."""
    width, height = image.size
    area = width * height * rng.uniform(min_area, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = min(width, max(1, round(math.sqrt(area * aspect))))
    h = min(height, max(1, round(math.sqrt(area / aspect))))
    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
    view = image.crop((left, top, left + w, top + h))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return view
