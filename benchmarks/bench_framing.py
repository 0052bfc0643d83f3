"""Which evaluation crop (timm's crop_pct: the share of the resized image kept) serves a trained model best,
decided on validation only, without retraining.

For each crop_pct, the run's best checkpoint scores its validation images through the evaluation pass (all TTA
views and one view) and their shifted copies (one view, `pipeline.ShiftedCopies`), each calibrated by its own
temperature and called by the served class-balanced rule, its strength chosen by cross-validation over
lesion-grouped folds (`bench_ensemble.served_cross_validated`), so that no number is fitted on the images it
scores. Prints one JSON line per condition: each crop's balanced accuracy and melanoma AUC, and the 95%
lesion-bootstrap interval of each crop minus the first. `--out FILE` also writes the lines as JSON. The chosen
crop goes into the recipe as `data.eval_crop_pct`.

    python benchmarks/bench_framing.py runs/lite0-shift efficientnet_lite0 --crop-pcts 0.875 1.0 \\
        --out runs/lite0-shift/efficientnet_lite0/framing_validation.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_ensemble import served_cross_validated  # noqa: E402
from dermadetect.data import LabelledImages, build_transforms, collate  # noqa: E402
from dermadetect.engine import collect_outputs, make_accelerator  # noqa: E402
from dermadetect.labels import melanoma_index  # noqa: E402
from dermadetect.metrics import balanced_accuracy, lesion_resamples  # noqa: E402
from dermadetect.pipeline import ShiftedCopies, load_run_data, read_run, trained_model  # noqa: E402
from dermadetect.posthoc import TTA_VIEWS, class_prior, fit_temperature, softmax  # noqa: E402

CONDITIONS = (("validation", TTA_VIEWS), ("validation", 1), ("validation_shifted", 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder with the backbone's best checkpoint")
    parser.add_argument("backbone")
    parser.add_argument("--crop-pcts", type=float, nargs="+", required=True,
                        help="crops to compare, each above 0 and at most 1; the first is the reference")
    parser.add_argument("--resamples", type=int, default=1000, help="lesion-bootstrap resamples")
    parser.add_argument("--out", type=Path, help="also write the lines as JSON here")
    args = parser.parse_args()
    if len(set(args.crop_pcts)) < len(args.crop_pcts):
        raise SystemExit("--crop-pcts: give each crop once")
    cfg, _ = read_run(args.run)
    try:
        framings = {crop: dataclasses.replace(cfg.data, eval_crop_pct=crop) for crop in args.crop_pcts}
    except ValueError as exc:
        raise SystemExit(f"--crop-pcts: {exc}") from None
    data = load_run_data(args.run, cfg)
    network = trained_model(args.backbone, cfg, len(data.label_names), args.run)
    accelerator = make_accelerator(cfg.train)
    model = accelerator.prepare(network)
    table = data.splits["validation"]
    labels, lesions = data.labels("validation"), np.array(table["lesion_id"])
    prior = class_prior(data.labels("train"), len(data.label_names))
    mel = melanoma_index(data.label_names)
    outputs = {}
    for crop in args.crop_pcts:
        _, eval_tf, _ = build_transforms(network, framings[crop])
        for split, images in (("validation", LabelledImages(table, data.label_names, eval_tf)),
                              ("validation_shifted", ShiftedCopies(table, data.label_names, eval_tf))):
            loader = accelerator.prepare(DataLoader(images, batch_size=cfg.train.batch_size, collate_fn=collate))
            outputs[crop, split] = collect_outputs(model, loader, accelerator, TTA_VIEWS if split == "validation"
                                                   else 1, desc=f"crop {crop} {split}")["logits"]
    reference, resamples = args.crop_pcts[0], list(lesion_resamples(lesions, args.resamples))
    lines = []
    for split, views in CONDITIONS:
        calls, auc = {}, {}
        for crop in args.crop_pcts:
            # the temperature of each crop is fitted on its clean validation logits, as the analysis does
            clean = outputs[crop, "validation"][:, :views].mean(axis=1)
            probs = softmax(outputs[crop, split][:, :views].mean(axis=1), fit_temperature(clean, labels))
            calls[crop] = served_cross_validated(probs, labels, lesions, prior)
            auc[crop] = float(roc_auc_score(labels == mel, probs[:, mel])) if mel is not None else None
        minus_reference = {crop: [float(np.percentile([balanced_accuracy(labels[i], calls[crop][i]) -
                                                       balanced_accuracy(labels[i], calls[reference][i])
                                                       for i in resamples], q)) for q in (2.5, 97.5)]
                           for crop in args.crop_pcts[1:]}
        line = {"split": split, "views": views, "images": int(len(labels)), "reference": reference,
                "balanced_accuracy": {str(c): balanced_accuracy(labels, calls[c]) for c in args.crop_pcts},
                "melanoma_auc": {str(c): auc[c] for c in args.crop_pcts},
                "minus_reference_95": {str(c): v for c, v in minus_reference.items()}}
        print(json.dumps(line), flush=True)
        lines.append(line)
    if args.out:
        args.out.write_text(json.dumps(lines, indent=1))


if __name__ == "__main__":
    main()
