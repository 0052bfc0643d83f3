"""The dermoscopy-vs-not guard of a run under the choices it was made with, scored on validation and the guard's
photos only, from the run's evaluation outputs (RUN/BACKBONE/outputs_*.npz, written by `python -m dermadetect
evaluate`): its inputs (the served penultimate features and last stages' means, or the penultimate features
alone), the share of validation its threshold passes (GUARD_KEEP and its neighbours) and the training clinics
weighed equally (served) or pooled. Per variant, one JSON line with the cross-validated flag rates of the
non-dermoscopic pictures, the photos of skin and the validation images, and, per HAM10000 clinic, the share of its
validation images flagged by a guard fitted and thresholded without that clinic (dermoscopy from an unseen
clinic, as uploads from other clinics are). `--out FILE` also writes the lines as JSON.

    python benchmarks/bench_guard.py runs/lite0-shift efficientnet_lite0 \\
        --out runs/lite0-shift/efficientnet_lite0/guard_validation.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dermadetect.pipeline import load_run_data, read_outputs, read_run  # noqa: E402
from dermadetect.study import GUARD_KEEP, GUARD_KEEPS_TRIED, clinics_of, fit_guard  # noqa: E402

SERVED, PENULTIMATE = "penultimate features and last stages' means", "penultimate features only"
# (inputs, share of validation passed, clinics weighed equally): the served guard, then the choices it beat
VARIANTS = ((SERVED, GUARD_KEEP, True), (SERVED, GUARD_KEEP, False),
            *((inputs, keep, True) for inputs in (SERVED, PENULTIMATE) for keep in GUARD_KEEPS_TRIED
              if (inputs, keep) != (SERVED, GUARD_KEEP)))


def penultimate_only(outputs: dict[str, dict]) -> dict[str, dict]:
    """The outputs with each split's features cut to the penultimate part (the guard before the stages' means)."""
    return {split: {**arrays, "features": arrays["features"][:, :int(arrays["penultimate"])]}
            for split, arrays in outputs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder with evaluation outputs")
    parser.add_argument("backbone", help="the backbone whose outputs are used")
    parser.add_argument("--out", type=Path, help="also write the lines to this JSON file")
    args = parser.parse_args(argv)
    cfg, _ = read_run(args.run_dir)
    data = load_run_data(args.run_dir, cfg)
    outputs = read_outputs(args.run_dir, args.backbone, cfg, data)
    clinics = clinics_of(data.splits)
    if clinics is None:
        raise SystemExit("the run's data does not name the clinic of each image (no `dataset` column)")
    rows = []
    for inputs, keep, weigh in VARIANTS:
        guard, report = fit_guard(outputs if inputs == SERVED else penultimate_only(outputs), clinics,
                                  weigh_clinics=weigh, keep=keep)
        held = report["cross_validated"]
        rows.append({"inputs": inputs, "features": guard.width, "validation_passed": keep,
                     "clinics": "weighed equally" if weigh else "pooled", "threshold": guard.threshold,
                     "served": (inputs, keep, weigh) == (SERVED, GUARD_KEEP, True),
                     "photos": len(outputs["photos"]["labels"]),
                     "photos_flagged": held["photos_flagged"], "photos_passed": held["photos_passed"],
                     "skin_photos_flagged": held.get("skin_photos_flagged"),
                     "validation_flagged": held["validation_flagged"],
                     "auroc_validation_vs_skin_photos": held.get("auroc_validation_vs_skin_photos"),
                     "unseen_clinics": report["unseen_clinics"]})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
