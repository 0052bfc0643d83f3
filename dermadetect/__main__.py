"""Command line.

    python -m dermadetect predict IMAGE... --model SRC [--cam-method M] [--class LABEL] [--out DIR]
        one JSON line per image: the probabilities and top class, or the readable error
    python -m dermadetect publish runs/NAME [--bundle BACKBONE]
        commit a finished run: results/NAME/ and its README results block; with --bundle, also
        models/dermadetect-BACKBONE/ and model_card.md
    python -m dermadetect sweep-table results/NAME [--reference RUN]
        README's table (block NAME) of a committed sweep: one folder per run, config.json + trainer_state.json
    python -m dermadetect compact-copy DATA_DIR TARGET [--quality Q]
        the dataset with its images re-encoded as WebP, to ship it to a training machine with a size limit
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .data import write_compact_copy
from .explain import CAM_METHODS
from .inference import InvalidImageError, Predictor
from .labels import DISCLAIMER
from .posthoc import OOD_FILE
from .report import results_markdown, sweep_markdown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dermadetect", epilog=DISCLAIMER)
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="classify images and write Grad-CAM overlays")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--model", required=True, help="model folder or hf-hub:ORG/NAME[@REVISION]")
    predict.add_argument("--cam-method", choices=sorted(CAM_METHODS), help="default: the model's own")
    predict.add_argument("--class", dest="explain", help="label to explain (default: the top class)")
    predict.add_argument("--out", help="folder for the overlays (<image stem>_cam.png)")
    publish = commands.add_parser("publish", help="commit a run: results/, the bundled model, model_card.md, README")
    publish.add_argument("run_dir", help="a finished run folder (runs/NAME)")
    publish.add_argument("--bundle", help="the backbone to bundle as the offline demo model (default: keep the "
                                            "bundled model)")
    publish.add_argument("--repo", default=".", help="repository root (default: .)")
    sweep = commands.add_parser("sweep-table", help="README's table of a committed settings sweep")
    sweep.add_argument("folder", help="results/NAME: one folder per run with config.json and trainer_state.json")
    sweep.add_argument("--reference", default="base", help="the run the others are compared with (default: base)")
    sweep.add_argument("--repo", default=".", help="repository root (default: .)")
    compact = commands.add_parser("compact-copy", help="copy an imagefolder dataset with images re-encoded as WebP")
    compact.add_argument("data_dir", help="imagefolder folder with metadata.csv (at the top or per split)")
    compact.add_argument("target", help="new folder")
    compact.add_argument("--quality", type=int, default=85, help="WebP quality 0-100 (default: 85)")
    args = parser.parse_args(argv)
    if args.command == "compact-copy":
        images, size = write_compact_copy(Path(args.data_dir), Path(args.target), args.quality)
        print(f"{images} images, {size / 2**20:.1f} MiB in {args.target}")
        return 0
    if args.command == "sweep-table":
        write_readme_block(Path(args.repo), Path(args.folder).name, sweep_markdown(Path(args.folder), args.reference))
        return 0
    if args.command == "publish":
        publish_run(Path(args.run_dir), args.bundle, Path(args.repo))
        return 0

    predictor = Predictor(args.model)
    if args.explain and args.explain not in predictor.label_names:
        parser.error(f"--class {args.explain!r} is not one of {list(predictor.label_names)}")
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in args.images:
        try:
            result = predictor.predict(path, explain=args.explain, method=args.cam_method)
        except InvalidImageError as exc:
            failures += 1
            print(json.dumps({"image": path, "error": str(exc), "error_type": type(exc).__name__}), flush=True)
            continue
        record = {"image": path, "top_class": result.top_label, "explained_class": result.explained_label,
                  "probabilities": result.probabilities, "cam_method": args.cam_method or predictor.default_method,
                  "melanoma_flag": result.melanoma_flag, "ood_score": result.ood_score,
                  "out_of_distribution": result.out_of_distribution}
        if out:
            overlay = out / f"{Path(path).stem}_cam.png"
            result.overlay.save(overlay)
            record["overlay"] = str(overlay)
        print(json.dumps(record), flush=True)
    return 1 if failures else 0


RESULT_FILES = ("metrics.json", "explain_faithfulness.json", "analysis.json", "confusion_matrix.png", "roc_curves.png",
                "training_curves.png", "gradcam_gallery.png", "reliability_diagram.png",
                # per image (ids, labels, calibrated probabilities, decision): every analysed number can be redone
                "predictions_calibrated_validation.csv", "predictions_calibrated_test.csv")
BUNDLE_FILES = ("config.json", "model.safetensors", "README.md", "examples.json", OOD_FILE)


def results_markers(run_name: str) -> tuple[str, str]:
    """The comments around a run's generated results block in README.md."""
    return f"<!-- results:{run_name}:start -->", f"<!-- results:{run_name}:end -->"


def readme_block_span(readme: str, name: str) -> tuple[int, int]:
    """Where `name`'s generated block lies in README.md's text, between its markers."""
    start, end = results_markers(name)
    if start not in readme or end not in readme:
        raise SystemExit(f"README.md has no place for {name}'s results: add the lines {start} and {end} where "
                         "the table belongs")
    return readme.index(start) + len(start), readme.index(end)


def write_readme_block(repo: Path, name: str, text: str) -> None:
    """Replace what README.md holds between `name`'s results markers."""
    readme = (repo / "README.md").read_text()
    start, end = readme_block_span(readme, name)
    (repo / "README.md").write_text(readme[:start] + "\n" + text + "\n" + readme[end:])


def publish_run(run_dir: Path, bundle: str | None, repo: Path) -> None:
    """Copy a run's results (no images of the data) into results/<run>/ and its results table into README.md
    (between the run's markers); with `bundle`, also that backbone's export into models/dermadetect-<bundle>/
    and its card into model_card.md. Everything copied was written by train.py."""
    readme_block_span((repo / "README.md").read_text(), run_dir.name)  # fail before anything is copied
    results = repo / "results" / run_dir.name
    results.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "comparison.json", "comparison.md", "splits.csv", "comparison.png"):
        if name != "comparison.png" or (run_dir / name).is_file():
            shutil.copy2(run_dir / name, results / name)
    comparison = json.loads((run_dir / "comparison.json").read_text())
    for row in comparison["rows"]:
        (results / row["backbone"]).mkdir(exist_ok=True)
        for name in RESULT_FILES:
            if (run_dir / row["backbone"] / name).is_file():
                shutil.copy2(run_dir / row["backbone"] / name, results / row["backbone"] / name)
    write_readme_block(repo, run_dir.name, results_markdown(comparison, f"results/{run_dir.name}/comparison.json"))
    if bundle is None:
        return
    models = repo / "models" / f"dermadetect-{bundle}"
    models.mkdir(parents=True, exist_ok=True)
    for name in BUNDLE_FILES:  # examples/ stays behind: the app finds those images in DERMADETECT_DATA
        if name != OOD_FILE or (run_dir / bundle / "export" / name).is_file():
            shutil.copy2(run_dir / bundle / "export" / name, models / name)
    shutil.copy2(models / "README.md", repo / "model_card.md")

if __name__ == "__main__":
    sys.exit(main())
