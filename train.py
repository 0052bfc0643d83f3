"""Fine-tune timm backbones on HAM10000 under identical conditions with Accelerate, then evaluate, analyse and
export each one (the stages of `python -m dermadetect`).

    python train.py --config configs/cpu.yaml
    accelerate launch --num_processes 2 train.py --config configs/gpu.yaml   (or torchrun --nproc_per_node 2)
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

import torch
import yaml
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader

from dermadetect.config import DEFAULT_HUB_DATASET, RunConfig, replace_nested, section_fields
from dermadetect.data import (BadDataError, LabelledImages, LesionData, build_transforms, class_weights,
                              collate, guard_photo_files, load_lesion_data, yield_to_compute)
from dermadetect.engine import (TrainerState, collect_outputs, load_checkpoint, make_accelerator,
                                read_trainer_state, save_checkpoint, set_seed, train_one_epoch)
from dermadetect.labels import DISCLAIMER
from dermadetect.models import create_backbone
from dermadetect.pipeline import (BEST_DIR, METRICS_FILE, RUN_CONFIG, RunFolderError, evaluate_backbone,
                                  finish_run, load_run_data, network_metrics, read_run)

logger = logging.getLogger("dermadetect.train")

STAGES = ("fit", "evaluate", "analyze", "export")


def build_parser(defaults: RunConfig) -> argparse.ArgumentParser:
    """Every option shows its default: the built-in settings, overlaid by --config, or a resumed run's own."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=DISCLAIMER,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML file with run settings (sections data/model/train); flags override it")
    p.add_argument("--output-dir", help="run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its last checkpoint or unfinished stage")
    p.add_argument("--stop-after", choices=STAGES, default="export",
                   help="last stage to run: fit (train only, e.g. for pilots scored on validation), evaluate, "
                        "analyze, export")
    p.add_argument("--push-to-hub", metavar="ORG/PREFIX",
                   help="push each backbone's export to the Hub as ORG/PREFIX-<backbone> (token: HF_TOKEN)")
    src = p.add_argument_group("data")
    src.add_argument("--data-dir", help="local folder: imagefolder with metadata.csv, raw HAM10000, or class folders")
    src.add_argument("--dataset", nargs="?", const=DEFAULT_HUB_DATASET,
                     help=f"Hub dataset id (given alone: {DEFAULT_HUB_DATASET})")
    src.add_argument("--val-fraction", type=float, help="share of train lesions held out for validation")
    src.add_argument("--split-seed", type=int,
                     help="seed of the lesion split (None: --seed); fix it to compare seeds on one split")
    src.add_argument("--skip-bad-images", action=argparse.BooleanOptionalAction,
                     help="drop (and report) unreadable, missing, mislabelled or duplicate rows instead of failing")
    src.add_argument("--max-train-samples", type=int, help="cap the training images (small runs)")
    src.add_argument("--max-eval-samples", type=int, help="cap validation and test (small runs)")
    src.add_argument("--image-size", type=int, help="square input size (None: the backbone's own)")
    src.add_argument("--num-workers", type=int, help="data loader processes (may differ on --resume)")
    src.add_argument("--guard-photos", metavar="DIR", type=lambda text: text or None,
                     help="photos of skin taken without a dermatoscope, for the out-of-distribution guard to flag "
                          "('': ordinary photos only)")
    mdl = p.add_argument_group("models")
    mdl.add_argument("--backbones", nargs="+", help="timm model names, trained one after the other")
    mdl.add_argument("--pretrained", action=argparse.BooleanOptionalAction,
                     help="start from timm's ImageNet weights (the Hugging Face Hub); --no-pretrained: random")
    mdl.add_argument("--pretrained-files", nargs="+", metavar="BACKBONE=FILE", type=backbone_file,
                     help="local ImageNet weights (safetensors) for some backbones instead of the Hub")
    trn = p.add_argument_group("training (the rest of the recipe: --config)")
    trn.add_argument("--epochs", type=int, help="epochs per backbone")
    trn.add_argument("--batch-size", type=int, help="images per batch and process")
    trn.add_argument("--lr", type=float, help="peak learning rate (AdamW, cosine schedule)")
    trn.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="autocast on GPUs")
    trn.add_argument("--max-steps", type=int, help="stop each backbone after this many optimizer steps")
    trn.add_argument("--seed", type=int, help="training seed (and the split's, unless --split-seed)")
    # every setting becomes a default, flag or not, so that the parsed namespace is the whole configuration
    flat = {k: v for section in ("data", "model", "train") for k, v in asdict(getattr(defaults, section)).items()}
    p.set_defaults(**{**flat, "pretrained_files": sorted(flat["pretrained_files"].items())},
                   backbones=list(defaults.backbones), output_dir=defaults.output_dir)
    return p


def backbone_file(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"expected BACKBONE=FILE, got {text!r}")
    return name, path


