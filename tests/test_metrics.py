"""Metric dicts against scikit-learn's own functions and hand-computed cases."""

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from dermadetect.labels import HAM10000_CLASSES, melanoma_index
from dermadetect.metrics import classification_metrics, json_safe


def random_predictions(n=400, k=7, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[y] * rng.random((n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


def test_matches_sklearn_on_all_classes_present():
    y, probs = random_predictions()
    m = classification_metrics(y, probs, HAM10000_CLASSES, melanoma_index(HAM10000_CLASSES))
    pred = probs.argmax(1)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["roc_auc_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["roc_auc/mel"] == pytest.approx(roc_auc_score(y == 4, probs[:, 4]))
    assert m["recall/mel"] == pytest.approx(((pred == 4) & (y == 4)).sum() / (y == 4).sum())
    assert m["melanoma_sensitivity"] == pytest.approx(m["recall/mel"])
    assert all(0.0 <= v <= 1.0 for k, v in m.items() if not k.startswith(("support", "n")))


def test_given_decisions_replace_the_argmax_but_not_the_auc():
    y, probs = random_predictions(seed=3)
    pred = np.random.default_rng(4).integers(0, 7, len(y))
    m = classification_metrics(y, probs, HAM10000_CLASSES, melanoma_index(HAM10000_CLASSES), y_pred=pred)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["melanoma_sensitivity"] == pytest.approx(((pred == 4) & (y == 4)).sum() / (y == 4).sum())
    assert m["roc_auc_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_hand_computed_melanoma_operating_point():
    labels = ("mel", "nv")
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    probs = np.array([[.9, .1], [.6, .4], [.2, .8], [.7, .3], [.1, .9], [.3, .7], [.4, .6]])
    m = classification_metrics(y, probs, labels, melanoma_index(labels))
    assert m["melanoma_sensitivity"] == pytest.approx(2 / 3)
    assert m["melanoma_specificity"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 4) / 2)


def test_absent_class_is_nan_not_zero_and_json_safe():
    y, probs = random_predictions(k=7)
    keep = y != 3
    m = classification_metrics(y[keep], probs[keep], HAM10000_CLASSES)
    assert math.isnan(m["recall/df"]) and math.isnan(m["roc_auc/df"])
    assert "melanoma_sensitivity" not in m
    others = [roc_auc_score(y[keep] == k, probs[keep][:, k]) for k in range(7) if k != 3]
    assert m["roc_auc_macro"] == pytest.approx(np.mean(others))
    assert json_safe(m)["recall/df"] is None
