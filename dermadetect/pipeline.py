"""The stages after fitting, each over a run folder written by train.py:

- evaluate: one pass of every split (and of the non-dermoscopic photos) through the best checkpoint on the
  accelerator's device, every process taking part; writes the outputs, metrics.json, predictions and plots;
- analyze: the post-hoc settings and statistics, derived from those outputs alone (no model);
- export: the served model's folder, assembled once from the settings: CAM method chosen by ROAD on the served
  model, a Grad-CAM gallery of the served model, weights, config, OOD detector, examples, card.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from .config import RunConfig, replace_nested
from .data import (LabelledImages, LesionData, build_transforms, collate, guard_photo_files, load_lesion_data,
                   yield_to_compute)
from .engine import Accelerator, collect_outputs, read_trainer_state
from .explain import road_faithfulness
from .hub import HubPushError, LoadedModel, export_for_hub, model_card, push_to_hub
from .inference import Predictor, open_image
from .labels import melanoma_index
from .metrics import classification_metrics, json_safe
from .models import count_parameters, create_backbone
from .posthoc import OOD_FILE, TTA_VIEWS, DermoscopyGuard, PostHocSettings, SettingsError, nll, softmax
from .report import plot_cam_gallery, read_backbone_row, write_backbone_plots, write_comparison
from .shift import RandomShift, random_view
from .study import PHOTO_SAMPLES, analyze, photo_samples

logger = logging.getLogger(__name__)

RUN_CONFIG = "config.json"
BEST_DIR = "best"
EXPORT_DIR = "export"
METRICS_FILE = "metrics.json"
ANALYSIS_FILE = "analysis.json"
SETTINGS_FILE = "posthoc.json"
HUB_FILE = "hub.json"
PLOTS = ("confusion_matrix.png", "roc_curves.png", "training_curves.png", "gradcam_gallery.png",
         "reliability_diagram.png")
GALLERY_PER_CLASS = 2    # correct and wrong test cases per class in the Grad-CAM gallery
# views per split in the evaluation pass: train feeds the guard and the class prior; validation chooses
# test-time augmentation, temperature and thresholds; test is scored. The guard also learns from shifted copies
# of train (its threshold from those of validation) and from framings of the ordinary pictures and of the guard's
# photos of skin
SPLIT_VIEWS = {"train": 1, "train_shifted": 1, "validation": TTA_VIEWS, "validation_shifted": 1, "test": TTA_VIEWS,
               "photos": TTA_VIEWS, "photo_framings": 1, "guard_photos": 1}
GUARD_SHIFT = 0.5        # chance of each upload shift in the guard's shifted copies and framings
GUARD_VIEWS = 8          # random framings of each guard photo and picture, besides the one as taken


class RunFolderError(RuntimeError):
    """A run folder lacks what a stage needs; the message says which stage to run first."""


class ShiftedCopies(Dataset):
    """A split's images through the upload shifts, image i drawn from seed i: the same copies in every run,
    whatever the number of processes or workers."""

    def __init__(self, table, label_names, transform):
        self.table, self.transform, self.shift = table, transform, RandomShift(GUARD_SHIFT)
        self.index = {name: i for i, name in enumerate(label_names)}

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        row = self.table[i]
        image = self.shift(row["image"].convert("RGB"), random.Random(i))
        return {"pixel_values": self.transform(image), "label": self.index[row["dx"]]}


class Framings(Dataset):
    """Each photo as taken and in GUARD_VIEWS random framings through the upload shifts, row i drawn from seed i
    so that every pass (and the guard fitted on it) is the same; the label is the photo's index. A photo is a
    file (opened as an upload is) or a PIL image."""

    def __init__(self, photos, transform):
        self.photos, self.transform, self.shift = photos, transform, RandomShift(GUARD_SHIFT)

    def __len__(self):
        return len(self.photos) * (GUARD_VIEWS + 1)

    def __getitem__(self, i):
        photo, view = divmod(i, GUARD_VIEWS + 1)
        image = self.photos[photo]
        image = image if isinstance(image, Image.Image) else open_image(image)
        if view:
            rng = random.Random(i)
            image = self.shift(random_view(image, rng), rng)
        return {"pixel_values": self.transform(image), "label": photo}


# ---------------------------------------------------------------- run folders

def read_run(run_dir: Path) -> tuple[RunConfig, dict]:
    """The settings a run was started with (its output_dir is where it lies now) and its config.json."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise RunFolderError(f"{run_dir} holds no run ({RUN_CONFIG} is missing); start one with train.py")
    try:
        info = json.loads(path.read_text())
        cfg = RunConfig.from_dict(info["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RunFolderError(f"{path} cannot be read as a run of this version of train.py ({exc}); it was "
                             "written by another version, or damaged: start a new run") from exc
    return replace_nested(cfg, output_dir=str(run_dir)), info


def load_run_data(run_dir: Path, cfg: RunConfig) -> LesionData:
    """The run's data, split as its splits.csv records; anything else is refused."""
    data = load_lesion_data(cfg.data, seed=cfg.train.seed)
    with open(Path(run_dir) / "splits.csv", newline="") as f:
        saved = sorted(tuple(row) for row in list(csv.reader(f))[1:])
    current = sorted(data.split_rows())
    if saved != current:
        differ = sorted(set(saved) ^ set(current))
        raise RunFolderError(f"the data in {data.source} is not split as {run_dir}/splits.csv records "
                             f"({len(differ)} rows differ, first {differ[:3]}); continue the run on the data it "
                             "started with")
    return data


def trained_model(name: str, cfg: RunConfig, num_classes: int, run_dir: Path) -> torch.nn.Module:
    """The backbone with its best validation checkpoint."""
    weights = Path(run_dir) / name / BEST_DIR / "model.safetensors"
    if not weights.is_file():
        raise RunFolderError(f"{weights} is missing: fit {name} first (train.py --resume --output-dir {run_dir})")
    model = create_backbone(name, num_classes, replace_nested(cfg, model={"pretrained": False,
                                                                        "pretrained_files": {}}).model)
    model.load_state_dict(load_file(weights))
    return model.eval()


def write_predictions(path: Path, table, label_names, labels, probs, decisions, ood_scores=None) -> None:
    """Per image: ids, label, the call and every probability (and the OOD score), each float written exactly
    (repr reads back as the same float64, so every metric recomputes exactly from the file)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "lesion_id", "label", "pred"] + [f"prob_{n}" for n in label_names] +
                        (["ood_score"] if ood_scores is not None else []))
        for i, (image_id, lesion_id) in enumerate(zip(table["image_id"], table["lesion_id"])):
            writer.writerow([image_id, lesion_id, label_names[labels[i]], label_names[decisions[i]]] +
                            [repr(float(v)) for v in probs[i]] +
                            ([repr(float(ood_scores[i]))] if ood_scores is not None else []))


def outputs_path(run_dir: Path, name: str, split: str) -> Path:
    return Path(run_dir) / name / f"outputs_{split}.npz"


# ---------------------------------------------------------------- evaluate

def evaluate_backbone(name: str, cfg: RunConfig, data: LesionData, accelerator: Accelerator, run_dir: Path) -> None:
    """The one evaluation pass of `name`'s best checkpoint over train, validation, test and the photos, on the
    accelerator's device in every process; the main process writes outputs_<split>.npz, metrics.json (the
    network alone: one view, argmax), predictions_<split>.csv and the plots."""
    out = Path(run_dir) / name
    names = data.label_names
    model = trained_model(name, cfg, len(names), run_dir)
    state = read_trainer_state(out)
    if state is None:
        raise RunFolderError(f"{out}/state/trainer_state.json is missing: it holds the training history that "
                             "metrics.json reports; copy it with best/")
    _, eval_tf, data_config = build_transforms(model, cfg.data)
    tables = {split: LabelledImages(data.splits[split], names, eval_tf) for split in ("train", "validation", "test")}
    for split in ("train", "validation"):
        tables[f"{split}_shifted"] = ShiftedCopies(data.splits[split], names, eval_tf)
    pictures = [image for _, image in photo_samples()]
    tables["photos"] = [{"pixel_values": eval_tf(image), "label": -1} for image in pictures]
    tables["photo_framings"] = Framings(pictures, eval_tf)
    guard_files = guard_photo_files(cfg.data.guard_photos) if cfg.data.guard_photos else []
    if guard_files:
        tables["guard_photos"] = Framings(guard_files, eval_tf)
    splits = [split for split in SPLIT_VIEWS if split in tables]
    loaders = [DataLoader(tables[split], batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers,
                          worker_init_fn=yield_to_compute, collate_fn=collate) for split in splits]
    model, *loaders = accelerator.prepare(model, *loaders)
    outputs = {split: collect_outputs(model, loader, accelerator, SPLIT_VIEWS[split], desc=f"{name} {split}")
               for split, loader in zip(splits, loaders)}
    # which framing each row is (the label: which photo), for the guard's cross-validation
    for split in ("photo_framings", "guard_photos"):
        if split in outputs:
            outputs[split]["views"] = np.arange(len(tables[split])) % (GUARD_VIEWS + 1)
    if guard_files:
        outputs["guard_photos"].update(names=np.array([f.name for f in guard_files]),
                                       folder=np.array(str(cfg.data.guard_photos)))
    if accelerator.is_main_process:
        for split, arrays in outputs.items():
            np.savez(outputs_path(run_dir, name, split), **arrays, eval_crop_pct=crop_setting(cfg))
        row = {"backbone": name, "checkpoint": str(out / BEST_DIR / "model.safetensors"),
               "test_split": data.test_description, "num_processes": accelerator.num_processes,
               "init": cfg.model.init_description(name),
               "parameters": count_parameters(accelerator.unwrap_model(model)),
               "best_epoch": state.best_epoch, "epochs_run": state.epoch, "steps": state.global_step,
               "train_seconds": state.train_seconds,
               "train_images_per_second": state.train_images / max(state.train_seconds, 1e-9),
               "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}}
        for split in ("validation", "test"):
            labels, probs = outputs[split]["labels"], softmax(outputs[split]["logits"][:, 0])
            row[split] = json_safe(network_metrics(outputs[split], names))
            write_predictions(out / f"predictions_{split}.csv", data.splits[split], names, labels, probs,
                              probs.argmax(axis=1))
        row["history"] = state.history
        (out / METRICS_FILE).write_text(json.dumps(row, indent=1, allow_nan=False))
        write_backbone_plots(labels, probs, names, state.history, out, name)  # the test split's
        accelerator.print(f"{name}: evaluated; test balanced accuracy of the network alone "
                          f"{row['test']['balanced_accuracy']:.3f}")
    accelerator.free_memory(model, *loaders)


def network_metrics(outputs: dict[str, np.ndarray], label_names) -> dict:
    """The network alone (first view, argmax): classification_metrics plus the mean negative log-likelihood
    ("loss")."""
    logits, labels = outputs["logits"][:, 0], outputs["labels"]
    metrics = classification_metrics(labels, softmax(logits), label_names, melanoma_index(label_names))
    return {**metrics, "loss": nll(logits, labels)}


# ---------------------------------------------------------------- analyze

def crop_setting(cfg: RunConfig) -> np.ndarray:
    """data.eval_crop_pct as the evaluation outputs record it (NaN: the backbone's own crop)."""
    return np.array(np.nan if cfg.data.eval_crop_pct is None else cfg.data.eval_crop_pct)


def read_outputs(run_dir: Path, name: str, cfg: RunConfig, data: LesionData) -> dict[str, dict]:
    """`name`'s evaluation outputs per split, refused when they are missing or were written for other images."""
    expected = [s for s in SPLIT_VIEWS if s != "guard_photos" or cfg.data.guard_photos]
    if not all(outputs_path(run_dir, name, split).is_file() for split in expected):
        raise RunFolderError(f"{name} has no (or older) evaluation outputs: run `python -m dermadetect evaluate "
                             f"{run_dir}`")
    outputs = {split: dict(np.load(outputs_path(run_dir, name, split))) for split in expected}
    if not all("penultimate" in arrays for arrays in outputs.values()):
        raise RunFolderError(f"{name}'s evaluation outputs hold the penultimate features only (written before the "
                             f"guard also saw the last feature stages): run `python -m dermadetect evaluate {run_dir}` "
                             "again")
    sizes = {split: len(data.splits[split]) for split in ("train", "validation", "test")}
    if any(len(outputs[split]["labels"]) != size for split, size in sizes.items()) or \
            len(outputs["photos"]["labels"]) != len(PHOTO_SAMPLES) or \
            len(outputs["photo_framings"]["labels"]) != len(PHOTO_SAMPLES) * (GUARD_VIEWS + 1):
        raise RunFolderError(f"{name}'s evaluation outputs were written for other images than this version and "
                             f"the run's data give: run `python -m dermadetect evaluate {run_dir}` again")
    # outputs from before the setting existed were framed with the backbone's own crop
    recorded = [arrays.pop("eval_crop_pct", np.array(np.nan)) for arrays in outputs.values()]
    if not all(np.array_equal(crop, crop_setting(cfg), equal_nan=True) for crop in recorded):
        raise RunFolderError(f"{name}'s evaluation outputs were framed with another crop than data.eval_crop_pct "
                             f"({cfg.data.eval_crop_pct}) in {run_dir}/config.json: run `python -m dermadetect "
                             f"evaluate {run_dir}` again")
    return outputs


def analyze_backbone(name: str, cfg: RunConfig, data: LesionData, run_dir: Path) -> dict:
    """From the evaluation pass alone: analysis.json, the fitted settings (posthoc.json), the OOD detector,
    predictions_calibrated_<split>.csv and the reliability diagram. Returns the analysis."""
    out = Path(run_dir) / name
    outputs = read_outputs(run_dir, name, cfg, data)
    analysis, settings, detector, served = analyze(
        name, outputs, data.splits, data.label_names, cfg.train.bootstrap_resamples, out)
    (out / ANALYSIS_FILE).write_text(json.dumps(analysis, indent=1, allow_nan=False))
    (out / SETTINGS_FILE).write_text(json.dumps(settings.to_json(), indent=1))
    detector.save(out)
    for split, (probs, decisions, scores) in served.items():
        write_predictions(out / f"predictions_calibrated_{split}.csv", data.splits[split], data.label_names,
                          outputs[split]["labels"], probs, decisions, scores)
    return analysis


# ---------------------------------------------------------------- export

def export_backbone(name: str, cfg: RunConfig, data: LesionData, run_info: dict, run_dir: Path,
                    repo_id: str | None = None) -> Path:
    """Assemble the served model's folder in one go: the analysed settings, the CAM method that ROAD finds
    most faithful on validation images for the served model, a gallery of that model's CAMs on test images,
    then weights + config.json, the OOD detector, examples, plots, analysis and card."""
    out = Path(run_dir) / name
    if not (out / SETTINGS_FILE).is_file():
        raise RunFolderError(f"{name} has not been analysed: run `python -m dermadetect analyze {run_dir}`")
    names = data.label_names
    model = trained_model(name, cfg, len(names), run_dir)
    _, eval_tf, data_config = build_transforms(model, cfg.data)
    settings = PostHocSettings.from_json(json.loads((out / SETTINGS_FILE).read_text()), str(out / SETTINGS_FILE))
    detector = DermoscopyGuard.load(out / OOD_FILE, settings.ood_threshold)
    try:
        detector.check_network(model)
    except SettingsError as exc:
        raise RunFolderError(f"{name}: {exc}; run `python -m dermadetect evaluate {run_dir}` and `analyze` "
                             "again") from exc
    loaded = LoadedModel(model=model, architecture=name, label_names=names, data_config=data_config, folder=out,
                         source=str(out), config={}, settings=settings, ood=detector)
    if cfg.train.explain_images:
        sample = data.splits["validation"].shuffle(seed=cfg.train.seed)
        sample = sample.select(range(min(cfg.train.explain_images, len(sample))))
        pixels = torch.stack([eval_tf(im.convert("RGB")) for im in sample["image"]])
        faithfulness = road_faithfulness(Predictor(loaded).explainer, pixels, seed=cfg.train.seed)
        (out / "explain_faithfulness.json").write_text(json.dumps(faithfulness, indent=1))
        settings = dataclasses.replace(settings, cam_method=faithfulness["best_method"])
        loaded = dataclasses.replace(loaded, settings=settings)
    predictor = Predictor(loaded)
    write_gallery(predictor, data, out, name)

    export = out / EXPORT_DIR
    if export.exists():
        shutil.rmtree(export)
    export_for_hub(model, name, names, data_config, export, settings)
    detector.save(export)
    write_examples(export, pick_examples(data))
    for plot in PLOTS:
        shutil.copy2(out / plot, export / plot)
    shutil.copy2(out / ANALYSIS_FILE, export / ANALYSIS_FILE)
    model_card(read_backbone_row(out), run_info, repo_id).save(export / "README.md")
    logger.info("%s: exported to %s (CAM method %s)", name, export, settings.cam_method)
    return export


def write_gallery(predictor: Predictor, data: LesionData, out: Path, name: str) -> None:
    """Grad-CAM overlays of the served model on correct and wrong test calls, per class."""
    with open(out / "predictions_calibrated_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    chosen = []
    for label in data.label_names:
        of_class = [i for i, r in enumerate(rows) if r["label"] == label]
        chosen += [i for i in of_class if rows[i]["pred"] == label][:GALLERY_PER_CLASS]
        chosen += [i for i in of_class if rows[i]["pred"] != label][:GALLERY_PER_CLASS]
    test = data.splits["test"]
    cases = []
    for i in chosen:
        result = predictor.predict(test[i]["image"])
        cases.append({"overlay": result.overlay, "label": rows[i]["label"], "pred": result.top_label,
                      "prob": result.probabilities[result.top_label],
                      "correct": rows[i]["label"] == result.top_label})
    plot_cam_gallery(cases, out / "gradcam_gallery.png",
                     f"{name}: {predictor.default_method} of the served model on test images "
                     "(green: correct, red: wrong)")


def pick_examples(data: LesionData) -> list[tuple]:
    """One test image per class (the first of each), for the Space's examples."""
    test = data.splits["test"]
    first = {}
    for i, dx in enumerate(test["dx"]):
        first.setdefault(dx, i)
    return [(test[i]["image"], dx, test[i]["image_id"]) for dx, i in sorted(first.items())]


def write_examples(export: Path, examples: list[tuple]) -> None:
    (export / "examples").mkdir(exist_ok=True)
    listing = []
    for image, label, image_id in examples:
        name = f"examples/{image_id}.jpg"
        image.convert("RGB").save(export / name, quality=95)
        listing.append({"file": name, "label": label, "image_id": image_id})
    (export / "examples.json").write_text(json.dumps(listing, indent=1))


def finish_run(cfg: RunConfig, data: LesionData, run_dir: Path, analyze: bool = True, export: bool = True,
               push_prefix: str | None = None, private: bool = False, keep_finished: bool = False,
               force: bool = False) -> int:
    """Analyse and/or export every backbone of an evaluated run (keep_finished: skip those already done), push
    the exports if asked, and write the comparison. Main process only. Returns 1 if a push failed."""
    run_dir = Path(run_dir)
    run_info = json.loads((run_dir / RUN_CONFIG).read_text())
    for name in cfg.backbones:
        if analyze and not (keep_finished and (run_dir / name / ANALYSIS_FILE).is_file()):
            analyze_backbone(name, cfg, data, run_dir)
        if export and not (keep_finished and (run_dir / name / EXPORT_DIR / "README.md").is_file()):
            export_backbone(name, cfg, data, run_info, run_dir)
    status = push_run(run_dir, cfg.backbones, push_prefix, private, force) if push_prefix else 0
    comparison = write_comparison([read_backbone_row(run_dir / name) for name in cfg.backbones], run_dir)
    print((run_dir / "comparison.md").read_text())
    print(f"best on validation: {comparison['best_backbone']}")
    return status


def push_run(run_dir: Path, backbones, prefix: str, private: bool = False, force: bool = False) -> int:
    """Push every backbone's export to PREFIX-<backbone>, its card naming the repo, and record repo and commit
    in <backbone>/hub.json (the comparison names them). Returns 1 if any push failed or was refused (a published
    model that serves better is kept unless `force`), after trying all (each local export stays complete)."""
    run_info = json.loads((Path(run_dir) / RUN_CONFIG).read_text())
    failed = 0
    for name in backbones:
        export = Path(run_dir) / name / EXPORT_DIR
        repo_id = f"{prefix}-{name}"
        model_card(read_backbone_row(Path(run_dir) / name), run_info, repo_id).save(export / "README.md")
        try:
            commit_url = push_to_hub(export, repo_id, private, force)
            (Path(run_dir) / name / HUB_FILE).write_text(json.dumps({"repo_id": repo_id, "commit_url": commit_url}))
            print(f"pushed {export} -> {commit_url}")
        except HubPushError as exc:
            failed = 1
            print(f"error: {exc}", file=sys.stderr)
    return failed
