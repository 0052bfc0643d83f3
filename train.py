"""Fine-tune timm backbones on HAM10000 under identical conditions with Accelerate, evaluate, and report.

    python train.py --data-dir DIR --backbones resnet18 efficientnet_b0 convnextv2_nano --output-dir runs/NAME
    accelerate launch --num_processes 2 train.py ...   (or torchrun --nproc_per_node 2 train.py ...)
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file
from sklearn.metrics import log_loss
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from dermadetect.config import DEFAULT_BACKBONES, DEFAULT_HUB_DATASET, RunConfig, TrainConfig, replace_nested
from dermadetect.color import COLOR_CONSTANCY
from dermadetect.data import (CLASS_REBALANCING, LesionData, as_torch_dataset, build_transforms,
                              class_balanced_sampler, class_weights, collate, load_lesion_data)
from dermadetect.engine import (TrainerState, load_checkpoint, make_accelerator, predict, read_trainer_state,
                                save_checkpoint, set_seed, train_one_epoch)
from dermadetect.explain import road_faithfulness
from dermadetect.hub import (HubPushError, complete_export, export_for_hub, model_card, push_to_hub,
                             update_export_config)
from dermadetect.inference import Predictor
from dermadetect.labels import DISCLAIMER, melanoma_index
from dermadetect.metrics import classification_metrics, json_safe
from dermadetect.models import count_parameters, create_backbone
from dermadetect.report import plot_cam_gallery, read_backbone_row, write_backbone_plots, write_comparison
from dermadetect.study import analyze_backbone

logger = logging.getLogger("dermadetect.train")

BEST_DIR = "best"
EXPORT_DIR = "export"
PLOTS = ("confusion_matrix.png", "roc_curves.png", "training_curves.png", "gradcam_gallery.png")
METRICS_FILE = "metrics.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=DISCLAIMER)
    p.add_argument("--config", help="YAML file with run settings (sections data/model/train); flags override it")
    src = p.add_argument_group("data")
    src.add_argument("--data-dir", help="local folder: imagefolder+metadata.csv, raw HAM10000, or class folders")
    src.add_argument("--dataset", nargs="?", const=DEFAULT_HUB_DATASET,
                     help=f"Hub dataset id (given alone: {DEFAULT_HUB_DATASET})")
    src.add_argument("--val-fraction", type=float)
    src.add_argument("--test-fraction", type=float, help="used only when the source has no test split")
    src.add_argument("--split-seed", type=int,
                     help="seed of the lesion split (default: --seed); fix it to compare seeds on one split")
    src.add_argument("--skip-bad-images", action="store_true", default=None,
                     help="drop (and report) unreadable/missing/mislabelled/duplicate rows instead of failing")
    src.add_argument("--max-train-samples", type=int)
    src.add_argument("--max-eval-samples", type=int, help="cap validation and test (small runs only)")
    src.add_argument("--image-size", type=int, help="square input size (default: the backbone's own)")
    src.add_argument("--color-constancy", choices=sorted(COLOR_CONSTANCY),
                     help="normalise each image's colour cast before training and prediction (default: none)")
    src.add_argument("--num-workers", type=int, help="data loader processes (may differ on --resume)")
    mdl = p.add_argument_group("models")
    mdl.add_argument("--backbones", nargs="+", help=f"timm model names (default: {' '.join(DEFAULT_BACKBONES)})")
    mdl.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=None,
                     help="start from random weights")
    mdl.add_argument("--pretrained-file", help="local ImageNet weights file (safetensors) instead of the Hub")
    mdl.add_argument("--pretrained-files", nargs="+", metavar="BACKBONE=FILE", type=backbone_file,
                     help="local weights per backbone; the others follow --pretrained/--no-pretrained")
    trn = p.add_argument_group("training")
    trn.add_argument("--epochs", type=int)
    trn.add_argument("--batch-size", type=int)
    trn.add_argument("--lr", type=float)
    trn.add_argument("--weight-decay", type=float)
    trn.add_argument("--warmup-epochs", type=int)
    trn.add_argument("--label-smoothing", type=float)
    trn.add_argument("--class-weighting", choices=CLASS_REBALANCING,
                     help="loss weights: inverse class frequency (balanced) or its square root (sqrt)")
    trn.add_argument("--class-sampling", choices=CLASS_REBALANCING,
                     help="draw training images with those weights instead (with replacement, one epoch's worth)")
    trn.add_argument("--mixup", type=float, help="mixup alpha (0: off)")
    trn.add_argument("--cutmix", type=float, help="cutmix alpha (0: off); with --mixup each batch uses one")
    trn.add_argument("--ema-decay", type=float,
                     help="keep an exponential moving average of the weights and validate/score it (0: off)")
    trn.add_argument("--layer-decay", type=float, help="lr multiplier per layer group below the head")
    trn.add_argument("--gradient-accumulation-steps", type=int)
    trn.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    trn.add_argument("--max-steps", type=int, help="stop each backbone after this many optimizer steps")
    trn.add_argument("--seed", type=int)
    trn.add_argument("--explain-images", type=int, help="validation images for CAM faithfulness (0: skip)")
    p.add_argument("--output-dir", help="run folder (default runs/default)")
    p.add_argument("--push-to-hub", metavar="ORG/PREFIX",
                   help="push each backbone's export to the Hub as ORG/PREFIX-<backbone> (token: HF_TOKEN)")
    p.add_argument("--hub-private", action="store_true", help="create the Hub repos as private")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output-dir")
    p.add_argument("--eval-only", action="store_true",
                   help="re-evaluate the best checkpoints in --output-dir; writes metrics_eval.json")
    p.add_argument("--train-only", action="store_true",
                   help="train and checkpoint every backbone, then stop; `--resume` later scores, explains and "
                        "analyses them (train on a GPU machine, finish where the data is)")
    p.add_argument("--analyze-only", action="store_true",
                   help="(re)run the post-training analysis of a finished run: TTA, temperature, melanoma "
                        "threshold, OOD detector (all chosen on validation), bootstrap CIs, subgroups")
    return p.parse_args(argv)


def backbone_file(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"expected BACKBONE=FILE, got {text!r}")
    return name, path


def build_config(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """Defaults (or a saved run's settings) <- YAML file <- command-line flags."""
    cfg = base or RunConfig()
    if args.config:
        cfg = RunConfig.from_dict({**cfg.to_dict(), **(yaml.safe_load(Path(args.config).read_text()) or {})})
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "pretrained_files" in given:
        given["pretrained_files"] = dict(given["pretrained_files"])
    sections = {}
    for section in ("data", "model", "train"):
        fields = asdict(getattr(cfg, section)).keys()
        sections[section] = {k: given[k] for k in fields if k in given}
    if "backbones" in given:
        sections["backbones"] = tuple(given["backbones"])
    if "output_dir" in given:
        sections["output_dir"] = given["output_dir"]
    return replace_nested(cfg, **sections)


def make_loaders(data: LesionData, train_tf, eval_tf, cfg: RunConfig) -> dict[str, DataLoader]:
    loaders = {}
    for split in ("train", "validation", "test"):
        dataset = as_torch_dataset(data.splits[split], data.label_names, train_tf if split == "train" else eval_tf)
        sampler = None
        if split == "train" and cfg.train.class_sampling != "none":
            sampler = class_balanced_sampler(data.labels("train"), len(data.label_names), cfg.train.class_sampling,
                                             cfg.train.seed)
        # mixing pairs each image with another of its batch (timm's Mixup needs an even batch): drop the odd tail
        loaders[split] = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler,
                                    shuffle=split == "train" and sampler is None,
                                    num_workers=cfg.data.num_workers, collate_fn=collate,
                                    drop_last=split == "train" and mixing(cfg.train))
        # workers are not persistent: each epoch's workers are seeded from the (checkpointed) main RNG,
        # which is what lets --resume repeat the augmentations exactly
    return loaders


