"""Training and evaluation steps on an Accelerator; the only module of the package that imports accelerate."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed  # noqa: F401  (re-exported for train.py)
from tqdm.auto import tqdm

from .config import TrainConfig
from .posthoc import forward_views

STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    # Accelerate only sets up a CPU process group (gloo) when told it runs on the CPU; without this, a
    # `torchrun --nproc_per_node 2` on a machine with no GPU runs two independent single-process jobs.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # a seedable sampler makes each epoch's order a function of (seed, epoch), so --resume repeats it exactly
    return Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision,
                       gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed))


@dataclass
class TrainerState:
    """What --resume needs beyond the model/optimizer state: progress, best checkpoint, history."""
    epoch: int = 0                      # epochs completed
    global_step: int = 0                # optimizer steps taken
    best_metric: float = -1.0
    best_epoch: int = 0
    train_seconds: float = 0.0
    train_images: int = 0
    history: list[dict] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__, indent=1))

    @classmethod
    def load(cls, path: Path) -> "TrainerState":
        return cls(**json.loads(path.read_text()))


def start_epoch(loader, epoch: int) -> None:
    """The epoch of a prepared loader's shuffle and of its images' augmentation seeds (`data.LabelledImages`).
    Accelerate's set_epoch passes it on to the dataset only when the sampler has no set_epoch of its own, which
    holds for one process and not for several."""
    loader.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)


def train_one_epoch(model, loader, optimizer, scheduler, loss_fn, accelerator: Accelerator,
                    state: TrainerState, max_steps: int | None) -> dict[str, float]:
    """Epoch `state.epoch` of the training loader; returns mean loss, images seen and seconds on this process's
    view, with the loss averaged across processes."""
    start_epoch(loader, state.epoch)
    model.train()
    total_loss = torch.zeros((), device=accelerator.device)
    batches, images = 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {state.epoch + 1}: train", leave=False, disable=not accelerator.is_main_process)
    for inputs, targets in bar:
        with accelerator.accumulate(model):
            loss = loss_fn(model(inputs), targets)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            state.global_step += 1
            scheduler.step_update(num_updates=state.global_step)
        total_loss += loss.detach()
        batches += 1
        images += targets.numel()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if max_steps and state.global_step >= max_steps:
            break
    seconds = time.perf_counter() - start
    mean_loss = accelerator.reduce(total_loss / max(batches, 1), reduction="mean").item()
    all_images = int(accelerator.reduce(torch.tensor(images, device=accelerator.device), reduction="sum"))
    return {"train_loss": mean_loss, "train_images": all_images, "train_seconds": seconds,
            "lr": optimizer.param_groups[0]["lr"]}


@torch.inference_mode()
def collect_outputs(model, loader, accelerator: Accelerator, views: int = 1, desc: str = "eval") -> dict[str, np.ndarray]:
    """The one evaluation pass: logits of every view (N, views, C), the guard's features of view 0 (N, W; the
    first `penultimate` of them the penultimate features) and labels (N,) of a prepared loader, on the
    accelerator's device, gathered from every process without duplicates. Every metric, calibration and
    threshold is derived from these arrays."""
    model.eval()
    network = accelerator.unwrap_model(model)  # forward_intermediates/forward_head live on the timm module
    logits, features, labels = [], [], []
    bar = tqdm(loader, desc=f"{desc} x {views} view(s)", leave=False, disable=not accelerator.is_main_process)
    for pixels, targets in bar:
        with accelerator.autocast():
            _, z, f = forward_views(network, pixels, views)
        z, f, targets = accelerator.gather_for_metrics((z.float().contiguous(), f.float().contiguous(), targets))
        logits.append(z.cpu())
        features.append(f.cpu())
        labels.append(targets.cpu())
    return {"logits": torch.cat(logits).numpy(), "features": torch.cat(features).numpy(),
            "labels": torch.cat(labels).numpy(), "penultimate": np.array(network.head_hidden_size)}


def save_checkpoint(accelerator: Accelerator, state: TrainerState, backbone_dir: Path) -> None:
    """Accelerate state (model, optimizer, RNGs, sampler) plus the trainer state, written to a temporary
    folder and renamed, so that a run killed mid-save still has the previous checkpoint."""
    final = backbone_dir / STATE_DIR
    partial = backbone_dir / f"{STATE_DIR}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        state.save(partial / TRAINER_STATE)
        previous = backbone_dir / f"{STATE_DIR}.old"
        if final.exists():
            final.rename(previous)
        partial.rename(final)
        if previous.exists():
            shutil.rmtree(previous)
    accelerator.wait_for_everyone()


def latest_state_dir(backbone_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    for folder in (STATE_DIR, f"{STATE_DIR}.old"):  # .old: killed between the two renames of save_checkpoint
        if (backbone_dir / folder / TRAINER_STATE).is_file():
            return backbone_dir / folder
    return None


def read_trainer_state(backbone_dir: Path) -> TrainerState | None:
    """The saved progress alone (no model or optimizer state), or None when there is none."""
    folder = latest_state_dir(backbone_dir)
    return TrainerState.load(folder / TRAINER_STATE) if folder else None


def load_checkpoint(accelerator: Accelerator, backbone_dir: Path) -> TrainerState | None:
    """Restore the latest saved state (model, optimizer, RNGs), or None when there is none."""
    folder = latest_state_dir(backbone_dir)
    if folder is None:
        return None
    accelerator.load_state(str(folder))
    return TrainerState.load(folder / TRAINER_STATE)
