"""Whether the mean of several trained models beats the best of them, decided on validation only.

Each model's validation outputs (RUN/BACKBONE/outputs_*.npz, written by `python -m dermadetect evaluate`) give
its calibrated probabilities (its own temperature, fitted on clean validation with the same views); the ensemble
is their mean. Every model and the mean are scored by the served class-balanced call, its strength chosen by
cross-validation over lesion-grouped folds, so that no number is fitted on the images it scores. For the clean
validation images with all TTA views and with one view, and for their shifted copies (one view), prints one JSON
line: each one's balanced accuracy and the 95% lesion-bootstrap interval of mean minus the best single model.
`--out FILE` also writes the lines as JSON.

    python benchmarks/bench_ensemble.py runs/lite0-shift/efficientnet_lite0 runs/lite0-shift-s43/efficientnet_lite0 \\
        --out runs/lite0-shift-s43/ensemble_validation.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupKFold

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dermadetect.metrics import balanced_accuracy, lesion_resamples  # noqa: E402
from dermadetect.posthoc import (TTA_VIEWS, adjusted_decisions, class_prior, fit_adjustment_strength,  # noqa: E402
                                 fit_temperature, softmax)

CONDITIONS = (("validation", TTA_VIEWS), ("validation", 1), ("validation_shifted", 1))
FOLDS = 5


def load(folder: Path) -> tuple[dict, list[str], list[str]]:
    """A model's evaluation outputs and the validation image and lesion ids in their order."""
    missing = [split for split in ("train", "validation", "validation_shifted")
               if not (folder / f"outputs_{split}.npz").is_file()]
    if missing or not (folder / "predictions_validation.csv").is_file():
        raise SystemExit(f"{folder} has no evaluation outputs ({', '.join(missing) or 'predictions'}): run "
                         "`python -m dermadetect evaluate RUN` first")
    outputs = {split: dict(np.load(folder / f"outputs_{split}.npz"))
               for split in ("train", "validation", "validation_shifted")}
    with open(folder / "predictions_validation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return outputs, [r["image_id"] for r in rows], [r["lesion_id"] for r in rows]


def served_cross_validated(probs: np.ndarray, labels: np.ndarray, lesions, prior: np.ndarray) -> np.ndarray:
    """The class-balanced call of each image, its strength fitted on the other folds' lesions."""
    calls = np.zeros(len(labels), dtype=int)
    for fit, held in GroupKFold(FOLDS).split(probs, labels, lesions):
        strength, _ = fit_adjustment_strength(probs[fit], labels[fit], prior)
        calls[held] = adjusted_decisions(probs[held], prior, strength)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="evaluated RUN/BACKBONE folders on one lesion split")
    parser.add_argument("--resamples", type=int, default=1000, help="lesion-bootstrap resamples")
    parser.add_argument("--out", type=Path, help="also write the lines as JSON here")
    args = parser.parse_args()
    if len(args.models) < 2:
        raise SystemExit("give two or more model folders")
    loaded = [load(folder) for folder in args.models]
    outputs, images, lesions = loaded[0]
    for folder, (_, other_images, _) in zip(args.models[1:], loaded[1:]):
        if other_images != images:
            raise SystemExit(f"{folder} was validated on other images than {args.models[0]}: compare models "
                             "trained on one lesion split (train.py --split-seed)")
    labels = outputs["validation"]["labels"]
    prior = class_prior(outputs["train"]["labels"], outputs["validation"]["logits"].shape[-1])
    names = [str(folder) for folder in args.models]
    lines = []
    for split, views in CONDITIONS:
        probs = []
        for model, _, _ in loaded:
            temperature = fit_temperature(model["validation"]["logits"][:, :views].mean(axis=1), labels)
            probs.append(softmax(model[split]["logits"][:, :views].mean(axis=1), temperature))
        calls = {name: served_cross_validated(p, labels, lesions, prior) for name, p in zip(names, probs)}
        calls["mean"] = served_cross_validated(np.mean(probs, axis=0), labels, lesions, prior)
        scores = {name: balanced_accuracy(labels, c) for name, c in calls.items()}
        best = max(names, key=scores.get)
        differences = [balanced_accuracy(labels[idx], calls["mean"][idx]) -
                       balanced_accuracy(labels[idx], calls[best][idx])
                       for idx in lesion_resamples(lesions, args.resamples)]
        line = {"split": split, "views": views, "images": int(len(labels)), "balanced_accuracy": scores,
                "best_single": best, "mean_minus_best": scores["mean"] - scores[best],
                "mean_minus_best_95": [float(np.percentile(differences, q)) for q in (2.5, 97.5)]}
        print(json.dumps(line))
        lines.append(line)
    if args.out:
        args.out.write_text(json.dumps(lines, indent=1))


if __name__ == "__main__":
    main()
