"""The post-training analysis of one backbone: what a plain accuracy table leaves out.

Everything is SELECTED on validation (test-time augmentation on or off, the temperature, the strength of the
class-balanced decision, the melanoma threshold, the out-of-distribution threshold) and the test split is then
scored once: balanced accuracy and friends with bootstrap 95% confidence intervals (resampling lesions),
calibration before/after, the melanoma operating point, out-of-distribution AUROC against non-dermoscopic photos,
and subgroups by data source, sex and age band.
"""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold

from .data import GUARD_MIN_LESIONS, lesion_of
from .inference import to_rgb
from .labels import melanoma_index
from .metrics import (balanced_accuracy, bootstrap_intervals, classification_metrics, json_safe, operating_point,
                      reliability_bins, threshold_for_sensitivity)
from .posthoc import (GUARD_STAGES, MELANOMA_TARGET_SENSITIVITY, TTA_VIEWS, DermoscopyGuard, PostHocSettings,
                      adjusted_decisions, class_prior, energy_score, fit_adjustment_strength, fit_temperature, nll,
                      softmax)
from .report import plot_reliability

logger = logging.getLogger(__name__)

# the guard passes this share of validation images, clean and through the upload shifts: of those tried, the
# highest at which it still flags 90% of the photos of skin and 97% of the pictures (docs/results.md)
GUARD_KEEP = 0.98
GUARD_KEEPS_TRIED = (0.96, GUARD_KEEP, 0.99)
GUARD_FOLDS = GUARD_MIN_LESIONS  # cross-validation of the guard over the photos it is fitted on
GUARD_MIN_CLINIC = 50    # validation images a clinic needs for its unseen-clinic flag rate to be reported
AGE_BANDS = ((0, 30, "<30"), (30, 45, "30-44"), (45, 60, "45-59"), (60, 75, "60-74"), (75, 200, "75+"))
# scikit-image's sample pictures that ship inside its wheel (no download): photographs, microscopy, astronomy,
# text and graphics, none of them dermoscopy
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cat", "cell", "checkerboard", "clock", "coffee",
                  "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry",
                  "logo", "microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom",
                  "stereo_motorcycle", "text")
# pictures that ship inside other pinned packages (photographs, logos, a screenshot): name -> (package, file)
PACKAGE_PHOTOS = {"grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
                  "gift_icon": ("matplotlib", "mpl-data/sample_data/Minduka_Present_Blue_Pack.png"),
                  "matplotlib_logo": ("matplotlib", "mpl-data/sample_data/logo2.png"),
                  "china": ("sklearn", "datasets/images/china.jpg"),
                  "flower": ("sklearn", "datasets/images/flower.jpg"),
                  "cheetah": ("gradio", "media_assets/images/cheetah.jpg"),
                  "cheetah_face": ("gradio", "media_assets/images/cheetah1.jpg"),
                  "cheetah_cub": ("gradio", "test_data/cheetah2.jpg"),
                  "groot": ("gradio", "media_assets/images/groot.jpeg"),
                  "lion": ("gradio", "media_assets/images/lion.jpg"),
                  "eiffel_tower": ("gradio", "media_assets/images/tower.jpg"),
                  "gradio_screenshot": ("gradio", "media_assets/images/screenshot.gif"),
                  "hf_logo": ("gradio", "media_assets/images/hf-logo_transpng.png")}
PHOTO_SAMPLES = SKIMAGE_PHOTOS + tuple(PACKAGE_PHOTOS)


def photo_samples() -> list[tuple[str, Image.Image]]:
    """Non-dermoscopic images for the out-of-distribution test, as RGB PIL images."""
    import skimage.data

    out = []
    for name in SKIMAGE_PHOTOS:
        picture = getattr(skimage.data, name)()
        array = np.asarray(picture[0] if isinstance(picture, tuple) else picture)  # a stereo pair: the left view
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        out.append((name, to_rgb(Image.fromarray(array))))
    for name, (package, file) in PACKAGE_PHOTOS.items():
        with Image.open(importlib.resources.files(package) / file) as image:
            out.append((name, to_rgb(image)))
    return out


