"""Classification metrics as flat dicts of floats, computed with scikit-learn from labels and probabilities."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                             precision_recall_fscore_support, roc_auc_score)

def classification_metrics(y_true: np.ndarray, probs: np.ndarray, label_names,
                           melanoma_index: int | None = None) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro/weighted and per-class precision/recall/F1, one-vs-rest ROC-AUC,
    and melanoma sensitivity/specificity. Keys are flat: "recall/mel", "roc_auc_macro", ...

    Classes absent from y_true get NaN per-class recall and AUC; the macro AUC averages the defined ones."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    classes = np.arange(len(label_names))
    y_pred = probs.argmax(axis=1)
    out = {"n": float(len(y_true)),
           "accuracy": accuracy_score(y_true, y_pred),
           "balanced_accuracy": balanced_accuracy_score(y_true, y_pred)}  # the ISIC 2018 ranking metric
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