def mixing(cfg: TrainConfig) -> bool:
    return cfg.mixup > 0 or cfg.cutmix > 0


def make_mixup(cfg: TrainConfig, num_classes: int) -> Mixup | None:
    """timm's batch mixup/cutmix; label smoothing stays with the loss, which applies it to the soft targets."""
    if not mixing(cfg):
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=0.0, num_classes=num_classes)


def make_loss(data: LesionData, cfg: RunConfig) -> torch.nn.Module:
    weight = None
    if cfg.train.class_weighting != "none":
        weight = torch.tensor(class_weights(data.class_counts("train"), cfg.train.class_weighting),
                              dtype=torch.float32)
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing)


def evaluate_split(model, loader, accelerator, data: LesionData, split: str) -> tuple[dict, np.ndarray, np.ndarray]:
    probs, labels = predict(model, loader, accelerator)
    metrics = classification_metrics(labels, probs, data.label_names, melanoma_index(data.label_names))
    metrics["loss"] = log_loss(labels, probs, labels=np.arange(len(data.label_names)))
    return metrics, probs, labels


def write_predictions(path: Path, table, label_names, labels, probs) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "lesion_id", "label", "pred"] + [f"prob_{n}" for n in label_names])
        for image_id, lesion_id, y, p in zip(table["image_id"], table["lesion_id"], labels, probs):
            # 9 significant digits: float32 probabilities round-trip exactly, so metrics recompute exactly
            writer.writerow([image_id, lesion_id, label_names[y], label_names[int(p.argmax())]] +
                            [f"{v:.9g}" for v in p])


