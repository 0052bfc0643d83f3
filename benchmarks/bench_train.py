"""How fast train.py's fit loop trains, against a bare timm + torch loop on the same model, batch and images,
measured in one run:

    (a) the fit loop: train.py's loaders (JPEG decoding and the training augmentation in DataLoader workers),
        Accelerate's prepare and dermadetect.engine.train_one_epoch;
    (b) a bare loop over the same images decoded and transformed once beforehand (tensors in memory): forward,
        weighted cross-entropy, backward, AdamW step.
Prints one JSON line: images/s of both and a / b. Target: >= 0.9.

    python benchmarks/bench_train.py [--config configs/cpu.yaml] [--backbone efficientnet_lite0] [--images 640]
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

    model, optimizer = fresh_model()
    train_tf, eval_tf, _ = build_transforms(model, cfg.data)
    # one untimed step first: oneDNN builds its kernels for these shapes on the first pass, which would
    # otherwise be charged to whichever loop runs first
    size, batch = cfg.data.image_size, cfg.train.batch_size
    loss_fn(model(torch.randn(batch, 3, size, size)), torch.zeros(batch, dtype=torch.long)).backward()

    # (a) the fit loop, as train.py runs it
    model, optimizer = fresh_model()
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
    for i in range(0, len(pixels), batch):
        loss = loss_fn(model(pixels[i:i + batch]), labels[i:i + batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    bare_rate = len(pixels) / (time.perf_counter() - start)
    print(json.dumps({"backbone": args.backbone, "recipe": Path(args.config).name, "image_size": size,
                      "batch_size": batch, "images": len(pixels), "threads": torch.get_num_threads(),
                      "num_workers": cfg.data.num_workers, "shift_probability": cfg.data.shift_probability,
                      "fit_loop_images_per_s": round(fit_rate, 2), "bare_loop_images_per_s": round(bare_rate, 2),
                      "ratio_fit_to_bare": round(fit_rate / bare_rate, 3)}))


if __name__ == "__main__":
    main()
