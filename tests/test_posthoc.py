"""Calibration, the class-balanced decision, operating points, bootstrap intervals, test-time augmentation and
the out-of-distribution guard, each checked against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from sklearn.covariance import LedoitWolf
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from conftest import guard_features_by_hooks
from dermadetect.metrics import bootstrap_intervals, operating_point, reliability_bins, threshold_for_sensitivity
from dermadetect.posthoc import (GUARD_REGULARISATION, DermoscopyGuard, adjusted_decisions, dihedral_batch,
                                 energy_score, fit_adjustment_strength, fit_temperature, forward_views, guard_width,
                                 nll, softmax)
from dermadetect.study import PHOTO_SAMPLES, fit_guard

LABELS = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def sample_labels(rng, probs):
    return np.array([rng.choice(probs.shape[1], p=p) for p in probs])


def test_temperature_recovers_the_one_that_generated_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(20000, 5))
    labels = sample_labels(rng, softmax(logits, 2.5))   # the true model is softmax(logits / 2.5)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)
    grid = np.linspace(0.5, 5, 91)
    best_on_grid = grid[np.argmin([nll(logits, labels, t) for t in grid])]
    assert fit_temperature(logits, labels) == pytest.approx(best_on_grid, abs=0.06)
    before, after = reliability_bins(softmax(logits), labels), reliability_bins(softmax(logits, 2.5), labels)
    assert after["ece"] < 0.02 < before["ece"]


def imbalanced_posteriors(rng, n=6000):
    """Labels drawn from a skewed prior and the exact posteriors P(class | x) of noisy class evidence: the Bayes
    rule for balanced accuracy divides them by the prior (strength 1), the argmax (strength 0) favours the
    common class."""
    prior = np.array([0.03, 0.05, 0.10, 0.01, 0.08, 0.72, 0.01])
    labels = rng.choice(len(prior), size=n, p=prior)
    likelihood = np.exp(rng.normal(0, 1, (n, len(prior))) + 1.5 * np.eye(len(prior))[labels])
    posterior = likelihood * prior
    return labels, posterior / posterior.sum(axis=1, keepdims=True), prior


def test_adjusted_decision_divides_by_a_power_of_the_prior():
    rng = np.random.default_rng(5)
    _, probs, prior = imbalanced_posteriors(rng, 500)
    for strength in (0.0, 0.5, 1.0):
        expected = (probs / prior ** strength).argmax(axis=1)
        np.testing.assert_array_equal(adjusted_decisions(probs, prior, strength), expected)
    assert not np.array_equal(adjusted_decisions(probs, prior, 1.0), probs.argmax(axis=1))


def test_adjustment_strength_is_chosen_on_balanced_accuracy():
    labels, probs, prior = imbalanced_posteriors(np.random.default_rng(6))
    strength, scores = fit_adjustment_strength(probs, labels, prior)
    for s, score in scores.items():
        assert score == pytest.approx(balanced_accuracy_score(labels, (probs / prior ** s).argmax(axis=1)))
    assert scores[strength] == max(scores.values()) and strength >= 0.75  # near the Bayes rule's strength 1
    assert scores[strength] > scores[0.0] + 0.05
    # decisions that no strength changes: every strength ties, the smallest (the plain argmax) is kept
    confident = np.eye(7)[labels] * 0.999 + 0.001 / 7
    assert fit_adjustment_strength(confident, labels, prior)[0] == 0.0


def test_ece_equals_a_hand_computation():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55], [0.99, 0.01]])
    labels = np.array([0, 1, 1, 0, 0])
    # 5 bins of width 0.2: confidences 0.9, 0.8 (bin 0.6-0.8], 0.7, 0.55, 0.99
    # bin (0.4,0.6]: 0.55 wrong -> |0 - 0.55|; bin (0.6,0.8]: 0.8 wrong, 0.7 right -> |0.5 - 0.75| * 2
    # bin (0.8,1]: 0.9 right, 0.99 right -> |1 - 0.945| * 2
    expected = (0.55 + 0.25 * 2 + 0.055 * 2) / 5
    bins = reliability_bins(probs, labels, bins=5)
    assert bins["ece"] == pytest.approx(expected)
    assert bins["count"] == [0, 0, 1, 2, 2]


def test_melanoma_threshold_is_the_highest_that_meets_the_target():
    rng = np.random.default_rng(1)
    positives = rng.random(500) < 0.2
    scores = np.where(positives, rng.beta(4, 2, 500), rng.beta(2, 4, 500))
    threshold = threshold_for_sensitivity(scores, positives, 0.85)
    assert operating_point(scores, positives, threshold)["sensitivity"] >= 0.85
    above = np.sort(np.unique(scores[scores > threshold]))
    assert operating_point(scores, positives, above[0])["sensitivity"] < 0.85  # the next one up misses it
    point = operating_point(scores, positives, threshold)
    flagged = scores >= threshold
    assert point["ppv"] == pytest.approx(np.mean(positives[flagged]))
    assert point["npv"] == pytest.approx(np.mean(~positives[~flagged]))
    assert point["tp"] + point["fp"] + point["tn"] + point["fn"] == 500


def test_bootstrap_intervals_resample_lesions():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(7), 40)
    probs = softmax(np.eye(7)[labels] * 2 + rng.normal(0, 1, (len(labels), 7)))
    lesions = np.arange(len(labels))
    ci = bootstrap_intervals(labels, probs, lesions, LABELS, 4, mel_threshold=0.3, resamples=300)
    value = balanced_accuracy_score(labels, probs.argmax(1))
    assert ci["balanced_accuracy"]["value"] == pytest.approx(value)
    assert ci["balanced_accuracy"]["low"] < value < ci["balanced_accuracy"]["high"]
    # every image copied 4 times under one lesion id: same point estimate; intervals as wide as for one copy
    copied = bootstrap_intervals(np.repeat(labels, 4), np.repeat(probs, 4, axis=0), np.repeat(lesions, 4),
                                 LABELS, 4, mel_threshold=0.3, resamples=300)
    width = ci["balanced_accuracy"]["high"] - ci["balanced_accuracy"]["low"]
    copied_width = copied["balanced_accuracy"]["high"] - copied["balanced_accuracy"]["low"]
    assert copied["balanced_accuracy"]["value"] == pytest.approx(value)
    assert copied_width == pytest.approx(width, rel=0.35)
    as_images = bootstrap_intervals(np.repeat(labels, 4), np.repeat(probs, 4, axis=0), np.arange(len(labels) * 4),
                                    LABELS, 4, mel_threshold=0.3, resamples=300)
    assert as_images["balanced_accuracy"]["high"] - as_images["balanced_accuracy"]["low"] < 0.75 * copied_width
    # another decision rule: its point estimates, the AUC still ranks the probabilities
    decisions = rng.integers(0, 7, len(labels))
    other = bootstrap_intervals(labels, probs, lesions, LABELS, 4, mel_threshold=0.3, resamples=50,
                                predictions=decisions)
    assert other["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(labels, decisions))
    assert other["recall/mel"]["value"] == pytest.approx(np.mean(decisions[labels == 4] == 4))
    assert other["roc_auc_macro"]["value"] == pytest.approx(ci["roc_auc_macro"]["value"])


def test_dihedral_views_are_the_eight_symmetries():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    views = dihedral_batch(x).view(2, 8, 3, 4, 4)
    assert torch.equal(views[:, 0], x)
    assert len({tuple(v.flatten().tolist()) for v in views[0]}) == 8
    # the set of views is closed under the group: views of a rotated image are the same eight images
    rotated = dihedral_batch(torch.rot90(x, 1, dims=(2, 3))).view(2, 8, 3, 4, 4)
    assert {tuple(v.flatten().tolist()) for v in rotated[0]} == {tuple(v.flatten().tolist()) for v in views[0]}


def test_guard_matches_scikit_learn_and_round_trips(tmp_path):
    """The guard's score is scikit-learn's logistic regression on [features, log Mahalanobis distance of the
    penultimate part to the nearest class mean] (distance computed here with numpy), standardised; saved and
    loaded it scores alike."""
    rng = np.random.default_rng(3)
    means = rng.normal(0, 5, (3, 6))
    labels = np.repeat(np.arange(3), 400)
    # 6 penultimate features, then 2 stage means that the distance leaves out
    features = np.hstack([means[labels] + rng.normal(0, 1, (1200, 6)), rng.normal(0, 1, (1200, 2))])
    shifted = features + rng.normal(0, 0.5, features.shape)
    others = rng.normal(0, 1, (60, 8)) * 3 + 12
    guard = DermoscopyGuard.fit(features, labels, np.vstack([features, shifted]), others, penultimate=6)
    assert guard.width == 8

    penultimate = features[:, :6]
    centred = penultimate - means_of(penultimate, labels)[labels]
    precision = LedoitWolf(assume_centered=True).fit(centred).get_precision()
    fitted_means = means_of(penultimate, labels)

    def inputs(f):
        distance = np.array([min((x[:6] - m) @ precision @ (x[:6] - m) for m in fitted_means) for x in f])
        return np.hstack([f, np.log(distance)[:, None]])

    x = inputs(np.vstack([features, shifted, others]))
    y = np.r_[np.zeros(2400), np.ones(60)]
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=GUARD_REGULARISATION, class_weight="balanced",
                                                                   max_iter=5000)).fit(x, y)
    probe = np.vstack([np.hstack([means + rng.normal(0, 1, (3, 6)), rng.normal(0, 1, (3, 2))]),
                       rng.normal(0, 1, (3, 8)) * 3 + 12])
    # float32 storage of the class Gaussians: agreement to a few parts in 1e4
    assert guard.score(probe) == pytest.approx(reference.decision_function(inputs(probe)), rel=1e-3, abs=1e-3)
    assert guard.score(probe[:3]).max() < 0 < guard.score(probe[3:]).min()  # dermoscopy-like vs not
    guard.threshold = 1.5
    guard.save(tmp_path)
    loaded = DermoscopyGuard.load(tmp_path / "ood.safetensors", 1.5)
    assert loaded.score(probe) == pytest.approx(guard.score(probe), rel=1e-12) and loaded.threshold == 1.5


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18", "convnextv2_atto"])
def test_forward_views_gives_the_guard_the_last_stages_means(backbone):
    """The guard's features from the one forward pass are the penultimate features and the means of the last
    two feature stages, as forward hooks read them from the plain forward pass; the logits are the network's."""
    torch.manual_seed(0)
    model = timm.create_model(backbone, num_classes=7).eval()
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        _, logits, guard = forward_views(model, pixels, views=8)
        torch.testing.assert_close(logits[:, 0], model(pixels))
    assert guard.shape == (3, guard_width(model))
    np.testing.assert_allclose(guard.numpy(), guard_features_by_hooks(model, pixels), rtol=1e-5, atol=1e-5)


