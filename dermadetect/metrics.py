"""Metrics from labels and probabilities: classification (scikit-learn, flat dicts of floats), calibration,
operating points, bootstrap confidence intervals."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (accuracy_score, confusion_matrix, precision_recall_fscore_support, recall_score,
                             roc_auc_score, roc_curve)


def balanced_accuracy(y_true, y_pred) -> float:
    """The ISIC 2018 ranking metric: mean recall over the classes present in y_true. It equals scikit-learn's
    balanced_accuracy_score, which warns whenever a call names a class the sample lacks (routine in small
    splits and bootstrap resamples)."""
    return float(recall_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, label_names,
                           melanoma_index: int | None = None, y_pred: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro/weighted and per-class precision/recall/F1, one-vs-rest ROC-AUC,
    and melanoma sensitivity/specificity. Keys are flat: "recall/mel", "roc_auc_macro", ...

    The decisions are `y_pred` if given (a decision rule other than the argmax), else the argmax of `probs`;
    the AUCs always rank `probs`. Classes absent from y_true get NaN per-class recall and AUC; the macro AUC
    averages the defined ones."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    classes = np.arange(len(label_names))
    y_pred = probs.argmax(axis=1) if y_pred is None else np.asarray(y_pred)
    out = {"n": float(len(y_true)),
           "accuracy": accuracy_score(y_true, y_pred),
           "balanced_accuracy": balanced_accuracy(y_true, y_pred)}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=np.unique(y_true),
                                                     average=average, zero_division=0)
        out.update({f"precision_{average}": p, f"recall_{average}": r, f"f1_{average}": f})
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    aucs = []
    for k, name in enumerate(label_names):
        present = support[k] > 0
        auc = roc_auc_score(y_true == k, probs[:, k]) if present and support[k] < len(y_true) else math.nan
        aucs.append(auc)
        out.update({f"precision/{name}": p[k], f"recall/{name}": r[k] if present else math.nan,
                    f"f1/{name}": f[k], f"roc_auc/{name}": auc, f"support/{name}": float(support[k])})
    defined = [a for a in aucs if not math.isnan(a)]
    out["roc_auc_macro"] = float(np.mean(defined)) if defined else math.nan
    mel = melanoma_index
    if mel is not None:
        tn, fp, fn, tp = confusion_matrix(y_true == mel, y_pred == mel, labels=[False, True]).ravel()
        out["melanoma_sensitivity"] = tp / (tp + fn) if tp + fn else math.nan
        out["melanoma_specificity"] = tn / (tn + fp) if tn + fp else math.nan
    return {key: float(value) for key, value in out.items()}


def json_safe(metrics: dict) -> dict:
    """NaN -> None so that the file is strict JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict:
    """Top-label calibration in `bins` equal-width confidence bins: counts, mean confidence and accuracy per
    bin, and the expected calibration error (the count-weighted mean |accuracy - confidence|)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    # by hand: scikit-learn's calibration_curve drops empty bins and returns no counts, which ECE weighs by
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    acc_sum = np.bincount(which, weights=correct, minlength=bins)
    with np.errstate(invalid="ignore"):
        mean_conf, accuracy = conf_sum / count, acc_sum / count
    ece = float(np.sum(np.abs(acc_sum - conf_sum)) / len(labels))
    return {"ece": ece, "edges": edges.tolist(), "count": count.tolist(),
            "confidence": [None if math.isnan(v) else float(v) for v in mean_conf],
            "accuracy": [None if math.isnan(v) else float(v) for v in accuracy]}


def threshold_for_sensitivity(scores: np.ndarray, positives: np.ndarray, target: float) -> float:
    """The highest threshold t with sensitivity(score >= t) >= target: the operating point that meets the
    target with the fewest false positives on the data it is chosen on."""
    positives = np.asarray(positives, dtype=bool)
    if not positives.any():
        raise ValueError("no positive cases to choose a threshold on")
    # roc_curve's thresholds fall in order and its tpr is the sensitivity of `score >= threshold`
    _, tpr, thresholds = roc_curve(positives, scores, drop_intermediate=False)
    return float(thresholds[np.argmax(tpr >= target - 1e-9)])


def operating_point(scores: np.ndarray, positives: np.ndarray, threshold: float) -> dict:
    """Sensitivity, specificity, PPV and NPV of `score >= threshold`, with the counts behind them."""
    flagged = np.asarray(scores) >= threshold
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(np.asarray(positives, dtype=bool), flagged,
                                                       labels=[False, True]).ravel())
    ratio = lambda a, b: a / (a + b) if a + b else None  # noqa: E731
    return {"threshold": float(threshold), "sensitivity": ratio(tp, fn), "specificity": ratio(tn, fp),
            "ppv": ratio(tp, fp), "npv": ratio(tn, fn), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


BOOTSTRAP_METRICS = ("balanced_accuracy", "accuracy", "f1_macro", "roc_auc_macro")


def lesion_resamples(groups, resamples: int, seed: int = 0):
    """Row indices of `resamples` bootstrap resamples that draw whole lesions (`groups`) with replacement."""
    unique, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield np.concatenate([members[g] for g in rng.integers(0, len(unique), len(unique))])


def bootstrap_intervals(labels, probs, groups, label_names, melanoma_index: int | None, mel_threshold: float | None,
                        resamples: int = 1000, seed: int = 0, predictions=None) -> dict:
    """Percentile 95% intervals of the test metrics, resampling whole lesions (images of one lesion are not
    independent): each resample is scored by `classification_metrics`, plus the melanoma operating point at
    `mel_threshold`. Decisions: `predictions` if given, else the argmax of `probs`. Returns {metric: {"value",
    "low", "high"}}."""
    # a loop rather than scipy.stats.bootstrap: that resamples observations, not groups, and metrics that a
    # resample leaves undefined (no melanoma in it) need dropping
    labels, probs, groups = np.asarray(labels), np.asarray(probs), np.asarray(groups)
    predictions = probs.argmax(axis=1) if predictions is None else np.asarray(predictions)

    def metrics(idx):
        y, p = labels[idx], probs[idx]
        full = classification_metrics(y, p, label_names, y_pred=predictions[idx])
        out = {key: full[key] for key in BOOTSTRAP_METRICS}
        out.update({f"recall/{name}": full[f"recall/{name}"] for name in label_names})
        if melanoma_index is not None and mel_threshold is not None:
            point = operating_point(p[:, melanoma_index], y == melanoma_index, mel_threshold)
            out["melanoma_sensitivity_at_threshold"] = point["sensitivity"]
            out["melanoma_specificity_at_threshold"] = point["specificity"]
        return {k: v for k, v in out.items() if v is not None and not math.isnan(v)}

    point = metrics(np.arange(len(labels)))
    samples = {key: [] for key in point}
    for idx in lesion_resamples(groups, resamples, seed):
        for key, value in metrics(idx).items():
            if key in samples:
                samples[key].append(value)
    return {key: {"value": point[key], "low": float(np.percentile(samples[key], 2.5)),
                  "high": float(np.percentile(samples[key], 97.5))} for key in point}
