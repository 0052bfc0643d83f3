"""What a trained model carries besides its weights, fitted on validation (or train) after training and used by
the Predictor: test-time augmentation, temperature scaling, a class-balanced decision (post-hoc logit
adjustment), a melanoma operating point, and an out-of-distribution guard (a dermoscopy-vs-not head on
penultimate features, the means of the last feature stages and the Mahalanobis distance).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.special
import torch
from safetensors.torch import load_file, save_file
from scipy.optimize import minimize_scalar
from sklearn.covariance import LedoitWolf
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from .metrics import balanced_accuracy

TTA_VIEWS = 8          # the dihedral group: 4 rotations by 90 degrees, each with and without a mirror flip
OOD_FILE = "ood.safetensors"
MELANOMA_TARGET_SENSITIVITY = 0.85   # the melanoma threshold is the highest P(mel) that catches this share
ADJUSTMENT_STRENGTHS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
GUARD_REGULARISATION = 0.01   # inverse L2 strength of the guard's head (C), chosen on validation
# the guard also sees the spatial means of the network's last feature stages (timm's feature_info): they keep
# more of an image's look than the penultimate features, and separate photos from dermoscopy better
GUARD_STAGES = 2
SCHEMA_VERSION = 2     # of the "dermadetect" section of an export's config.json
DEFAULT_CAM_METHOD = "gradcam"


class SettingsError(ValueError):
    """A model's post-hoc settings are missing, from another schema version, or inconsistent."""


@dataclass(frozen=True)
class PostHocSettings:
    """Everything a served model applies besides its weights, fitted on validation (or train) after training:
    the "dermadetect" section of an export's config.json. The identity settings serve the network alone."""

    temperature: float = 1.0
    tta_views: int = 1
    class_prior: tuple[float, ...] | None = None   # the training class shares the decision divides out
    adjustment_strength: float = 0.0               # 0: the call is the argmax
    melanoma_threshold: float | None = None        # None: no melanoma flag
    ood_threshold: float | None = None             # None: no out-of-distribution guard (and no OOD_FILE)
    cam_method: str = DEFAULT_CAM_METHOD
    schema_version: int = SCHEMA_VERSION

    def logit_offsets(self) -> np.ndarray | None:
        return None if self.class_prior is None else logit_offsets(self.class_prior, self.adjustment_strength)

    def to_json(self) -> dict:
        return {**asdict(self), "class_prior": None if self.class_prior is None else list(self.class_prior)}

    @classmethod
    def from_json(cls, values: dict | None, where: str = "config.json") -> "PostHocSettings":
        if not values or values.get("schema_version") != SCHEMA_VERSION:
            found = (values or {}).get("schema_version")
            raise SettingsError(f"{where} has no DermaDetect settings of schema version {SCHEMA_VERSION} (found "
                                f"{found}); export the model again with `python -m dermadetect export RUN`")
        fields = set(cls.__dataclass_fields__)
        if set(values) != fields:
            raise SettingsError(f"{where}: DermaDetect settings {sorted(set(values) ^ fields)} are missing or unknown")
        prior = values["class_prior"]
        return cls(**{**values, "class_prior": None if prior is None else tuple(float(p) for p in prior)})


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


def forward_views(model: torch.nn.Module, pixels: torch.Tensor, views: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one forward pass every prediction goes through: the feature maps of every view (B * views, ...),
    the logits of every view (B, views, C) and the guard's features of view 0 (B, guard_width(model)): the
    penultimate features, then the spatial mean of each of the last GUARD_STAGES feature stages. No grad is
    taken here; the caller decides (the CAM differentiates the head on the returned feature maps)."""
    features, stages = model.forward_intermediates(dihedral_batch(pixels, views), indices=GUARD_STAGES)
    logits = model.forward_head(features).float()
    pre_logits = model.forward_head(features[::views], pre_logits=True).float()
    guard = torch.cat([pre_logits] + [stage[::views].float().mean(dim=(2, 3)) for stage in stages], dim=1)
    return features, logits.view(len(pixels), views, -1), guard


def guard_width(model: torch.nn.Module) -> int:
    """The width of forward_views' guard features for this network."""
    return model.head_hidden_size + sum(stage["num_chs"] for stage in model.feature_info[-GUARD_STAGES:])


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return scipy.special.softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=-1)