def test_guard_weighing_clinics_equally_flags_less_of_a_small_clinic():
    """A small clinic whose images lie towards the non-dermoscopic ones along one axis: fitted with each clinic
    weighed equally, the head leans on the axis that separates both clinics from the negatives, so fewer of that
    clinic's new images are flagged, and the negatives still are."""
    rng = np.random.default_rng(0)

    def draw(n, centre):
        return rng.normal(0, 1, (n, 4)) + np.array(centre, dtype=float)

    large, small, negatives = draw(900, [0, 0, 0, 0]), draw(100, [3, 0, 0, 0]), draw(100, [3, 4, 0, 0])
    features, labels = np.vstack([large, small]), np.arange(1000) % 2
    clinics = np.r_[np.zeros(900), np.ones(100)]
    new_large, new_small, new_negatives = draw(900, [0, 0, 0, 0]), draw(2000, [3, 0, 0, 0]), draw(500, [3, 4, 0, 0])
    flagged = {}
    for name, groups in (("pooled", None), ("clinics", clinics)):
        guard = DermoscopyGuard.fit(features, labels, features, negatives, penultimate=4, groups=groups)
        threshold = np.quantile(np.r_[guard.score(new_large), guard.score(new_small[:100])], 0.96)
        flagged[name] = [np.mean(guard.score(x) > threshold) for x in (new_small, new_negatives)]
    assert flagged["clinics"][0] < flagged["pooled"][0] - 0.05
    assert min(flagged["clinics"][1], flagged["pooled"][1]) > 0.95