def age_band(age) -> str:
    try:
        age = float(age)
    except (TypeError, ValueError):
        return "unknown"
    if np.isnan(age):
        return "unknown"
    return next(name for low, high, name in AGE_BANDS if low <= age < high)


def subgroups(table, labels, probs, predictions, label_names, mel: int | None, mel_threshold: float | None) -> dict:
    """Test results per data source (`dataset`), sex and age band: images, accuracy and balanced accuracy (over
    the classes present) of the decisions, melanoma sensitivity at the chosen threshold."""
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
            row = {"group": value, "images": int(idx.sum()), "accuracy": float(np.mean(pred == y)),
                   "balanced_accuracy": balanced_accuracy(y, pred), "classes_present": int(len(np.unique(y)))}
            if mel is not None:
                row.update(melanomas=int(np.sum(y == mel)),
                           melanoma_sensitivity=operating_point(p[:, mel], y == mel, mel_threshold)["sensitivity"])
            rows.append(row)
        out[column] = rows
    return out


def fit_guard(outputs: dict[str, dict], clinics: dict[str, np.ndarray] | None = None,
              weigh_clinics: bool = True, keep: float = GUARD_KEEP) -> tuple[DermoscopyGuard, dict]:
    """The served guard and its report. Dermoscopy: the training images, clean and through the upload shifts,
    each clinic weighed equally when `clinics` (train and validation: the clinic of each image) names them
    (`weigh_clinics` False pools them and `keep` moves the threshold, for benchmarks/bench_guard.py);
    not dermoscopy: the skin photos and the ordinary pictures, each as taken and in random framings (which
    teach the head more than the one picture, docs/results.md). The threshold passes
    `keep` of the validation images, clean and shifted. The photos' flag rates come from cross-validation:
    each fold scored by a guard fitted without it (skin photos grouped by lesion). Each clinic's validation
    images are also scored by a guard fitted without that clinic: how the guard treats dermoscopy from a
    clinic it never saw."""
    train = outputs["train"]
    shifted = outputs["train_shifted"]["features"]
    validation = [outputs["validation"]["features"], outputs["validation_shifted"]["features"]]
    photos, framings = outputs["photos"]["features"], outputs["photo_framings"]
    skin = outputs.get("guard_photos")
    everything = slice(None)

    def fit(skin_rows=everything, pictures=np.ones(len(photos), dtype=bool), seen=everything,
            seen_validation=everything) -> DermoscopyGuard:
        negatives = [framings["features"][pictures[framings["labels"]]]]
        if skin is not None:
            negatives.append(skin["features"][skin_rows])
        features, labels = train["features"][seen], train["labels"][seen]
        groups = np.tile(clinics["train"][seen], 2) if clinics is not None and weigh_clinics else None
        guard = DermoscopyGuard.fit(features, labels, np.vstack([features, shifted[seen]]), np.vstack(negatives),
                                    penultimate=int(train["penultimate"]), groups=groups)
        scores = np.concatenate([guard.score(v[seen_validation]) for v in validation])
        guard.threshold = float(np.quantile(scores, keep))
        return guard

    guard = fit()
    photo_fold = np.arange(len(photos)) % GUARD_FOLDS
    if skin is not None:
        lesions = np.array([lesion_of(n) for n in skin["names"]])[skin["labels"]]  # per row (views of a photo)
        skin_fold = np.zeros(len(lesions), dtype=int)
        for k, (_, held) in enumerate(GroupKFold(GUARD_FOLDS).split(lesions, groups=lesions)):
            skin_fold[held] = k
        first_view = skin["views"] == 0  # the photos as taken are scored; their framings only train
    held_skin, held_photos, held_validation = [], [], []
    for k in range(GUARD_FOLDS):
        fold = fit(skin_fold != k if skin is not None else everything, photo_fold != k)
        held_photos.append((np.flatnonzero(photo_fold == k), fold.score(photos[photo_fold == k]) > fold.threshold))
        validation_margin = fold.score(validation[0]) - fold.threshold
        held_validation.append(validation_margin > 0)
        if skin is not None:
            held = (skin_fold == k) & first_view
            held_skin.append((fold.score(skin["features"][held]) - fold.threshold, validation_margin))
    report = {
        "method": "dermoscopy-vs-not logistic head on penultimate features, the means of the last "
                  f"{GUARD_STAGES} feature stages and the penultimate features' log Mahalanobis distance to the "
                  "nearest training class (shared Ledoit-Wolf covariance); not dermoscopy: the pictures and "
                  "photos of skin, each as taken and in random framings" +
                  (", each training clinic weighed equally" if clinics is not None and weigh_clinics else ""),
        "threshold": guard.threshold,
        "threshold_rule": f"{keep:.0%} of validation images pass, clean and through the upload shifts",
        "photos": list(PHOTO_SAMPLES),
        "picture_views": int(framings["views"].max()) + 1,
        "validation_flagged": float(np.mean(guard.score(validation[0]) > guard.threshold)),
        "validation_shifted_flagged": float(np.mean(guard.score(validation[1]) > guard.threshold)),
        "cross_validated": {"folds": GUARD_FOLDS,
                            "photos_flagged": float(np.mean(np.concatenate([f for _, f in held_photos]))),
                            "photos_passed": [PHOTO_SAMPLES[i] for rows, flagged in held_photos
                                              for i in rows[~flagged]],
                            "validation_flagged": float(np.mean(held_validation))},
        "skin_photos": None,
        "unseen_clinics": unseen_clinics(fit, clinics, validation),
    }
    if skin is not None:
        skin_margin = np.concatenate([m for m, _ in held_skin])
        val_margin = np.concatenate([m for _, m in held_skin])
        report["skin_photos"] = {
            "folder": str(skin["folder"]), "photos": int(first_view.sum()), "lesions": int(len(set(lesions))),
            "views_per_photo": int(skin["views"].max()) + 1}
        report["cross_validated"].update(
            skin_photos_flagged=float(np.mean(skin_margin > 0)),
            auroc_validation_vs_skin_photos=float(roc_auc_score(
                np.r_[np.zeros(len(val_margin)), np.ones(len(skin_margin))], np.r_[val_margin, skin_margin])))
    return guard, report


