"""Command line: the stages after fitting, prediction, and the repository's results.

    python -m dermadetect evaluate RUN      one pass of every split through each best checkpoint (any device,
                                            any process count: accelerate launch -m dermadetect evaluate RUN)
    python -m dermadetect analyze RUN       post-hoc settings and statistics from that pass (validation only)
    python -m dermadetect export RUN [--push-to-hub ORG/PREFIX [--force]]   the served model folders, their upload
    python -m dermadetect publish RUN [--bundle BACKBONE] [--force]   results/, its generated table, bundled model
    python -m dermadetect predict IMAGE... --model SRC   one JSON line per image
    python -m dermadetect space ORG/NAME [--model hf-hub:ORG/NAME]   deploy the demo to a Gradio Space
    python -m dermadetect sweep-table results/NAME       the generated table (README.md or docs/) of a committed settings sweep
    python -m dermadetect compact-copy DATA_DIR TARGET   the dataset re-encoded as WebP, for a size-limited transfer
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from .data import BadDataError, write_compact_copy
from .engine import make_accelerator
from .explain import CAM_METHODS
from .hub import HubPushError, ModelSourceError, deploy_space, model_card, served_balanced_accuracy
from .inference import InvalidImageError, Predictor
from .labels import DISCLAIMER
from .pipeline import RunFolderError, evaluate_backbone, finish_run, load_run_data, read_run
from .posthoc import OOD_FILE
from .report import PICTURES_FILE, ROBUSTNESS_FILE, read_backbone_row, results_markdown, sweep_markdown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dermadetect", epilog=DISCLAIMER,
                                     description="The stages after `train.py` fits, and the tools around them.")
    commands = parser.add_subparsers(dest="command", required=True)
    for stage, text in (("evaluate", "one evaluation pass of each backbone's best checkpoint: outputs, metrics, plots"),
                        ("analyze", "fit the post-hoc settings on validation and score test with CIs, from the pass"),
                        ("export", "assemble each backbone's served model folder (ROAD, gallery, card)")):
        stage_parser = commands.add_parser(stage, help=text)
        stage_parser.add_argument("run_dir", help="a run folder written by train.py")
        if stage == "export":
            stage_parser.add_argument("--push-to-hub", metavar="ORG/PREFIX",
                                      help="then push each export to ORG/PREFIX-<backbone> (token: HF_TOKEN)")
            stage_parser.add_argument("--private", action="store_true", help="create the Hub repos as private")
            stage_parser.add_argument("--force", action="store_true",
                                      help="push even over a published model that serves a higher test balanced "
                                           "accuracy")
    predict = commands.add_parser("predict", help="classify images and write Grad-CAM overlays")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--model", required=True, help="model folder or hf-hub:ORG/NAME[@REVISION]")
    predict.add_argument("--cam-method", choices=sorted(CAM_METHODS), help="default: the model's own")
    predict.add_argument("--class", dest="explain", help="label to explain (default: the top class)")
    predict.add_argument("--out", help="folder for the overlays (<image stem>_cam.png; <stem>_1_cam.png for a "
                                       "second image of that name)")
    publish = commands.add_parser("publish", help="commit a run: results/, the bundled model, model_card.md, README")
    publish.add_argument("run_dir", help="a finished run folder (runs/NAME)")
    publish.add_argument("--bundle", help="the backbone to bundle as the offline demo model (default: keep the "
                                            "bundled model)")
    publish.add_argument("--repo", default=".", help="repository root (default: .)")
    publish.add_argument("--force", action="store_true",
                         help="bundle the model even if it scores below the bundled one")
    space = commands.add_parser("space", help="deploy the demo (app, package, bundled model, its examples) to a "
                                               "Gradio Space; token: HF_TOKEN")
    space.add_argument("space_id", metavar="ORG/NAME", help="the Space; created if it does not exist")
    space.add_argument("--model", help="hf-hub:ORG/NAME[@REV], checked on the Hub and set as the Space variable "
                                       "DERMADETECT_MODEL (default: the variable stays as it is; a Space without "
                                       "it serves app.py's default model)")
    space.add_argument("--private", action="store_true", help="create the Space as private")
    space.add_argument("--repo", default=".", help="repository root (default: .)")
    sweep = commands.add_parser("sweep-table", help="the generated table (README.md or docs/) of a committed settings sweep")
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
    if args.command == "space":
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
        try:
            url = deploy_space(args.space_id, Path(args.repo), args.model, args.private)
        except HubPushError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"deployed: {url}")
        return 0
    if args.command == "publish":
        publish_run(Path(args.run_dir), args.bundle, Path(args.repo), args.force)
        return 0
    if args.command in ("evaluate", "analyze", "export"):
        return run_stage(args.command, Path(args.run_dir), getattr(args, "push_to_hub", None),
                         getattr(args, "private", False), getattr(args, "force", False))

    try:
        predictor = Predictor(args.model)
    except ModelSourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.explain and args.explain not in predictor.label_names:
        parser.error(f"--class {args.explain!r} is not one of {list(predictor.label_names)}")
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    failures, overlays = 0, set()
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
            # a/x.jpg and b/x.jpg must not share one overlay file
            stem = next(name for n in range(len(overlays) + 1)
                        if (name := Path(path).stem + (f"_{n}" if n else "")) not in overlays)
            overlays.add(stem)
            overlay = out / f"{stem}_cam.png"
            result.overlay.save(overlay)
            record["overlay"] = str(overlay)
        print(json.dumps(record), flush=True)
    return 1 if failures else 0


def launcher_rank() -> int:
    """This process's rank as a launcher sets it (the variables Accelerate reads), 0 when launched alone."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def run_stage(stage: str, run_dir: Path, push_prefix: str | None = None, private: bool = False,
              force: bool = False) -> int:
    """One stage over every backbone of a run. Evaluate runs in every process (under accelerate launch);
    analyze and export run in the main process alone (the others return at once)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, _ = read_run(run_dir)
        data = load_run_data(run_dir, cfg)
        if stage != "evaluate":
            if launcher_rank():  # under accelerate launch, torchrun or mpirun: one process does it
                return 0
            return finish_run(cfg, data, run_dir, analyze=stage == "analyze", export=stage == "export",
                              push_prefix=push_prefix, private=private, force=force)
        accelerator = make_accelerator(cfg.train)
        for name in cfg.backbones:
            evaluate_backbone(name, cfg, data, accelerator, run_dir)
    except (RunFolderError, BadDataError) as exc:
        raise SystemExit(f"error: {exc}") from None
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


RESULT_FILES = ("metrics.json", "explain_faithfulness.json", "analysis.json", "posthoc.json", "confusion_matrix.png",
                "roc_curves.png", "training_curves.png", "gradcam_gallery.png", "reliability_diagram.png",
                ROBUSTNESS_FILE, PICTURES_FILE, "robustness_validation.json", "guard_validation.json",
                "framing_validation.json",
                # per image (ids, labels, calibrated probabilities, decision): every analysed number can be redone
                "predictions_calibrated_validation.csv", "predictions_calibrated_test.csv")
# the plot is drawn once every backbone is analysed; benchmarks/bench_ensemble.py --out writes the other
RUN_FILES = ("config.json", "comparison.json", "comparison.md", "splits.csv")
OPTIONAL_RUN_FILES = ("comparison.png", "ensemble_validation.json")
BUNDLE_FILES = ("config.json", "model.safetensors", "README.md", "examples.json", "analysis.json", OOD_FILE)


def results_markers(run_name: str) -> tuple[str, str]:
    """The comments around a run's generated results block in README.md or a page of docs/."""
    return f"<!-- results:{run_name}:start -->", f"<!-- results:{run_name}:end -->"