def test_guard_reports_how_it_flags_a_clinic_it_was_fitted_without():
    """Two alike clinics and one far from them: fitted without the far clinic, the guard flags most of its
    images; fitted without either of the alike ones, few of its images."""
    rng = np.random.default_rng(1)
    centres = {"near_a": [0, 0, 0, 0], "near_b": [0.3, 0, 0, 0], "far": [0, 0, 8, 0]}

    def split(per_clinic):
        clinic = np.repeat(list(centres), per_clinic)
        return rng.normal(0, 1, (len(clinic), 4)) + np.array([centres[c] for c in clinic]), clinic

    train, train_clinic = split(400)
    validation, validation_clinic = split(100)
    outputs = {"train": {"features": train, "labels": np.arange(len(train)) % 3, "penultimate": np.array(3)},
               "train_shifted": {"features": train + rng.normal(0, 0.3, train.shape)},
               "validation": {"features": validation},
               "validation_shifted": {"features": validation + rng.normal(0, 0.3, validation.shape)},
               "photos": {"features": rng.normal(0, 1, (len(PHOTO_SAMPLES), 4)) + [5, 5, 0, 5]},
               "photo_framings": {"features": rng.normal(0, 1, (2 * len(PHOTO_SAMPLES), 4)) + [5, 5, 0, 5],
                                  "labels": np.arange(2 * len(PHOTO_SAMPLES)) // 2,
                                  "views": np.arange(2 * len(PHOTO_SAMPLES)) % 2}}
    # one picture (and its framings) looks like the dermoscopy: held out, it is the one that passes
    outputs["photos"]["features"][3] = validation[0]
    outputs["photo_framings"]["features"][6:8] = validation[1:3]
    _, report = fit_guard(outputs, {"train": train_clinic, "validation": validation_clinic})
    assert report["cross_validated"]["photos_passed"] == [PHOTO_SAMPLES[3]]
    unseen = report["unseen_clinics"]
    assert set(unseen) == set(centres) and unseen["far"]["validation_images"] == 100
    assert unseen["far"]["flagged"] > 0.5 and unseen["far"]["shifted_flagged"] > 0.5
    assert max(unseen["near_a"]["flagged"], unseen["near_b"]["flagged"]) < 0.2
    assert fit_guard(outputs)[1]["unseen_clinics"] == {}  # data without clinics: nothing to report


def test_clinics_without_a_name_or_with_few_images_form_one_group():
    import datasets

    from dermadetect.study import GUARD_MIN_CLINIC, clinics_of

    train = ["a"] * GUARD_MIN_CLINIC + ["b"] * GUARD_MIN_CLINIC + ["tiny"] * 3 + [None] * 2
    tables = {"train": datasets.Dataset.from_dict({"dataset": train}),
              "validation": datasets.Dataset.from_dict({"dataset": ["a", "tiny", None, "b"]})}
    clinics = clinics_of(tables)
    assert sorted(set(clinics["train"])) == ["a", "b", "other"] and list(clinics["validation"]) == ["a", "other",
                                                                                                   "other", "b"]
    assert clinics_of({split: datasets.Dataset.from_dict({"dx": ["nv"]}) for split in tables}) is None


def means_of(features, labels):
    return np.stack([features[labels == k].mean(axis=0) for k in np.unique(labels)])


def test_energy_is_negative_logsumexp():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    assert energy_score(logits) == pytest.approx([-math.log(math.e + math.e**2 + math.e**3), -math.log(3)])