def parse_config(argv=None) -> tuple[argparse.Namespace, RunConfig]:
    """Defaults <- YAML file (or the resumed run's saved settings) <- flags, as one typed RunConfig."""
    pre = argparse.ArgumentParser(add_help=False)
    for flag in ("--config", "--output-dir", "--data-dir"):
        pre.add_argument(flag)
    pre.add_argument("--dataset", nargs="?", const=DEFAULT_HUB_DATASET)
    pre.add_argument("--resume", action="store_true")
    known, _ = pre.parse_known_args(argv)
    base = RunConfig()
    if known.resume:
        if not known.output_dir:
            raise SystemExit("--resume needs --output-dir: the run folder to continue")
        try:
            base, _ = read_run(Path(known.output_dir))
        except RunFolderError as exc:
            raise SystemExit(f"error: {exc}") from None
    elif known.config:
        try:
            base = RunConfig.from_dict({**base.to_dict(), **(yaml.safe_load(Path(known.config).read_text()) or {})})
        except (OSError, TypeError, ValueError, yaml.YAMLError) as exc:  # TypeError: a YAML list, not a mapping
            raise SystemExit(f"error: --config {known.config}: {exc}") from None
    if bool(known.data_dir) != bool(known.dataset) and not known.resume:
        # the source named on the command line replaces the config file's (gpu.yaml names a local folder)
        base = replace_nested(base, data={"data_dir": None, "dataset": None})
    args = build_parser(base).parse_args(argv)
    fields = section_fields()
    sections = {s: {} for s in ("data", "model", "train")}
    for dest, value in vars(args).items():
        if dest in fields:
            sections[fields[dest]][dest] = dict(value) if dest == "pretrained_files" else value
    cfg = replace_nested(base, **sections, backbones=tuple(args.backbones), output_dir=args.output_dir)
    if known.resume:
        # a property of the machine, not of the run: it may differ; every other setting is the run's own
        saved = replace_nested(base, data={"num_workers": cfg.data.num_workers})
        changed = [f"{s}.{k}" for s in sections for k, v in asdict(getattr(cfg, s)).items()
                   if v != asdict(getattr(saved, s))[k]]
        changed += ["backbones"] if cfg.backbones != saved.backbones else []
        if changed:
            raise SystemExit(f"{', '.join(changed)} differ from the settings saved in {args.output_dir}/"
                             f"{RUN_CONFIG}; --resume continues a run with its own settings")
    return args, cfg


def make_loaders(data: LesionData, train_tf, eval_tf, cfg: RunConfig) -> tuple[DataLoader, DataLoader]:
    def loader(split: str, transform, shuffle: bool) -> DataLoader:
        images = LabelledImages(data.splits[split], data.label_names, transform, seed=cfg.train.seed)
        return DataLoader(images, shuffle=shuffle, batch_size=cfg.train.batch_size, collate_fn=collate,
                          num_workers=cfg.data.num_workers, worker_init_fn=yield_to_compute)

    return loader("train", train_tf, True), loader("validation", eval_tf, False)


def fit_backbone(name: str, data: LesionData, cfg: RunConfig, accelerator, run_dir: Path, resume: bool) -> None:
    """Train one backbone, keeping its best validation checkpoint in best/ and a resumable state in state/."""
    out = run_dir / name
    out.mkdir(parents=True, exist_ok=True)
    state = (read_trainer_state(out) if resume else None) or TrainerState()
    if training_finished(state, cfg):
        accelerator.print(f"{name}: fitted ({state.epoch} epochs), kept")
        return
    set_seed(cfg.train.seed)  # every backbone starts from the same seed: identical conditions
    model = create_backbone(name, len(data.label_names), cfg.model)
    train_tf, eval_tf, _ = build_transforms(model, cfg.data, served_framing=False)
    train_loader, val_loader = make_loaders(data, train_tf, eval_tf, cfg)
    # timm's factory: AdamW with no weight decay on norm layers and biases
    optimizer = create_optimizer_v2(model, opt=cfg.train.optimizer, lr=cfg.train.lr,
                                    weight_decay=cfg.train.weight_decay, filter_bias_and_bn=True)
    updates_per_epoch = math.ceil(len(train_loader) / cfg.train.gradient_accumulation_steps)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.train.scheduler, num_epochs=cfg.train.epochs,
                                       warmup_epochs=cfg.train.warmup_epochs, min_lr=cfg.train.min_lr,
                                       warmup_lr=cfg.train.lr * 0.01, step_on_epochs=False,
                                       updates_per_epoch=updates_per_epoch)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    weight = torch.tensor(class_weights(data.labels("train"), len(data.label_names), cfg.train.class_weighting),
                          dtype=torch.float32)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing)
    loss_fn = loss_fn.to(accelerator.device)
    if state.epoch:
        state = load_checkpoint(accelerator, out)
        accelerator.print(f"{name}: resuming after epoch {state.epoch} (step {state.global_step})")
        warn_if_threads_differ(run_dir)
    for epoch in range(state.epoch, cfg.train.epochs):
        if training_finished(state, cfg):
            break
        stats = train_one_epoch(model, train_loader, optimizer, scheduler, loss_fn, accelerator, state,
                                cfg.train.max_steps)
        val = network_metrics(collect_outputs(model, val_loader, accelerator, desc=f"epoch {epoch + 1}: validation"),
                              data.label_names)
        state.epoch = epoch + 1
        state.train_seconds += stats["train_seconds"]
        state.train_images += stats["train_images"]
        state.history.append({"epoch": state.epoch, "step": state.global_step, **stats, "val_loss": val["loss"],
                              "val_accuracy": val["accuracy"], "val_balanced_accuracy": val["balanced_accuracy"]})
        if val["balanced_accuracy"] > state.best_metric:
            state.best_metric, state.best_epoch = val["balanced_accuracy"], state.epoch
            accelerator.save_model(model, out / BEST_DIR, safe_serialization=True)
        accelerator.print(f"{name} epoch {state.epoch}/{cfg.train.epochs}: loss {stats['train_loss']:.4f} "
                          f"val bal-acc {val['balanced_accuracy']:.4f} acc {val['accuracy']:.4f} "
                          f"({stats['train_images'] / stats['train_seconds']:.1f} img/s)")
        save_checkpoint(accelerator, state, out)
    accelerator.free_memory(model, optimizer, train_loader, val_loader)


