"""How a served model holds up on the images people upload: one split scored clean and under each fixed
degradation of `dermadetect.shift.DEGRADATIONS` (lower resolution, JPEG, a 4:3 stretch, a colour cast, blur,
rotation), everything the served model applies included (TTA views, temperature, the class-balanced call, the
melanoma threshold, the out-of-distribution guard).

Prints one JSON line per condition (balanced accuracy of the call, melanoma sensitivity at the served threshold,
ECE of the calibrated probabilities, the share the guard flags) and a Markdown table; `--out FILE` also writes
them as JSON. Choose recipes on `--split validation` (the run's validation images, from its splits.csv); score
the ISIC 2018 test set (`--split test`) once per shipped model, into RUN/BACKBONE/robustness_test.json: the
model card's Limitations section shows that table.

    python benchmarks/bench_robustness.py RUN/BACKBONE/export --data ../shared/data/ham10000-224 --split test \\
        --out RUN/BACKBONE/robustness_test.json
    python benchmarks/bench_robustness.py RUN/BACKBONE/export --data ../shared/data/ham10000-224 \\
        --split validation --splits RUN/splits.csv --out RUN/BACKBONE/robustness_validation.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dermadetect.data import yield_to_compute  # noqa: E402
from dermadetect.hub import load_model, robustness_markdown  # noqa: E402
from dermadetect.labels import melanoma_index  # noqa: E402
from dermadetect.metrics import balanced_accuracy, reliability_bins  # noqa: E402
from dermadetect.posthoc import forward_views, served_call  # noqa: E402
from dermadetect.shift import DEGRADATIONS  # noqa: E402
from PIL import Image  # noqa: E402


class Degraded(Dataset):
    def __init__(self, paths, degrade, transform):
        self.paths, self.degrade, self.transform = paths, degrade, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as image:
            image = image.convert("RGB")
        return self.transform(self.degrade(image) if self.degrade else image)


def split_images(data: Path, split: str, splits_csv: Path | None, label_names) -> tuple[list[Path], np.ndarray]:
    """The image files and label indices of the ISIC 2018 test set, or of a run's validation split."""
    if split == "test":
        folder, keep = data / "test", None
    else:
        if splits_csv is None:
            raise SystemExit("--split validation needs --splits RUN/splits.csv (the run's lesion split)")
        with open(splits_csv, newline="") as f:
            keep = {row["image_id"] for row in csv.DictReader(f) if row["split"] == "validation"}
        folder = data / "train"
    with open(folder / "metadata.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if keep is None or r["image_id"] in keep]
    if keep is not None and len(rows) != len(keep):
        raise SystemExit(f"{len(keep) - len(rows)} validation images of {splits_csv} are not in {folder}")
    return [folder / r["file_name"] for r in rows], np.array([label_names.index(r["dx"]) for r in rows])


def served_outputs(loaded, paths, degrade, batch_size: int, workers: int) -> dict[str, np.ndarray]:
    """The served model's probabilities, calls and guard scores on the (degraded) images, in batches."""
    transform = create_transform(**loaded.data_config, is_training=False)
    loader = DataLoader(Degraded(paths, degrade, transform), batch_size=batch_size, num_workers=workers,
                        worker_init_fn=yield_to_compute)
    logits, features = [], []
    with torch.inference_mode():
        for pixels in loader:
            _, z, f = forward_views(loaded.model, pixels, loaded.settings.tta_views)
            logits.append(z.numpy())
            features.append(f.numpy())
    probs, calls = served_call(loaded.settings, np.concatenate(logits))
    ood = loaded.ood.score(np.concatenate(features)) if loaded.ood is not None else None
    return {"probs": probs, "calls": calls, "ood_scores": ood}


def score(loaded, paths, labels, degrade, batch_size: int, workers: int) -> dict:
    out = served_outputs(loaded, paths, degrade, batch_size, workers)
    probs, settings, mel = out["probs"], loaded.settings, melanoma_index(loaded.label_names)
    result = {"images": len(labels), "balanced_accuracy": balanced_accuracy(labels, out["calls"]),
              "ece": reliability_bins(probs, labels)["ece"]}
    if mel is not None and settings.melanoma_threshold is not None:
        result["melanoma_sensitivity"] = float((probs[labels == mel, mel] >= settings.melanoma_threshold).mean())
        result["melanoma_specificity"] = float((probs[labels != mel, mel] < settings.melanoma_threshold).mean())
    if out["ood_scores"] is not None:
        result["ood_flagged"] = float((out["ood_scores"] > loaded.ood.threshold).mean())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model folder or hf-hub:ORG/NAME[@REVISION]")
    parser.add_argument("--data", required=True, help="ham10000-224 (train/ and test/ with metadata.csv)")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--splits", type=Path, help="the run's splits.csv (for --split validation)")
    parser.add_argument("--conditions", nargs="+", default=["clean", *DEGRADATIONS],
                        choices=["clean", *DEGRADATIONS])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    paths, labels = split_images(Path(args.data), args.split, args.splits, list(loaded.label_names))
    rows = []
    for condition in args.conditions:
        result = score(loaded, paths, labels, DEGRADATIONS.get(condition), args.batch_size, args.workers)
        rows.append({"condition": condition, "split": args.split, **result})
        print(json.dumps(rows[-1]), flush=True)
    print(robustness_markdown(rows))
    if args.out:
        args.out.write_text(json.dumps({"model": loaded.source, "split": args.split, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
