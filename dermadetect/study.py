"""The post-training analysis of one backbone: what a plain accuracy table leaves out.

Everything is SELECTED on validation (test-time augmentation on or off, the temperature, the strength of the
class-balanced decision, the melanoma threshold, the out-of-distribution threshold) and the test split is then
scored once: balanced accuracy and friends with bootstrap 95% confidence intervals (resampling lesions),
calibration before/after, the melanoma operating point, out-of-distribution AUROC against non-dermoscopic photos,
and subgroups by data source, sex and age band.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import LesionData, as_torch_dataset, collate
from .hub import update_export_config
from .inference import to_rgb
from .metrics import (bootstrap_intervals, classification_metrics, json_safe, operating_point, reliability_bins,
                      threshold_for_sensitivity)
from .posthoc import (MELANOMA_TARGET_SENSITIVITY, OOD_FILE, TTA_VIEWS, MahalanobisDetector, adjusted_decisions,
                      energy_score, fit_adjustment_strength, fit_temperature, model_outputs, nll, softmax)
from .report import plot_reliability

logger = logging.getLogger(__name__)

ANALYSIS_FILE = "analysis.json"
OOD_KEEP_IN_DISTRIBUTION = 0.95      # the OOD threshold keeps this share of validation dermoscopy images
BOOTSTRAP_RESAMPLES = 1000
AGE_BANDS = ((0, 30, "<30"), (30, 45, "30-44"), (45, 60, "45-59"), (60, 75, "60-74"), (75, 200, "75+"))
# scikit-image's sample pictures that ship inside its wheel (no download): photographs, microscopy, astronomy,
# text and graphics, none of them dermoscopy
PHOTO_SAMPLES = ("astronaut", "brick", "camera", "cat", "cell", "checkerboard", "clock", "coffee", "coins",
                 "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
                 "microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text")


def photo_samples() -> list[tuple[str, Image.Image]]:
    """Non-dermoscopic images for the out-of-distribution test, as RGB PIL images."""
    import skimage.data

    out = []
    for name in PHOTO_SAMPLES:
        array = np.asarray(getattr(skimage.data, name)())
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        out.append((name, to_rgb(Image.fromarray(array))))
    return out


def collect(model, table, transform, label_names, views: int, batch_size: int, num_workers: int) -> dict:
    """Logits of every view (N, views, C), penultimate features of view 0 (N, D) and labels of a split."""
    loader = DataLoader(as_torch_dataset(table, label_names, transform), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=collate)
    logits, features, labels = [], [], []
    for pixels, y in tqdm(loader, desc=f"analysis: {len(table)} images x {views} views", leave=False):
        z, f = model_outputs(model, pixels, views)
        logits.append(z.numpy())
        features.append(f.numpy())
        labels.append(y.numpy())
    return {"logits": np.concatenate(logits), "features": np.concatenate(features), "labels": np.concatenate(labels)}


def age_band(age) -> str:
    try:
        age = float(age)
    except (TypeError, ValueError):
        return "unknown"
    if np.isnan(age):
        return "unknown"
    return next(name for low, high, name in AGE_BANDS if low <= age < high)


def subgroups(table, labels, probs, predictions, label_names, mel_threshold: float) -> dict:
    """Test results per data source (`dataset`), sex and age band: images, accuracy and balanced accuracy (over
    the classes present) of the decisions, melanoma sensitivity at the chosen threshold."""
    mel = list(label_names).index("mel")
    columns = {"dataset": list(table["dataset"]) if "dataset" in table.column_names else None,
               "sex": list(table["sex"]) if "sex" in table.column_names else None,
               "age_band": [age_band(a) for a in table["age"]] if "age" in table.column_names else None}
    out = {}
    for column, values in columns.items():
        if values is None:
            continue
        values = np.array([str(v) if v not in (None, "") else "unknown" for v in values])
        rows = []
        order = [name for _, _, name in AGE_BANDS] + ["unknown"]
        for value in sorted(set(values), key=lambda v: (order.index(v) if v in order else -1, v)):
            idx = values == value
            y, p, pred = labels[idx], probs[idx], predictions[idx]
            point = operating_point(p[:, mel], y == mel, mel_threshold)
            rows.append({"group": value, "images": int(idx.sum()), "accuracy": float(np.mean(pred == y)),
                         "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
                         "classes_present": int(len(np.unique(y))), "melanomas": int(np.sum(y == mel)),
                         "melanoma_sensitivity": point["sensitivity"]})
        out[column] = rows
    return out


def class_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Each class's share of `labels`; a class absent from them counts once (its log would be -inf)."""
    counts = np.maximum(np.bincount(labels, minlength=num_classes), 1)
    return counts / counts.sum()