def clinics_of(tables: dict) -> dict[str, np.ndarray] | None:
    """The clinic of each train and validation image (HAM10000's `dataset` column), or None without it. Images
    without one, and clinics with fewer than GUARD_MIN_CLINIC training images, form one group: weighed equally,
    a handful of images would otherwise weigh as much as a whole clinic."""
    if not all("dataset" in tables[split].column_names for split in ("train", "validation")):
        logger.info("the data names no clinic per image (no `dataset` column): the guard pools the training images")
        return None
    clinics = {split: np.array([str(v or "") for v in tables[split]["dataset"]]) for split in ("train", "validation")}
    names, counts = np.unique(clinics["train"], return_counts=True)
    small = {n for n, c in zip(names, counts) if c < GUARD_MIN_CLINIC} | {""}
    return {split: np.where(np.isin(v, list(small)), "other", v) for split, v in clinics.items()}


def unseen_clinics(fit, clinics: dict[str, np.ndarray] | None, validation: list[np.ndarray]) -> dict:
    """Per clinic with at least GUARD_MIN_CLINIC validation images: the share of them (clean and shifted) that a
    guard fitted and thresholded without that clinic flags."""
    if clinics is None:
        return {}
    report = {}
    for clinic in np.unique(clinics["train"]):
        held, seen = clinics["validation"] == clinic, clinics["train"] != clinic
        if min(held.sum(), (~held).sum(), seen.sum()) < GUARD_MIN_CLINIC:
            continue
        guard = fit(seen=seen, seen_validation=~held)
        report[str(clinic)] = {"validation_images": int(held.sum()),
                               "flagged": float(np.mean(guard.score(validation[0][held]) > guard.threshold)),
                               "shifted_flagged": float(np.mean(guard.score(validation[1][held]) > guard.threshold))}
    return report


