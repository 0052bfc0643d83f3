"""Backbone registry (timm name -> Grad-CAM target layer) and model creation with pretrained init."""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch

from .config import ModelConfig
from .transfer import without_xet

logger = logging.getLogger(__name__)

# Where each family's last spatial feature map lives: the layer Grad-CAM explains.
# ResNet: last block of layer4; EfficientNet: the head conv's norm+act; ConvNeXt: the last stage.
TARGET_LAYERS = {
    "resnet": "layer4.-1",
    "efficientnet": "bn2",
    "convnext": "stages.-1",
}


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights could not be obtained."""


def family(model_name: str) -> str:
    for prefix in TARGET_LAYERS:
        if model_name.startswith(prefix) or model_name.startswith(f"tf_{prefix}"):
            return prefix
    raise KeyError(f"no Grad-CAM target layer registered for {model_name!r}; "
                   f"known families: {sorted(TARGET_LAYERS)}")


def target_layer(model: torch.nn.Module, model_name: str) -> torch.nn.Module:
    """The module whose activations Grad-CAM uses for this backbone."""
    module = model
    for part in TARGET_LAYERS[family(model_name)].split("."):
        module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
    return module


def create_backbone(model_name: str, num_classes: int, cfg: ModelConfig) -> torch.nn.Module:
    """A timm model with a fresh `num_classes` head, initialised from a local file, the Hub, or at random."""
    if not timm.is_model(model_name.split(".")[0]):
        raise ValueError(f"unknown timm model {model_name!r}; see timm.list_models()")
    kwargs = dict(num_classes=num_classes, drop_rate=cfg.drop_rate)
    if model_name in cfg.pretrained_files:
        path = Path(cfg.pretrained_files[model_name]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--pretrained-files {model_name}={path}: the file does not exist")
        # timm loads the file and drops the 1000-class head when num_classes differs
        model = timm.create_model(model_name, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
        logger.info("%s: initialised from %s", model_name, path)
        return _small_head(model)
    if not cfg.pretrained:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    try:
        with without_xet():
            return _small_head(timm.create_model(model_name, pretrained=True, **kwargs))
    except Exception as exc:  # offline, no cache, or no pretrained tag for this name
        raise PretrainedWeightsError(
            f"could not get ImageNet weights for {model_name!r} from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). Either pass --pretrained-files {model_name}=PATH with a local "
            "weights file (e.g. efficientnet_lite0=../shared/weights/efficientnet_lite0.in1k.safetensors), "
            "or --no-pretrained to start from random weights.") from exc


def _small_head(model: torch.nn.Module) -> torch.nn.Module:
    """Start the new classifier near zero on top of pretrained features. timm's EfficientNet head init
    (uniform, range 1/sqrt(num_classes)) gave a first-step loss of 7.5 (ln 7 = 1.95) on HAM10000 with
    EfficientNet-Lite0, and those gradients flow into the pretrained backbone."""
    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.trunc_normal_(head.weight, std=0.01)
        torch.nn.init.zeros_(head.bias)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
