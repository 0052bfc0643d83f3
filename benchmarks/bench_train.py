"""How fast train.py's fit loop trains, against a bare timm + torch loop on the same model, batch and images,
measured in one run:

    (a) the fit loop: train.py's loaders (JPEG decoding and the training augmentation in DataLoader workers),
        Accelerate's prepare and dermadetect.engine.train_one_epoch;
    (b) a bare loop over the same images decoded and transformed once beforehand (tensors in memory): forward,
        weighted cross-entropy, backward, AdamW step.
The two loops alternate for --rounds rounds (a b a b ...), so that a machine whose speed drifts during the
run slows both alike. Prints one JSON line: images/s of both over all rounds, a / b, and a / b of each round;
also the data work per image (decoding and augmentation, timed in this process) and the ratio that bounds
a / b when the compute threads already use every core, as on 2 cores with 2 threads: bare / (bare + data) per
image. Target: >= 0.9.

    python benchmarks/bench_train.py [--config configs/cpu.yaml] [--backbone efficientnet_lite0] [--images 640]
                                     [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train  # noqa: E402
from dermadetect.config import RunConfig, replace_nested  # noqa: E402
from dermadetect.data import build_transforms, load_lesion_data  # noqa: E402
from dermadetect.engine import TrainerState, make_accelerator, train_one_epoch  # noqa: E402
from dermadetect.models import create_backbone  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"),
                        help="the recipe whose data pipeline and loss are timed")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--images", type=int, default=640, help="training images (whole batches)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two loops")
    args = parser.parse_args()
    data_root = os.environ.get("DERMADETECT_DATA")
    if not data_root:
        raise SystemExit("set DERMADETECT_DATA to the folder holding ham10000-224/")
    recipe = RunConfig.from_dict({**RunConfig().to_dict(), **yaml.safe_load(Path(args.config).read_text())})
    cfg = replace_nested(recipe, backbones=(args.backbone,), data={
        "data_dir": str(Path(data_root) / "ham10000-224"), "dataset": None, "max_train_samples": args.images},
        model={"pretrained": False}, train={"epochs": 1})
    data = load_lesion_data(cfg.data, seed=cfg.train.seed)
    accelerator = make_accelerator(cfg.train)

    def fresh_model():
        torch.manual_seed(0)
        model = create_backbone(args.backbone, len(data.label_names), cfg.model)
        return model, create_optimizer_v2(model, opt=cfg.train.optimizer, lr=cfg.train.lr,
                                          weight_decay=cfg.train.weight_decay, filter_bias_and_bn=True)

    weight = torch.tensor(train.class_weights(data.labels("train"), len(data.label_names), cfg.train.class_weighting),
                          dtype=torch.float32)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)

    model, _ = fresh_model()
    train_tf, eval_tf, _ = build_transforms(model, cfg.data)
    # one untimed step first: oneDNN builds its kernels for these shapes on the first pass, which would
    # otherwise be charged to whichever loop runs first
    size, batch = cfg.data.image_size, cfg.train.batch_size
    loss_fn(model(torch.randn(batch, 3, size, size)), torch.zeros(batch, dtype=torch.long)).backward()

    # (a) the fit loop, as train.py runs it: one epoch of the training loader per round
    fit_model, fit_optimizer = fresh_model()
    loader, _ = train.make_loaders(data, train_tf, eval_tf, cfg)
    scheduler, _ = create_scheduler_v2(fit_optimizer, sched="cosine", num_epochs=args.rounds,
                                       updates_per_epoch=len(loader), step_on_epochs=False)
    fit_model, fit_optimizer, loader = accelerator.prepare(fit_model, fit_optimizer, loader)
    state = TrainerState()

    # (b) bare: the same images through the same augmentation once, then only the arithmetic is timed
    start = time.perf_counter()
    pixels = torch.stack([train_tf(im.convert("RGB")) for im in data.splits["train"]["image"]])
    data_ms = (time.perf_counter() - start) * 1000 / len(pixels)  # decoding and augmentation, one process
    labels = torch.as_tensor(data.labels("train"))
    bare_model, bare_optimizer = fresh_model()
    bare_model.train()

    def bare_epoch() -> float:
        start = time.perf_counter()
        for i in range(0, len(pixels), batch):
            loss = loss_fn(bare_model(pixels[i:i + batch]), labels[i:i + batch])
            loss.backward()
            bare_optimizer.step()
            bare_optimizer.zero_grad()
        return time.perf_counter() - start

    fit_seconds, bare_seconds, fit_images = [], [], []
    for _ in range(args.rounds):
        stats = train_one_epoch(fit_model, loader, fit_optimizer, scheduler, loss_fn, accelerator, state, None)
        state.epoch += 1
        fit_seconds.append(stats["train_seconds"])
        fit_images.append(stats["train_images"])
        bare_seconds.append(bare_epoch())
    fit_rate = sum(fit_images) / sum(fit_seconds)
    bare_rate = len(pixels) * args.rounds / sum(bare_seconds)
    per_round = [round((n / f) / (len(pixels) / b), 3) for n, f, b in zip(fit_images, fit_seconds, bare_seconds)]
    # the compute threads keep every core busy, so each image's data work delays the step it feeds: the fit loop
    # can reach at most bare / (bare + data) of the bare rate on a machine with no spare core
    bare_ms = 1000 / bare_rate
    print(json.dumps({"backbone": args.backbone, "recipe": Path(args.config).name, "image_size": size,
                      "batch_size": batch, "images": len(pixels), "rounds": args.rounds,
                      "threads": torch.get_num_threads(), "num_workers": cfg.data.num_workers,
                      "shift_probability": cfg.data.shift_probability,
                      "fit_loop_images_per_s": round(fit_rate, 2), "bare_loop_images_per_s": round(bare_rate, 2),
                      "ratio_fit_to_bare": round(fit_rate / bare_rate, 3),
                      "ratio_per_round": per_round, "data_ms_per_image": round(data_ms, 2),
                      "bare_ms_per_image": round(bare_ms, 2),
                      "ratio_bound_without_spare_cores": round(bare_ms / (bare_ms + data_ms), 3)}))


if __name__ == "__main__":
    main()