def warn_if_threads_differ(run_dir: Path) -> None:
    """Training is repeatable bit for bit only with the thread count it started with: another count sums the
    same floats in another order, and training amplifies that rounding (two short runs of the CPU recipe with
    1 thread instead of 2 already give other weights)."""
    started = json.loads((run_dir / RUN_CONFIG).read_text()).get("torch_threads")
    if started is not None and started != torch.get_num_threads():
        logger.warning("this run started with %d torch threads and continues with %d: it will not end where an "
                       "uninterrupted run would (set OMP_NUM_THREADS=%d to match)", started,
                       torch.get_num_threads(), started)


def training_finished(state: TrainerState, cfg: RunConfig) -> bool:
    return state.epoch >= cfg.train.epochs or bool(cfg.train.max_steps and state.global_step >= cfg.train.max_steps)


def start_run(data: LesionData, cfg: RunConfig, accelerator, run_dir: Path) -> None:
    """config.json (settings, command, versions), splits.csv and the rows dropped as bad."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_CONFIG).write_text(json.dumps(
        {"config": cfg.to_dict(), "command": sys.argv, "num_processes": accelerator.num_processes,
         "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
         "label_names": list(data.label_names), "split_sizes": {s: len(t) for s, t in data.splits.items()}},
        indent=1))
    data.write_splits_csv(run_dir / "splits.csv")
    if data.dropped:
        with open(run_dir / "dropped_rows.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["split", "row", "image_id", "reason"])
            writer.writerows([b.split, b.row, b.image_id, b.reason] for b in data.dropped)


def main(argv=None) -> int:
    args, cfg = parse_config(argv)
    run_dir = Path(cfg.output_dir)
    if not args.resume and (run_dir / RUN_CONFIG).exists():
        raise SystemExit(f"{run_dir} already holds a run: pass --resume to continue it, "
                         "or choose another --output-dir")
    accelerator = make_accelerator(cfg.train)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # it logs every file of every checkpoint
    set_seed(cfg.train.seed)
    if args.resume:
        try:
            data = load_run_data(run_dir, cfg)
        except (RunFolderError, BadDataError) as exc:
            raise SystemExit(f"error: {exc}") from None
        if accelerator.is_main_process:  # the command that started the run stays; resumptions are listed after
            run_info = json.loads((run_dir / RUN_CONFIG).read_text())
            run_info.setdefault("resumed", []).append(sys.argv)
            (run_dir / RUN_CONFIG).write_text(json.dumps(run_info, indent=1))
    else:
        try:
            data = load_lesion_data(cfg.data, seed=cfg.train.seed)
            if cfg.data.guard_photos:  # needed after fitting: say so now, not hours later
                guard_photo_files(cfg.data.guard_photos)
        except BadDataError as exc:
            raise SystemExit(f"error: {exc}") from None
        if accelerator.is_main_process:
            start_run(data, cfg, accelerator, run_dir)
    accelerator.print(f"data: {data.source}; classes {list(data.label_names)}; "
                      + ", ".join(f"{s} {len(t)}" for s, t in data.splits.items()))
    last = STAGES.index(args.stop_after)
    for name in cfg.backbones:
        fit_backbone(name, data, cfg, accelerator, run_dir, args.resume)
        if last >= 1 and not (args.resume and (run_dir / name / METRICS_FILE).is_file()):
            evaluate_backbone(name, cfg, data, accelerator, run_dir)
        accelerator.wait_for_everyone()
    # the other processes leave now: rank 0's minutes of analysis, export and push would outlast the 10-minute
    # timeout of an NCCL barrier they waited at
    main_process = accelerator.is_main_process
    accelerator.end_training()
    if not main_process or last < 2:
        return 0
    return finish_run(cfg, data, run_dir, export=last >= 3, push_prefix=args.push_to_hub, keep_finished=args.resume)


if __name__ == "__main__":
    sys.exit(main())
