"""How fast train.py's fit loop trains, against a bare timm + torch loop on the same model, batch and images,
measured in one run:

    (a) the fit loop: train.py's loaders (JPEG decoding and the training augmentation in-process, shared with
        helper processes), Accelerate's prepare and dermadetect.engine.train_one_epoch;
    (b) a bare loop over the same images decoded and transformed once beforehand (tensors in memory): forward,
        weighted cross-entropy, backward, AdamW step.
The two loops alternate step by step (each batch the fit loop takes is preceded by one timed bare step, whose
time is taken off the fit loop's), so that a machine whose speed drifts, as shared machines do within
seconds, slows both alike. Prints one JSON line: images/s of both over all rounds, a / b, and a / b of each
round (one epoch of the fit loop); also the data work per image (one more epoch of its loader alone) and
the ratio it bounds a / b by, since the compute waits for each batch: bare / (bare + data) per image.
Target: >= 0.9. Recipes that load in DataLoader workers (the GPU ones) are refused: the workers would prepare
the fit loop's batches during the bare steps.

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
from dermadetect.data import batch_helpers, build_transforms, load_lesion_data  # noqa: E402
from dermadetect.engine import TrainerState, make_accelerator, start_epoch, train_one_epoch  # noqa: E402
from dermadetect.models import create_backbone  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu.yaml"),
                        help="the recipe whose data pipeline and loss are timed")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--images", type=int, default=640, help="training images (whole batches)")
    parser.add_argument("--rounds", type=int, default=3, help="epochs of the fit loop timed, after one untimed")
    args = parser.parse_args()
    data_root = os.environ.get("DERMADETECT_DATA")
    if not data_root:
        raise SystemExit("set DERMADETECT_DATA to the folder holding ham10000-224/")
    recipe = RunConfig.from_dict({**RunConfig().to_dict(), **yaml.safe_load(Path(args.config).read_text())})
    cfg = replace_nested(recipe, backbones=(args.backbone,), data={
        "data_dir": str(Path(data_root) / "ham10000-224"), "dataset": None, "max_train_samples": args.images},
        model={"pretrained": False}, train={"epochs": 1})
    if cfg.data.num_workers:
        raise SystemExit(f"{args.config} loads in {cfg.data.num_workers} DataLoader workers; this comparison "
                         "needs in-process loading (data.num_workers: 0), as the CPU recipe has")
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
    train_tf, eval_tf, _ = build_transforms(model, cfg.data, served_framing=False)
    # one untimed step first: oneDNN builds its kernels for these shapes on the first pass, which would
    # otherwise be charged to whichever loop runs first
    size, batch = cfg.data.image_size, cfg.train.batch_size
    loss_fn(model(torch.randn(batch, 3, size, size)), torch.zeros(batch, dtype=torch.long)).backward()

    # (a) the fit loop, as train.py runs it: one epoch of the training loader per round
    fit_model, fit_optimizer = fresh_model()
    loader, _ = train.make_loaders(data, train_tf, eval_tf, cfg)
    scheduler, _ = create_scheduler_v2(fit_optimizer, sched="cosine", num_epochs=args.rounds + 1,
                                       updates_per_epoch=len(loader), step_on_epochs=False)
    fit_model, fit_optimizer, loader = accelerator.prepare(fit_model, fit_optimizer, loader)
    state = TrainerState()

    # (b) bare: the same images through the same augmentation once, then only the arithmetic is timed
    pixels = torch.stack([train_tf(im.convert("RGB")) for im in data.splits["train"]["image"]])
    labels = torch.as_tensor(data.labels("train"))
    bare_model, bare_optimizer = fresh_model()
    bare_model.train()

    def bare_step(i: int) -> None:
        i = i * batch % len(pixels)
        loss = loss_fn(bare_model(pixels[i:i + batch]), labels[i:i + batch])
        loss.backward()
        bare_optimizer.step()
        bare_optimizer.zero_grad()

    interleaved = Interleaved(loader, bare_step)
    fit_seconds, bare_seconds, fit_images = [], [], []
    for _ in range(args.rounds + 1):
        interleaved.bare_seconds = 0.0
        stats = train_one_epoch(fit_model, interleaved, fit_optimizer, scheduler, loss_fn, accelerator, state, None)
        state.epoch += 1
        fit_seconds.append(stats["train_seconds"] - interleaved.bare_seconds)
        fit_images.append(stats["train_images"])
        bare_seconds.append(interleaved.bare_seconds)
    # the first epoch warms both loops up (allocations, the optimizers' state, the helpers' start)
    fit_seconds, bare_seconds, fit_images = fit_seconds[1:], bare_seconds[1:], fit_images[1:]
    fit_rate = sum(fit_images) / sum(fit_seconds)
    start_epoch(loader, state.epoch)  # the data work alone: one more epoch of the fit loop's loader, helpers warm
    start = time.perf_counter()
    for _ in loader:
        pass
    data_ms = (time.perf_counter() - start) * 1000 / len(loader.dataset)
    bare_rate = sum(fit_images) / sum(bare_seconds)  # one bare step of the same batch size per fit step
    per_round = [round(b / f, 3) for f, b in zip(fit_seconds, bare_seconds)]
    bare_ms = 1000 / bare_rate
    print(json.dumps({"backbone": args.backbone, "recipe": Path(args.config).name, "image_size": size,
                      "batch_size": batch, "images": len(pixels), "rounds": args.rounds,
                      "threads": torch.get_num_threads(), "batch_helpers": batch_helpers(),
                      "shift_probability": cfg.data.shift_probability,
                      "fit_loop_images_per_s": round(fit_rate, 2), "bare_loop_images_per_s": round(bare_rate, 2),
                      "ratio_fit_to_bare": round(fit_rate / bare_rate, 3),
                      "ratio_per_round": per_round, "data_ms_per_image": round(data_ms, 2),
                      "bare_ms_per_image": round(bare_ms, 2),
                      "ratio_bound": round(bare_ms / (bare_ms + data_ms), 3)}))


class Interleaved:
    """A prepared training loader that runs one bare step, timed into `bare_seconds`, before handing each batch
    to the fit loop."""

    def __init__(self, loader, bare_step):
        self.loader, self.bare_step, self.bare_seconds = loader, bare_step, 0.0
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            start = time.perf_counter()
            self.bare_step(i)
            self.bare_seconds += time.perf_counter() - start
            yield batch


if __name__ == "__main__":
    main()
