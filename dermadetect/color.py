"""Colour constancy for dermoscopy images, shared by the training transforms (data.py) and the Predictor.

Kept apart from data.py so that the demo's start-up does not import `datasets` and scikit-learn's model selection.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from torchvision import transforms as T


class ShadesOfGray:
    """Colour constancy by Shades of Gray (Finlayson & Trezzi 2004): the illuminant is each channel's Minkowski
    p-mean, and the channels are rescaled so that it becomes neutral grey. Dermoscopes, cameras and clinics differ
    in colour cast (the ISIC 2018 test set mixes five sources); ISIC challenge entries normalise it this way, p=6."""

    def __init__(self, power: float = 6.0):
        self.power = power

    def __call__(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        rgb = np.asarray(image, dtype=np.float32)
        illuminant = np.mean((rgb / 255.0) ** self.power, axis=(0, 1)) ** (1.0 / self.power)
        if illuminant.min() <= 0:  # a channel that is black everywhere has no cast to remove
            return image
        gains = np.sqrt(np.mean(illuminant ** 2)) / illuminant
        return Image.fromarray(np.clip(rgb * gains, 0, 255).round().astype(np.uint8))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(power={self.power})"


COLOR_CONSTANCY = {"none": None, "shades_of_gray": ShadesOfGray}


def with_color_constancy(transform: T.Compose, name: str) -> T.Compose:
    """`transform` preceded by the colour-constancy step `name` (unchanged for "none"); unknown names fail with
    the choices."""
    if name not in COLOR_CONSTANCY:
        raise ValueError(f"unknown color_constancy {name!r}; choose one of {sorted(COLOR_CONSTANCY)}")
    step = COLOR_CONSTANCY[name]
    return T.Compose([step()] + list(transform.transforms)) if step else transform