def write_calibrated_predictions(path: Path, table, label_names, labels, probs, predictions, ood_scores) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "lesion_id", "label", "pred"] + [f"prob_{n}" for n in label_names] +
                        ["ood_score"])
        for image_id, lesion_id, y, p, d, s in zip(table["image_id"], table["lesion_id"], labels, probs, predictions,
                                                   ood_scores):
            # repr: the shortest text that reads back as the same float64, so metrics recompute exactly even
            # where a barely trained model gives nearly equal probabilities (9 digits reordered such ties)
            writer.writerow([image_id, lesion_id, label_names[y], label_names[d]] +
                            [repr(float(v)) for v in p] + [repr(float(s))])


def analyze_backbone(name: str, model: torch.nn.Module, data: LesionData, eval_tf, out: Path, export_dir: Path,
                     batch_size: int = 64, num_workers: int = 2) -> dict:
    """Run the analysis of a trained model, write analysis.json, reliability_diagram.png and
    predictions_calibrated_{validation,test}.csv into `out`, and store the temperature, TTA choice, decision rule,
    melanoma threshold and OOD detector in the export (config.json "dermadetect" + ood.safetensors)."""
    model = model.eval()
    names = data.label_names
    mel = list(names).index("mel")
    splits = {split: collect(model, data.splits[split], eval_tf, names, TTA_VIEWS if split != "train" else 1,
                             batch_size, num_workers) for split in ("validation", "test", "train")}
    val, test = splits["validation"], splits["test"]

    # test-time augmentation: on only if it wins on validation balanced accuracy
    def view_logits(split, tta):
        return split["logits"].mean(axis=1) if tta else split["logits"][:, 0]
    val_bal = {tta: balanced_accuracy_score(val["labels"], view_logits(val, tta).argmax(axis=1))
               for tta in (False, True)}
    use_tta = val_bal[True] > val_bal[False]
    val_z, test_z = view_logits(val, use_tta), view_logits(test, use_tta)

    temperature = fit_temperature(val_z, val["labels"])
    calibration = {}
    for split, z, y in (("validation", val_z, val["labels"]), ("test", test_z, test["labels"])):
        calibration[split] = {"before": {**reliability_bins(softmax(z), y), "nll": nll(z, y)},
                              "after": {**reliability_bins(softmax(z, temperature), y), "nll": nll(z, y, temperature)}}
    plot_reliability(calibration["test"], temperature, out / "reliability_diagram.png",
                     f"{name}: test calibration (temperature fitted on validation)")
    val_p, test_p = softmax(val_z, temperature), softmax(test_z, temperature)

    # the decision: the argmax moved towards the rare classes as far as helps validation balanced accuracy
    prior = class_prior(splits["train"]["labels"], len(names))
    strength, val_by_strength = fit_adjustment_strength(val_p, val["labels"], prior)
    val_pred, test_pred = adjusted_decisions(val_p, prior, strength), adjusted_decisions(test_p, prior, strength)
    decision = {"rule": "argmax of log P(class) - strength * log(class share of train): post-hoc logit adjustment",
                "class_prior": dict(zip(names, prior.tolist())), "strength": strength,
                "validation_balanced_accuracy": {f"{s:g}": v for s, v in val_by_strength.items()},
                "test_argmax": json_safe(classification_metrics(test["labels"], test_p, names, mel))}

    mel_threshold = threshold_for_sensitivity(val_p[:, mel], val["labels"] == mel, MELANOMA_TARGET_SENSITIVITY)
    melanoma = {"target_sensitivity": MELANOMA_TARGET_SENSITIVITY, "threshold": mel_threshold,
                "validation": operating_point(val_p[:, mel], val["labels"] == mel, mel_threshold),
                "test": operating_point(test_p[:, mel], test["labels"] == mel, mel_threshold)}

    # out of distribution: Mahalanobis on penultimate features fitted on train, threshold on validation
    detector = MahalanobisDetector.fit(splits["train"]["features"], splits["train"]["labels"])
    val_scores = detector.score(val["features"])
    detector.threshold = float(np.quantile(val_scores, OOD_KEEP_IN_DISTRIBUTION))
    test_scores = detector.score(test["features"])
    photos = photo_samples()
    photo_pixels = torch.stack([eval_tf(image) for _, image in photos])
    photo_logits, photo_features = model_outputs(model, photo_pixels, TTA_VIEWS if use_tta else 1)
    photo_scores = detector.score(photo_features.numpy())
    photo_z = photo_logits.numpy().mean(axis=1)
    is_photo = np.r_[np.zeros(len(test_scores)), np.ones(len(photo_scores))]
    ood = {"method": "mahalanobis (nearest class, shared Ledoit-Wolf covariance, penultimate features of train)",
           "threshold": detector.threshold, "threshold_rule": f"{OOD_KEEP_IN_DISTRIBUTION:.0%} of validation kept",
           "photos": [n for n, _ in photos],
           "auroc_test_vs_photos": float(roc_auc_score(is_photo, np.r_[test_scores, photo_scores])),
           "auroc_energy_test_vs_photos": float(roc_auc_score(
               is_photo, np.r_[energy_score(test_z, temperature), energy_score(photo_z, temperature)])),
           "test_flagged": float(np.mean(test_scores > detector.threshold)),
           "photos_flagged": float(np.mean(photo_scores > detector.threshold)),
           "photo_scores": {n: float(s) for (n, _), s in zip(photos, photo_scores)}}

    test_table = data.splits["test"]
    analysis = {
        "backbone": name,
        "tta": {"views": TTA_VIEWS, "transforms": "dihedral: rotations by 0/90/180/270 degrees, each mirrored",
                "validation_balanced_accuracy": {"without": val_bal[False], "with": val_bal[True]},
                "used": bool(use_tta),
                "test_without": json_safe(classification_metrics(test["labels"], softmax(view_logits(test, False)),
                                                                 names, mel)),
                "test_with": json_safe(classification_metrics(test["labels"], softmax(view_logits(test, True)),
                                                              names, mel))},
        "temperature": temperature,
        "calibration": calibration,
        "decision": decision,
        "melanoma_operating_point": melanoma,
        "ood": ood,
        "test_final": json_safe(classification_metrics(test["labels"], test_p, names, mel, test_pred)),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "unit": "lesion", "level": 0.95,
                      "test": bootstrap_intervals(test["labels"], test_p, test_table["lesion_id"], names,
                                                  mel_threshold, BOOTSTRAP_RESAMPLES, predictions=test_pred)},
        "subgroups": subgroups(test_table, test["labels"], test_p, test_pred, names, mel_threshold),
    }
    (out / ANALYSIS_FILE).write_text(json.dumps(analysis, indent=1, allow_nan=False))
    for split, probs, pred, scores in (("validation", val_p, val_pred, val_scores),
                                       ("test", test_p, test_pred, test_scores)):
        write_calibrated_predictions(out / f"predictions_calibrated_{split}.csv", data.splits[split], names,
                                     splits[split]["labels"], probs, pred, scores)
    detector.save(export_dir)
    update_export_config(export_dir, temperature=temperature, tta_views=TTA_VIEWS if use_tta else 1,
                         logit_adjustment={"class_prior": prior.tolist(), "strength": strength},
                         melanoma_threshold=mel_threshold,
                         ood={"method": "mahalanobis", "file": OOD_FILE, "threshold": detector.threshold})
    logger.info("%s: TTA %s, T=%.3f, test ECE %.3f -> %.3f, adjustment %.3f (test bal acc %.3f -> %.3f), "
                "mel threshold %.3f (test sens %.3f spec %.3f), OOD AUROC %.3f", name, "on" if use_tta else "off",
                temperature, calibration["test"]["before"]["ece"], calibration["test"]["after"]["ece"], strength,
                decision["test_argmax"]["balanced_accuracy"], analysis["test_final"]["balanced_accuracy"],
                mel_threshold, melanoma["test"]["sensitivity"], melanoma["test"]["specificity"],
                ood["auroc_test_vs_photos"])
    return analysis
