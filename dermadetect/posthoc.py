"""What a trained model carries besides its weights, fitted on validation (or train) after training and used by
the Predictor: test-time augmentation, temperature scaling, a class-balanced decision (post-hoc logit
adjustment), a melanoma operating point, and an out-of-distribution detector (Mahalanobis distance on
penultimate features).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy.optimize import minimize_scalar
from sklearn.covariance import LedoitWolf
from sklearn.metrics import balanced_accuracy_score

TTA_VIEWS = 8          # the dihedral group: 4 rotations by 90 degrees, each with and without a mirror flip
OOD_FILE = "ood.safetensors"
MELANOMA_TARGET_SENSITIVITY = 0.85   # the melanoma threshold is the highest P(mel) that catches this share
ADJUSTMENT_STRENGTHS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def dihedral_batch(pixels: torch.Tensor, views: int = TTA_VIEWS) -> torch.Tensor:
    """(B, C, H, W) -> (B * views, C, H, W), the views of one image consecutive. Dermoscopy has no canonical
    orientation, so every view is as valid as the original; view 0 is the original."""
    if views == 1:
        return pixels
    out = []
    for k in range(views):
        view = torch.rot90(pixels, k // 2, dims=(2, 3))
        out.append(view.flip(3) if k % 2 else view)
    return torch.stack(out, dim=1).flatten(0, 1)


@torch.no_grad()
def model_outputs(model: torch.nn.Module, pixels: torch.Tensor, views: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every view (B, views, C) and the penultimate features of view 0 (B, D), one forward pass."""
    features = model.forward_features(dihedral_batch(pixels, views))
    logits = model.forward_head(features).float()
    first = features[::views] if views > 1 else features
    pre_logits = model.forward_head(first, pre_logits=True).float()
    return logits.view(len(pixels), views, -1), pre_logits


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    probs = softmax(logits, temperature)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 minimising the negative log-likelihood of softmax(logits / T) (Guo et al. 2017).
    Fitted on validation only; it changes no prediction, only the confidence."""
    result = minimize_scalar(lambda log_t: nll(logits, labels, math.exp(log_t)), bounds=(-3.0, 3.0),
                             method="bounded", options={"xatol": 1e-5})
    return float(math.exp(result.x))


def logit_offsets(class_prior, strength: float) -> np.ndarray:
    """-strength * log(prior): added to the (calibrated) logits before the argmax, it moves the decision towards
    the rare classes (post-hoc logit adjustment, Menon et al. 2021). Strength 1 undoes the training prior
    entirely (the Bayes rule for balanced accuracy if the probabilities are calibrated to that prior)."""
    return -strength * np.log(np.asarray(class_prior, dtype=np.float64))


def adjusted_decisions(probs: np.ndarray, class_prior, strength: float) -> np.ndarray:
    """The class index of each row: argmax of log(probability) + logit_offsets. Strength 0 is the argmax."""
    with np.errstate(divide="ignore"):
        return (np.log(np.asarray(probs, dtype=np.float64)) + logit_offsets(class_prior, strength)).argmax(axis=1)


def fit_adjustment_strength(probs: np.ndarray, labels: np.ndarray, class_prior,
                            strengths=ADJUSTMENT_STRENGTHS) -> tuple[float, dict[float, float]]:
    """The strength with the highest balanced accuracy on (validation) `probs`, the smallest on a tie, and the
    balanced accuracy of every strength tried. It changes the decision only, never the probabilities."""
    scores = {float(s): float(balanced_accuracy_score(labels, adjusted_decisions(probs, class_prior, s)))
              for s in strengths}
    return max(scores, key=lambda s: (scores[s], -s)), scores


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Out-of-distribution score from the logits alone (Liu et al. 2020): -T logsumexp(z / T); higher = stranger."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    top = z.max(axis=-1)
    return -temperature * (top + np.log(np.exp(z - top[..., None]).sum(axis=-1)))


@dataclass
class MahalanobisDetector:
    """Class-conditional Gaussians with one shared covariance on penultimate features (Lee et al. 2018).
    The score is the squared Mahalanobis distance to the nearest class mean: higher = less like the training
    images. `threshold` flags an input as out of distribution."""

    means: torch.Tensor          # (C, D)
    precision: torch.Tensor      # (D, D)
    threshold: float = math.inf

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray) -> "MahalanobisDetector":
        features = np.asarray(features, dtype=np.float64)
        labels = np.asarray(labels)
        classes = np.unique(labels)
        means = np.stack([features[labels == k].mean(axis=0) for k in classes])
        centred = features - means[np.searchsorted(classes, labels)]
        # Ledoit-Wolf shrinkage: a well-conditioned covariance even with few images in a class
        precision = LedoitWolf(assume_centered=True).fit(centred).get_precision()
        return cls(torch.tensor(means, dtype=torch.float32), torch.tensor(precision, dtype=torch.float32))

    def score(self, features) -> np.ndarray:
        f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        means, precision = self.means.double(), self.precision.double()
        diff = f[:, None, :] - means[None]                               # (N, C, D)
        return torch.einsum("ncd,de,nce->nc", diff, precision, diff).min(dim=1).values.numpy()

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / OOD_FILE
        save_file({"means": self.means.contiguous(), "precision": self.precision.contiguous()}, str(path),
                  metadata={"method": "mahalanobis", "threshold": repr(self.threshold)})
        return path

    @classmethod
    def load(cls, path: str | Path, threshold: float) -> "MahalanobisDetector":
        tensors = load_file(str(path))
        return cls(tensors["means"], tensors["precision"], float(threshold))