def analyze(name: str, outputs: dict[str, dict], tables: dict, label_names, resamples: int,
            out: Path) -> tuple[dict, PostHocSettings, DermoscopyGuard, dict]:
    """The analysis of one trained model from its evaluation pass (`outputs`: train with one view, validation,
    test and the non-dermoscopic photos with TTA_VIEWS views). Writes reliability_diagram.png into `out`.
    Returns analysis.json's content, the fitted settings (CAM method still the default), the OOD detector and,
    per split, (calibrated probabilities, decisions, OOD scores) of validation and test."""
    names = tuple(label_names)
    mel = melanoma_index(names)
    val, test, photos = outputs["validation"], outputs["test"], outputs["photos"]

    # test-time augmentation: on only if it wins on validation balanced accuracy
    def view_logits(split, tta):
        return split["logits"].mean(axis=1) if tta else split["logits"][:, 0]
    val_bal = {tta: balanced_accuracy(val["labels"], view_logits(val, tta).argmax(axis=1)) for tta in (False, True)}
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
    prior = class_prior(outputs["train"]["labels"], len(names))
    strength, val_by_strength = fit_adjustment_strength(val_p, val["labels"], prior)
    val_pred, test_pred = adjusted_decisions(val_p, prior, strength), adjusted_decisions(test_p, prior, strength)
    decision = {"rule": "argmax of log P(class) - strength * log(class share of train): post-hoc logit adjustment",
                "class_prior": dict(zip(names, prior.tolist())), "strength": strength,
                "validation_balanced_accuracy": {f"{s:g}": v for s, v in val_by_strength.items()},
                "test_argmax": json_safe(classification_metrics(test["labels"], test_p, names, mel))}

    melanoma, mel_threshold = None, None
    if mel is not None:
        mel_threshold = threshold_for_sensitivity(val_p[:, mel], val["labels"] == mel, MELANOMA_TARGET_SENSITIVITY)
        melanoma = {"target_sensitivity": MELANOMA_TARGET_SENSITIVITY, "threshold": mel_threshold,
                    "validation": operating_point(val_p[:, mel], val["labels"] == mel, mel_threshold),
                    "test": operating_point(test_p[:, mel], test["labels"] == mel, mel_threshold)}

    # out of distribution: the dermoscopy-vs-not guard, its threshold on validation (clean and shifted)
    detector, ood = fit_guard(outputs, clinics_of(tables))
    val_scores, test_scores = detector.score(val["features"]), detector.score(test["features"])
    photo_scores = detector.score(photos["features"])
    photo_z = view_logits(photos, use_tta)
    is_photo = np.r_[np.zeros(len(test_scores)), np.ones(len(photo_scores))]
    ood.update({"auroc_test_vs_photos": float(roc_auc_score(is_photo, np.r_[test_scores, photo_scores])),
                "auroc_energy_test_vs_photos": float(roc_auc_score(
                    is_photo, np.r_[energy_score(test_z, temperature), energy_score(photo_z, temperature)])),
                "test_flagged": float(np.mean(test_scores > detector.threshold)),
                "photos_flagged": float(np.mean(photo_scores > detector.threshold)),
                "photo_scores": {n: float(s) for n, s in zip(PHOTO_SAMPLES, photo_scores, strict=True)}})

    test_table = tables["test"]
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
        "bootstrap": {"resamples": resamples, "unit": "lesion", "level": 0.95,
                      "test": bootstrap_intervals(test["labels"], test_p, test_table["lesion_id"], names, mel,
                                                  mel_threshold, resamples, predictions=test_pred)},
        "subgroups": subgroups(test_table, test["labels"], test_p, test_pred, names, mel, mel_threshold),
    }
    settings = PostHocSettings(temperature=temperature, tta_views=TTA_VIEWS if use_tta else 1,
                               class_prior=tuple(prior.tolist()), adjustment_strength=strength,
                               melanoma_threshold=mel_threshold, ood_threshold=detector.threshold)
    logger.info("%s: TTA %s, T=%.3f, test ECE %.3f -> %.3f, adjustment %.3f (test bal acc %.3f -> %.3f), "
                "OOD AUROC %.3f", name, "on" if use_tta else "off", temperature,
                calibration["test"]["before"]["ece"], calibration["test"]["after"]["ece"], strength,
                decision["test_argmax"]["balanced_accuracy"], analysis["test_final"]["balanced_accuracy"],
                ood["auroc_test_vs_photos"])
    served = {"validation": (val_p, val_pred, val_scores), "test": (test_p, test_pred, test_scores)}
    return analysis, settings, detector, served