def train_backbone(name: str, data: LesionData, cfg: RunConfig, accelerator, run_dir: Path,
                   resume: bool, train_only: bool = False) -> dict | None:
    """Train one backbone, keep its best validation checkpoint, score it on validation and test (unless
    `train_only`: then return None once training is done)."""
    out = run_dir / name
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.train.seed)  # every backbone starts from the same seed: identical conditions

    model = create_backbone(name, len(data.label_names), cfg.model)
    train_tf, eval_tf, data_config = build_transforms(model, cfg.data)
    loaders = make_loaders(data, train_tf, eval_tf, cfg)
    # timm's factory: AdamW with no weight decay on norm layers and biases
    optimizer = create_optimizer_v2(model, opt=cfg.train.optimizer, lr=cfg.train.lr,
                                    weight_decay=cfg.train.weight_decay, filter_bias_and_bn=True,
                                    layer_decay=cfg.train.layer_decay)
    model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
        model, optimizer, loaders["train"], loaders["validation"], loaders["test"])
    loss_fn = make_loss(data, cfg).to(accelerator.device)
    mix = make_mixup(cfg.train, len(data.label_names))
    ema = None
    if cfg.train.ema_decay:
        # warm-up: the average starts short and lengthens to 1 / (1 - ema_decay) steps, so it suits short runs
        ema = ModelEmaV3(accelerator.unwrap_model(model), decay=cfg.train.ema_decay, use_warmup=True)
        accelerator.register_for_checkpointing(ema)
    eval_model = ema.module if ema is not None else model
    updates_per_epoch = math.ceil(len(train_loader) / cfg.train.gradient_accumulation_steps)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.train.scheduler, num_epochs=cfg.train.epochs,
                                       warmup_epochs=cfg.train.warmup_epochs, min_lr=cfg.train.min_lr,
                                       warmup_lr=cfg.train.lr * 0.01, step_on_epochs=False,
                                       updates_per_epoch=updates_per_epoch)

    state = (read_trainer_state(out) if resume else None) or TrainerState()
    if training_finished(state, cfg.train):
        # scoring needs only best/ and the history: the optimizer state may have stayed on the training machine
        accelerator.print(f"{name}: training finished ({state.epoch} epochs), scoring the best checkpoint")
    elif state.epoch:
        state = load_checkpoint(accelerator, out)
        accelerator.print(f"{name}: resuming after epoch {state.epoch} (step {state.global_step})")
        warn_if_threads_differ(run_dir)
    for epoch in range(state.epoch, cfg.train.epochs):
        if training_finished(state, cfg.train):
            break
        train_loader.set_epoch(epoch)
        stats = train_one_epoch(model, train_loader, optimizer, scheduler, loss_fn, accelerator, state,
                                cfg.train.max_steps, mix, ema)
        val, _, _ = evaluate_split(eval_model, val_loader, accelerator, data, "validation")
        state.epoch = epoch + 1
        state.train_seconds += stats["train_seconds"]
        state.train_images += stats["train_images"]
        state.history.append({"epoch": state.epoch, "step": state.global_step, **stats, "val_loss": val["loss"],
                              "val_accuracy": val["accuracy"],
                              "val_balanced_accuracy": val["balanced_accuracy"]})
        if val["balanced_accuracy"] > state.best_metric:
            state.best_metric, state.best_epoch = val["balanced_accuracy"], state.epoch
            accelerator.save_model(eval_model, out / BEST_DIR, safe_serialization=True)
        accelerator.print(f"{name} epoch {state.epoch}/{cfg.train.epochs}: loss {stats['train_loss']:.4f} "
                          f"val bal-acc {val['balanced_accuracy']:.4f} acc {val['accuracy']:.4f} "
                          f"({stats['train_images'] / stats['train_seconds']:.1f} img/s)")
        save_checkpoint(accelerator, state, out)
    if train_only:
        accelerator.free_memory(model, optimizer, train_loader, val_loader, test_loader)
        return None

    row, outputs = score_best(name, model, {"validation": val_loader, "test": test_loader}, data, accelerator, out)
    if accelerator.is_main_process:
        row.update(init=cfg.model.init_description(name), parameters=count_parameters(accelerator.unwrap_model(model)),
                   best_epoch=state.best_epoch, epochs_run=state.epoch, steps=state.global_step,
                   train_seconds=state.train_seconds,
                   train_images_per_second=state.train_images / max(state.train_seconds, 1e-9),
                   data_config={k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
                   history=state.history)
        (out / METRICS_FILE).write_text(json.dumps(row, indent=1, allow_nan=False))
        write_backbone_plots(*outputs["test"], data.label_names, state.history, out, name)
        export_for_hub(accelerator.unwrap_model(model), name, data.label_names, data_config, out / EXPORT_DIR,
                       extra={"color_constancy": cfg.data.color_constancy})
        explain_report(name, data, cfg, out)
        row["analysis"] = analyze_backbone(name, accelerator.unwrap_model(model), data, eval_tf, out,
                                           out / EXPORT_DIR, cfg.train.batch_size, cfg.data.num_workers)
        complete_export(out / EXPORT_DIR, row, json.loads((run_dir / "config.json").read_text()),
                        plots=[out / p for p in PLOTS], examples=pick_examples(data))
    accelerator.free_memory(model, optimizer, train_loader, val_loader, test_loader)
    return row


def warn_if_threads_differ(run_dir: Path) -> None:
    """Training is repeatable bit for bit only with the thread count it started with: another count sums the
    same floats in another order, and training amplifies that rounding (20 steps of the CPU recipe with 1 thread
    instead of 2 already give other weights)."""
    started = json.loads((run_dir / "config.json").read_text()).get("torch_threads")
    if started is not None and started != torch.get_num_threads():
        logger.warning("this run started with %d torch threads and continues with %d: it will not end where an "
                       "uninterrupted run would (set OMP_NUM_THREADS=%d to match)", started,
                       torch.get_num_threads(), started)


def training_finished(state: TrainerState, cfg: TrainConfig) -> bool:
    return state.epoch >= cfg.epochs or bool(cfg.max_steps and state.global_step >= cfg.max_steps)


def check_same_splits(data: LesionData, run_dir: Path) -> None:
    """A continued run must see the images it started with, split the same way (same ids, lesions, labels)."""
    with open(run_dir / "splits.csv", newline="") as f:
        saved = sorted(tuple(row) for row in list(csv.reader(f))[1:])
    current = sorted(data.split_rows())
    if saved != current:
        differ = sorted(set(saved) ^ set(current))
        raise SystemExit(f"the data in {data.source} is not split as {run_dir}/splits.csv records "
                         f"({len(differ)} rows differ, first {differ[:3]}); continue the run on the data it "
                         "started with")


def analyze_only(data: LesionData, cfg: RunConfig, run_dir: Path) -> list[dict]:
    """Run (or re-run) the post-training analysis of every finished backbone of a run, and refresh its export
    card. Single process."""
    run_info = json.loads((run_dir / "config.json").read_text())
    rows = []
    for name in cfg.backbones:
        out = run_dir / name
        if not (out / METRICS_FILE).is_file():
            raise FileNotFoundError(f"{out / METRICS_FILE} is missing: {name} has not finished training")
        model = create_backbone(name, len(data.label_names), replace_nested(
            cfg, model={"pretrained": False, "pretrained_file": None, "pretrained_files": {}}).model)
        model.load_state_dict(load_file(out / BEST_DIR / "model.safetensors"))
        _, eval_tf, _ = build_transforms(model, cfg.data)
        row = read_backbone_row(out)
        row["analysis"] = analyze_backbone(name, model, data, eval_tf, out, out / EXPORT_DIR,
                                           cfg.train.batch_size, cfg.data.num_workers)
        complete_export(out / EXPORT_DIR, row, run_info, plots=[out / p for p in PLOTS],
                        examples=pick_examples(data))
        rows.append(row)
    return rows


def pick_examples(data: LesionData) -> list[tuple]:
    """One test image per class (the first of each), for the Space's examples."""
    test = data.splits["test"]
    first = {}
    for i, dx in enumerate(test["dx"]):
        first.setdefault(dx, i)
    return [(test[i]["image"], dx, test[i]["image_id"]) for dx, i in sorted(first.items())]


def explain_report(name: str, data: LesionData, cfg: RunConfig, out: Path, per_class: int = 2) -> None:
    """ROAD faithfulness of each CAM method on validation images (the best becomes the exported model's
    default), and a Grad-CAM gallery of correct and wrong test cases per class."""
    predictor = Predictor(str(out / EXPORT_DIR))
    if cfg.train.explain_images:
        sample = data.splits["validation"].shuffle(seed=cfg.train.seed)
        sample = sample.select(range(min(cfg.train.explain_images, len(sample))))
        pixels = torch.stack([predictor.transform(im.convert("RGB")) for im in sample["image"]])
        faithfulness = road_faithfulness(predictor.explainer, pixels)
        (out / "explain_faithfulness.json").write_text(json.dumps(faithfulness, indent=1))
        update_export_config(out / EXPORT_DIR, cam_method=faithfulness["best_method"])
        predictor.default_method = faithfulness["best_method"]
    rows = read_csv_rows(out / "predictions_test.csv")
    chosen = []
    for label in data.label_names:
        of_class = [(i, r) for i, r in enumerate(rows) if r["label"] == label]
        chosen += [c for c in of_class if c[1]["pred"] == label][:per_class]
        chosen += [c for c in of_class if c[1]["pred"] != label][:per_class]
    test = data.splits["test"]
    cases = []
    for i, row in chosen:
        result = predictor.predict(test[i]["image"])
        cases.append({"overlay": result.overlay, "label": row["label"], "pred": result.top_label,
                      "prob": result.probabilities[result.top_label], "correct": row["label"] == result.top_label})
    plot_cam_gallery(cases, out / "gradcam_gallery.png",
                     f"{name}: {predictor.default_method} on test images (green: correct, red: wrong)")


def score_best(name, model, loaders, data: LesionData, accelerator, out: Path, tag: str = "") -> dict:
    """Load the best checkpoint into `model`, evaluate validation and test, write predictions.
    Returns the metrics row and {split: (labels, probabilities)}."""
    accelerator.unwrap_model(model).load_state_dict(load_file(out / BEST_DIR / "model.safetensors"))
    row = {"backbone": name, "checkpoint": str(out / BEST_DIR / "model.safetensors"),
           "test_split": data.test_description, "num_processes": accelerator.num_processes}
    outputs = {}
    for split, loader in loaders.items():
        metrics, probs, labels = evaluate_split(model, loader, accelerator, data, split)
        row[split] = json_safe(metrics)
        outputs[split] = (labels, probs)
        if accelerator.is_main_process:
            write_predictions(out / f"predictions{tag}_{split}.csv", data.splits[split], data.label_names,
                              labels, probs)
    return row, outputs


def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def evaluate_only(data: LesionData, cfg: RunConfig, accelerator, run_dir: Path) -> None:
    for name in cfg.backbones:
        out = run_dir / name
        if not (out / BEST_DIR / "model.safetensors").is_file():
            raise FileNotFoundError(f"no checkpoint at {out / BEST_DIR}; train {name} first")
        model = create_backbone(name, len(data.label_names), replace_nested(cfg, model={"pretrained": False,
                                                                                        "pretrained_file": None,
                                                                                        "pretrained_files": {}}).model)
        _, eval_tf, _ = build_transforms(model, cfg.data)
        loaders = {split: DataLoader(as_torch_dataset(data.splits[split], data.label_names, eval_tf),
                                     batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers,
                                     collate_fn=collate) for split in ("validation", "test")}
        model, val_loader, test_loader = accelerator.prepare(model, loaders["validation"], loaders["test"])
        row, _ = score_best(name, model, {"validation": val_loader, "test": test_loader}, data, accelerator, out,
                            tag="_eval")
        if accelerator.is_main_process:
            (out / "metrics_eval.json").write_text(json.dumps(row, indent=1, allow_nan=False))
        accelerator.print(f"{name}: validation bal-acc {row['validation']['balanced_accuracy']:.4f} "
                          f"on {accelerator.num_processes} process(es)")
        accelerator.free_memory(model, val_loader, test_loader)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = build_config(args)
    run_dir = Path(cfg.output_dir)
    no_training = args.eval_only or args.analyze_only
    existing_run = args.resume or no_training
    if sum((args.eval_only, args.resume, args.analyze_only)) > 1 or (args.train_only and no_training):
        raise SystemExit("--eval-only, --analyze-only and --resume exclude each other, and --train-only "
                         "goes only with a training run")
    if not existing_run and (run_dir / "config.json").exists():
        raise SystemExit(f"{run_dir} already holds a run: pass --resume to continue it, "
                         "or choose another --output-dir")
    if existing_run:
        # the saved settings are the run's; flags may repeat them but not change them
        saved = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text())["config"])
        saved = replace_nested(saved, output_dir=str(run_dir))  # a run folder may be moved or copied
        if args.num_workers is not None:
            # a property of the machine, not of the run: a run trained on a 16-core GPU machine is scored on
            # 2 cores. (Training continued with another count draws other augmentations than it would have.)
            saved = replace_nested(saved, data={"num_workers": args.num_workers})
        cfg = build_config(args, base=saved)
        if cfg != saved:
            changed = [f"{section}.{key}" for section in ("data", "model", "train")
                       for key, value in asdict(getattr(cfg, section)).items()
                       if value != asdict(getattr(saved, section))[key]]
            changed += [key for key in ("backbones",) if getattr(cfg, key) != getattr(saved, key)]
            raise SystemExit(f"{', '.join(changed)} differ from the settings saved in {run_dir}/config.json; "
                             "--resume and --eval-only continue a run with its own settings")

    accelerator = make_accelerator(cfg.train)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # it logs every file of every checkpoint
    set_seed(cfg.train.seed)
    data = load_lesion_data(cfg.data, seed=cfg.train.seed)
    accelerator.print(f"data: {data.source}; classes {list(data.label_names)}; "
                      + ", ".join(f"{s} {len(t)}" for s, t in data.splits.items()))
    if existing_run:
        check_same_splits(data, run_dir)
    if args.eval_only:
        evaluate_only(data, cfg, accelerator, run_dir)
        return 0
    if args.analyze_only:
        if accelerator.is_main_process:
            comparison = write_comparison(analyze_only(data, cfg, run_dir), run_dir)
            accelerator.print((run_dir / "comparison.md").read_text())
            accelerator.print(f"best on validation: {comparison['best_backbone']}")
        return 0

    if accelerator.is_main_process and args.resume:
        # the command that started the run stays the run's command; resumptions are listed after it
        run_info = json.loads((run_dir / "config.json").read_text())
        run_info.setdefault("resumed", []).append(sys.argv)
        (run_dir / "config.json").write_text(json.dumps(run_info, indent=1))
    elif accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(
            {"config": cfg.to_dict(), "command": sys.argv, "num_processes": accelerator.num_processes,
             "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
             "label_names": list(data.label_names),
             "split_sizes": {s: len(t) for s, t in data.splits.items()}}, indent=1))
        data.write_splits_csv(run_dir / "splits.csv")
        if data.dropped:
            with open(run_dir / "dropped_rows.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["split", "row", "image_id", "reason"])
                writer.writerows([b.split, b.row, b.image_id, b.reason] for b in data.dropped)

    rows = []
    for name in cfg.backbones:
        # the export's card is written last: a backbone killed while being scored or analysed is redone
        finished = (run_dir / name / METRICS_FILE).is_file() and (run_dir / name / EXPORT_DIR / "README.md").is_file()
        if args.resume and finished:
            accelerator.print(f"{name}: already finished, kept")
            rows.append(read_backbone_row(run_dir / name))
            continue
        rows.append(train_backbone(name, data, cfg, accelerator, run_dir, args.resume, args.train_only))
    if args.train_only:
        accelerator.print(f"trained {', '.join(cfg.backbones)}; score them with: python train.py --resume "
                          f"--output-dir {run_dir}")
        accelerator.end_training()
        return 0
    status = 0
    if accelerator.is_main_process:
        if args.push_to_hub:
            status = push_run(run_dir, rows, args.push_to_hub, args.hub_private)
        comparison = write_comparison(rows, run_dir)
        accelerator.print((run_dir / "comparison.md").read_text())
        accelerator.print(f"best on validation: {comparison['best_backbone']}")
    accelerator.end_training()
    return status


def push_run(run_dir: Path, rows: list[dict], prefix: str, private: bool) -> int:
    """Push every backbone's export to PREFIX-<backbone>, its card naming the repo; record repo and commit
    in the rows (and so in comparison.json/md). Returns 1 if any push failed, after trying all."""
    run_info = json.loads((run_dir / "config.json").read_text())
    failed = 0
    for row in rows:
        export = run_dir / row["backbone"] / EXPORT_DIR
        repo_id = f"{prefix}-{row['backbone']}"
        model_card(row, run_info, repo_id).save(export / "README.md")
        try:
            row["hub"] = {"repo_id": repo_id, "commit_url": push_to_hub(export, repo_id, private)}
            print(f"pushed {export} -> {row['hub']['commit_url']}")
        except HubPushError as exc:
            failed = 1
            print(f"error: {exc}", file=sys.stderr)
    return failed


if __name__ == "__main__":
    sys.exit(main())
