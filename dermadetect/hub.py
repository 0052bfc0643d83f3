"""Model folders in timm's Hugging Face format: export them, and load them from a folder or `hf-hub:ORG/NAME[@REV]`.

A folder holds `config.json` (architecture, num_classes, label_names, label_descriptions and the
pretrained_cfg that reproduces the eval transform) and `model.safetensors`. Nothing else is loaded: no pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RevisionNotFoundError
from timm.data import resolve_model_data_config
from timm.models import save_for_hf

from .labels import readable_name

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HUB_PREFIX = "hf-hub:"


class ModelSourceError(RuntimeError):
    """A model folder or Hub repo that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    architecture: str
    label_names: tuple[str, ...]
    data_config: dict
    folder: Path
    source: str
    config: dict


def export_for_hub(model: torch.nn.Module, architecture: str, label_names, data_config: dict,
                   out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write model.safetensors and config.json (timm's format) so that the Predictor and
    `timm.create_model("local-dir:...", pretrained=True)` rebuild the same model and eval transform."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_config = {"label_names": list(label_names),
                    "label_descriptions": {name: readable_name(name) for name in label_names}}
    if extra:
        model_config["dermadetect"] = extra
    keep = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    save_for_hf(model, str(out_dir), model_config=model_config, safe_serialization=True,
                data_config={k: data_config[k] for k in keep if k in data_config})
    config = json.loads((out_dir / CONFIG_FILE).read_text())
    if config["architecture"] != architecture.split(".")[0]:
        raise ValueError(f"exported architecture {config['architecture']} is not {architecture}")
    return out_dir


def update_export_config(out_dir: str | Path, **fields) -> None:
    """Add DermaDetect's own settings (CAM method, temperature, ...) under "dermadetect" in config.json."""
    path = Path(out_dir) / CONFIG_FILE
    config = json.loads(path.read_text())
    config.setdefault("dermadetect", {}).update(fields)
    path.write_text(json.dumps(config, indent=2))


def resolve_folder(source: str) -> tuple[Path, str]:
    """A local folder, or the Hub cache snapshot of `hf-hub:ORG/NAME[@REVISION]` (downloaded if needed)."""
    if not source.startswith(HUB_PREFIX):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ModelSourceError(f"model folder {folder} does not exist; pass a folder with {CONFIG_FILE} and "
                                   f"{WEIGHTS_FILE}, or hf-hub:ORG/NAME[@REVISION]")
        if not (folder / WEIGHTS_FILE).is_file():
            raise ModelSourceError(f"{folder} has no {WEIGHTS_FILE}: only safetensors weights are loaded")
        if not (folder / CONFIG_FILE).is_file():
            raise ModelSourceError(f"{folder} has no {CONFIG_FILE} (timm's model config)")
        return folder, str(folder)
    repo_id, _, revision = source[len(HUB_PREFIX):].partition("@")
    revision = revision or None
    config_path = _download(repo_id, CONFIG_FILE, revision)
    _download(repo_id, WEIGHTS_FILE, revision)
    return Path(config_path).parent, source


def _download(repo_id: str, filename: str, revision: str | None) -> str:
    """One file through huggingface_hub's cache (HF_HUB_OFFLINE=1 uses the cache only)."""
    where = f"{repo_id}@{revision or 'main'}"
    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except RevisionNotFoundError as exc:
        raise ModelSourceError(f"revision {revision!r} does not exist in {repo_id}; pin a commit or tag that "
                               "does, or drop @REVISION to use main") from exc
    except EntryNotFoundError as exc:
        raise ModelSourceError(f"{where} has no {filename}: only repos with safetensors weights and a timm "
                               f"{CONFIG_FILE} are loaded") from exc
    except LocalEntryNotFoundError as exc:
        raise ModelSourceError(
            f"cannot get {filename} of {where}: the Hub is not reachable and it is not in the local cache. "
            "Connect once to fill the cache, or pass a local model folder instead") from exc


def load_model(source: str) -> LoadedModel:
    """Build the model described by a model folder or Hub repo, with its labels and eval data config."""
    folder, described = resolve_folder(source)
    config = json.loads((folder / CONFIG_FILE).read_text())
    if not config.get("label_names"):
        raise ModelSourceError(f"{described}: {CONFIG_FILE} has no label_names")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    model.eval()
    return LoadedModel(model=model, architecture=config["architecture"],
                       label_names=tuple(config["label_names"]), data_config=resolve_model_data_config(model),
                       folder=folder, source=described, config=config)