def block_file(repo: Path, name: str) -> Path:
    """The page (README.md or docs/*.md) that holds `name`'s generated block between its markers."""
    start, end = results_markers(name)
    for page in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        if page.is_file() and start in page.read_text() and end in page.read_text():
            return page
    raise SystemExit(f"neither README.md nor docs/*.md has a place for {name}'s results: add the lines {start} "
                     f"and {end} where the table belongs")


def write_readme_block(repo: Path, name: str, text: str) -> None:
    """Replace what the page holding `name`'s results markers has between them."""
    page = block_file(repo, name)
    content = page.read_text()
    start, end = results_markers(name)
    page.write_text(content[:content.index(start) + len(start)] + "\n" + text + "\n" + content[content.index(end):])


def check_bundle_is_no_worse(run_dir: Path, bundle: str, repo: Path, force: bool) -> None:
    """Refuse to replace a bundled model with one whose served test balanced accuracy is lower, unless forced."""
    new = served_balanced_accuracy(run_dir / bundle / "export")
    for current in sorted((repo / "models").glob("dermadetect-*")):
        old = served_balanced_accuracy(current)
        if new < old and not force:
            raise SystemExit(f"{run_dir / bundle} scores test balanced accuracy {new:.3f} as served, below the "
                             f"bundled {current.name}'s {old:.3f}: nothing was changed. Pass --force to bundle "
                             "it anyway")
        if new < old:
            print(f"warning: bundling {bundle} ({new:.3f}) in place of {current.name} ({old:.3f}) (--force)",
                  file=sys.stderr)