def served_call(settings: PostHocSettings, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the served model makes of the logits of each image's views (N, views, C): calibrated probabilities
    (N, C) from the mean over its TTA views and the temperature, and the call (N,) moved by the class-balanced
    offsets. The Predictor and the robustness benchmark both go through here."""
    scaled = logits[:, :settings.tta_views].astype(np.float64).mean(axis=1) / settings.temperature
    offsets = settings.logit_offsets()
    return softmax(scaled), np.argmax(scaled + (0.0 if offsets is None else offsets), axis=1)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return float(np.mean(scipy.special.logsumexp(z, axis=1) - z[np.arange(len(labels)), labels]))


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
    scores = {float(s): balanced_accuracy(labels, adjusted_decisions(probs, class_prior, s))
              for s in strengths}
    return max(scores, key=lambda s: (scores[s], -s)), scores


def class_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Each class's share of `labels`; a class absent from them counts once (its log would be -inf)."""
    counts = np.maximum(np.bincount(labels, minlength=num_classes), 1)
    return counts / counts.sum()


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Out-of-distribution score from the logits alone (Liu et al. 2020): -T logsumexp(z / T); higher = stranger."""
    return -temperature * scipy.special.logsumexp(np.asarray(logits, dtype=np.float64) / temperature, axis=-1)


def mahalanobis_fit(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the shared precision of class-conditional Gaussians on features (Lee et al. 2018);
    Ledoit-Wolf shrinkage keeps the covariance well-conditioned even with few images in a class."""
    features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
    classes = np.unique(labels)
    means = np.stack([features[labels == k].mean(axis=0) for k in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    return means, LedoitWolf(assume_centered=True).fit(centred).get_precision()


@dataclass
class DermoscopyGuard:
    """Whether an upload looks like dermoscopy at all, from the guard's features of view 0 (forward_views): a
    logistic dermoscopy-vs-not head whose inputs are those features and the log Mahalanobis distance of their
    penultimate part to the nearest training class mean. Fitted with training images (clean and through the
    upload shifts) as dermoscopy and photos of skin without a dermatoscope plus ordinary photos as not. The score
    is the head's logit: higher = less like dermoscopy; above `threshold` the image is flagged."""

    means: torch.Tensor          # (C, P) class means of the training images' penultimate features
    precision: torch.Tensor      # (P, P) their shared precision
    centre: torch.Tensor         # (W + 1,) standardisation of the head's inputs (W: the guard's features)
    scale: torch.Tensor          # (W + 1,)
    weight: torch.Tensor         # (W + 1,) the head
    bias: torch.Tensor           # ()
    threshold: float = math.inf

    @classmethod
    def fit(cls, train_features: np.ndarray, train_labels: np.ndarray, dermoscopy: np.ndarray,
            not_dermoscopy: np.ndarray, penultimate: int, strength: float = GUARD_REGULARISATION,
            groups: np.ndarray | None = None) -> "DermoscopyGuard":
        """Class Gaussians from the clean training images' penultimate features (the first `penultimate`
        columns); the head from `dermoscopy` vs `not_dermoscopy` features, the two sides weighted equally (the
        negatives are few). `groups` (the clinic of each dermoscopy row) weighs each clinic equally, so that the
        head does not learn the largest clinic's look as "dermoscopy" and flag images from clinics it never saw
        (docs/results.md)."""
        means, precision = mahalanobis_fit(np.asarray(train_features)[:, :penultimate], train_labels)
        # float32 as saved, so the fitted and the loaded guard score alike
        guard = cls(*(torch.tensor(a, dtype=torch.float32) for a in (means, precision)),
                    *(torch.zeros(()) for _ in range(4)))
        inputs = guard.inputs(np.vstack([dermoscopy, not_dermoscopy]))
        is_not = np.r_[np.zeros(len(dermoscopy)), np.ones(len(not_dermoscopy))]
        groups = np.zeros(len(dermoscopy)) if groups is None else np.asarray(groups)
        _, group, group_size = np.unique(groups, return_inverse=True, return_counts=True)
        # each side sums to half the rows, as class_weight="balanced" would give; within the dermoscopy side,
        # each clinic gets an equal share
        weight = np.r_[1.0 / (len(group_size) * group_size[group]), np.full(len(not_dermoscopy),
                                                                            1.0 / len(not_dermoscopy))]
        scaler = StandardScaler().fit(inputs)
        head = LogisticRegression(C=strength, max_iter=5000).fit(scaler.transform(inputs), is_not,
                                                                 sample_weight=weight * len(is_not) / 2)
        guard.centre, guard.scale, guard.weight, guard.bias = (
            torch.tensor(a, dtype=torch.float64) for a in (scaler.mean_, scaler.scale_, head.coef_[0],
                                                            head.intercept_[0]))
        return guard

    def mahalanobis(self, features) -> np.ndarray:
        """Squared Mahalanobis distance of each row's penultimate features to the nearest class mean."""
        f = torch.as_tensor(np.asarray(features)[:, :self.means.shape[1]], dtype=torch.float64)
        diff = f[:, None, :] - self.means.double()[None]                              # (N, C, P)
        return torch.einsum("ncd,de,nce->nc", diff, self.precision.double(), diff).min(dim=1).values.numpy()

    def inputs(self, features) -> np.ndarray:
        features = np.asarray(features, dtype=np.float64)
        return np.hstack([features, np.log(np.maximum(self.mahalanobis(features), 1e-12))[:, None]])

    @property
    def width(self) -> int:
        """How many features the guard scores (guard_width of its network)."""
        return self.weight.numel() - 1

    def check_network(self, model: torch.nn.Module) -> None:
        """Refuse a guard fitted on other features than `model`'s forward_views gives (an older version's)."""
        width = guard_width(model)
        if self.width != width:
            raise SettingsError(f"the out-of-distribution guard was fitted on {self.width} features per image "
                                f"but this network gives {width}: it was fitted by an older version, or for "
                                "another model")

    def score(self, features) -> np.ndarray:
        standardised = (self.inputs(features) - self.centre.double().numpy()) / self.scale.double().numpy()
        return standardised @ self.weight.double().numpy() + float(self.bias)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / OOD_FILE
        save_file({name: getattr(self, name).contiguous() for name in GUARD_TENSORS}, str(path),
                  metadata={"method": "dermoscopy-vs-not logistic head on penultimate features, last stages' "
                                      "means + log Mahalanobis",
                            "threshold": repr(self.threshold)})
        return path

    @classmethod
    def load(cls, path: str | Path, threshold: float) -> "DermoscopyGuard":
        tensors = load_file(str(path))
        missing = sorted(set(GUARD_TENSORS) - set(tensors))
        if missing:
            raise SettingsError(f"{path} lacks {missing}: it is an older out-of-distribution file; export the "
                                "model again with `python -m dermadetect export RUN`")
        return cls(*(tensors[name] for name in GUARD_TENSORS), float(threshold))


GUARD_TENSORS = ("means", "precision", "centre", "scale", "weight", "bias")
