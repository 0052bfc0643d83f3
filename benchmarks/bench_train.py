"""How fast train.py's fit loop trains, against a bare timm + torch loop on the same model, batch and images,
measured in one run:

    (a) the fit loop: train.py's loaders (JPEG decoding and the training augmentation in DataLoader workers),
        Accelerate's prepare and dermadetect.engine.train_one_epoch;
    (b) a bare loop over the same images decoded and transformed once beforehand (tensors in memory): forward,
        weighted cross-entropy, backward, AdamW step.
Prints one JSON line: images/s of both and a / b. Target: >= 0.9.

    python benchmarks/bench_train.py [--backbone efficientnet_lite0] [--image-size 160] [--batch-size 32]
                                     [--images 320] [--num-workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from dermadetect.config import RunConfig, replace_nested  # noqa: E402
from dermadetect.data import build_transforms, load_lesion_data  # noqa: E402
from dermadetect.engine import TrainerState, make_accelerator, train_one_epoch  # noqa: E402
from dermadetect.models import create_backbone  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=320, help="training images (whole batches)")
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    data_root = os.environ.get("DERMADETECT_DATA")
    if not data_root:
        raise SystemExit("set DERMADETECT_DATA to the folder holding ham10000-224/")
    cfg = replace_nested(RunConfig(), backbones=(args.backbone,), data={
        "data_dir": str(Path(data_root) / "ham10000-224"), "image_size": args.image_size,
        "max_train_samples": args.images, "num_workers": args.num_workers},
        model={"pretrained": False}, train={"batch_size": args.batch_size, "epochs": 1, "class_weighting": "sqrt"})
    data = load_lesion_data(cfg.data, seed=cfg.train.seed)
    accelerator = make_accelerator(cfg.train)

    def fresh_model():
        torch.manual_seed(0)
        model = create_backbone(args.backbone, len(data.label_names), cfg.model)
        return model, create_optimizer_v2(model, opt="adamw", lr=cfg.train.lr, weight_decay=0.05,
                                          filter_bias_and_bn=True)

    weight = torch.tensor(train.class_weights(data.labels("train"), len(data.label_names), "sqrt"),
                          dtype=torch.float32)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)

    # (a) the fit loop, as train.py runs it
    model, optimizer = fresh_model()
    train_tf, eval_tf, _ = build_transforms(model, cfg.data)
    loader, _ = train.make_loaders(data, train_tf, eval_tf, cfg)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=1, updates_per_epoch=len(loader),
                                       step_on_epochs=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    stats = train_one_epoch(model, loader, optimizer, scheduler, loss_fn, accelerator, TrainerState(), None)
    fit_rate = stats["train_images"] / stats["train_seconds"]

    # (b) bare: the same images through the same augmentation once, then only the arithmetic is timed
    pixels = torch.stack([train_tf(im.convert("RGB")) for im in data.splits["train"]["image"]])
    labels = torch.as_tensor(data.labels("train"))
    model, optimizer = fresh_model()
    model.train()
    start = time.perf_counter()
    for i in range(0, len(pixels), args.batch_size):
        loss = loss_fn(model(pixels[i:i + args.batch_size]), labels[i:i + args.batch_size])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    bare_rate = len(pixels) / (time.perf_counter() - start)
    print(json.dumps({"backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size,
                      "images": len(pixels), "threads": torch.get_num_threads(), "num_workers": args.num_workers,
                      "fit_loop_images_per_s": round(fit_rate, 2), "bare_loop_images_per_s": round(bare_rate, 2),
                      "ratio_fit_to_bare": round(fit_rate / bare_rate, 3)}))


if __name__ == "__main__":
    main()