def publish_run(run_dir: Path, bundle: str | None, repo: Path, force: bool = False) -> None:
    """Copy a run's results (no images of the data) into results/<run>/ and its results table into README.md
    (between the run's markers); with `bundle`, also that backbone's export into models/dermadetect-<bundle>/
    (the one bundled model) and its card into model_card.md. Everything copied was written by train.py."""
    block_file(repo, run_dir.name)  # fail before anything is copied
    if missing := [name for name in RUN_FILES if not (run_dir / name).is_file()]:
        raise SystemExit(f"{run_dir} lacks {', '.join(missing)}: finish the run first (train.py --resume "
                         f"--output-dir {run_dir}). Nothing was changed")
    if bundle is not None:
        export = run_dir / bundle / "export"
        missing = [name for name in BUNDLE_FILES if not (export / name).is_file()]
        if missing:
            raise SystemExit(f"{export} lacks {', '.join(missing)}: run `python -m dermadetect export {run_dir}` "
                             "first. Nothing was changed")
        check_bundle_is_no_worse(run_dir, bundle, repo, force)
    results = repo / "results" / run_dir.name
    results.mkdir(parents=True, exist_ok=True)
    comparison = json.loads((run_dir / "comparison.json").read_text())
    copies = [*RUN_FILES, *OPTIONAL_RUN_FILES]
    copies += [f"{row['backbone']}/{name}" for row in comparison["rows"] for name in RESULT_FILES]
    for name in copies:
        # a file the run no longer has goes too: results/ shows the run as it is now
        if (run_dir / name).is_file():
            (results / name).parent.mkdir(exist_ok=True)
            shutil.copy2(run_dir / name, results / name)
        else:
            (results / name).unlink(missing_ok=True)
    write_readme_block(repo, run_dir.name, results_markdown(comparison, f"results/{run_dir.name}/comparison.json"))
    if bundle is None:
        return
    # the new bundle is assembled beside the old one, which goes only once the new one is complete
    staging = repo / "models" / f".dermadetect-{bundle}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # the card again, now with what was measured on the export since (the robustness benchmark)
    run_info = json.loads((run_dir / "config.json").read_text())
    model_card(read_backbone_row(run_dir / bundle), run_info).save(export / "README.md")
    for name in BUNDLE_FILES:
        shutil.copy2(export / name, staging / name)
    for previous in (repo / "models").glob("dermadetect-*"):
        shutil.rmtree(previous)
    bundled = staging.rename(repo / "models" / f"dermadetect-{bundle}")
    shutil.copy2(bundled / "README.md", repo / "model_card.md")

if __name__ == "__main__":
    sys.exit(main())
