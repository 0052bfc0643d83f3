"""Model folders in timm's Hugging Face format: export them, and load them from a folder or `hf-hub:ORG/NAME[@REV]`.

A folder holds `config.json` (architecture, num_classes, label_names, label_descriptions and the
pretrained_cfg that reproduces the eval transform) and `model.safetensors`. Nothing else is loaded: no pickle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import yaml
import httpx2  # huggingface_hub's HTTP client: its transport errors mean "no answer"
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token, hf_hub_download, snapshot_download
from huggingface_hub import constants as hub_constants
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.errors import (HFValidationError, HfHubHTTPError, LocalEntryNotFoundError,
                                   RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
from safetensors import SafetensorError
from timm.data import resolve_model_data_config
from timm.models import get_pretrained_cfg, save_for_hf

from .labels import readable_name
from .posthoc import OOD_FILE, DermoscopyGuard, PostHocSettings, SettingsError
from .transfer import without_xet

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HUB_PREFIX = "hf-hub:"
# what a model folder holds that the Predictor and the app read: weights, settings, OOD detector, card, examples
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, OOD_FILE, "README.md", "analysis.json", "examples.json", "examples/*")
HUB_TIMEOUT = 5.0  # seconds for the first request to the Hub, which normally answers in well under a second
EXPORT_LICENSE = "cc-by-nc-4.0"   # the terms of the training data (HAM10000)
EXPORT_TAG = "ham10000"
# What a Space runs the demo from (README.md is its card and settings, linking to docs/); with the bundled model
SPACE_FILES = ("README.md", "LICENSE", "app.py", "requirements.txt", "dermadetect/*.py", "docs/*.md")

logger = logging.getLogger(__name__)


class ModelSourceError(RuntimeError):
    """A model folder or Hub repo that cannot be used; the message says why and what to do."""


class HubRepoMissing(ModelSourceError):
    """The Hub answered: no such repo (or a private one without a token)."""


class HubUnreachable(ModelSourceError):
    """The Hub did not answer (or HF_HUB_OFFLINE=1) and the local cache lacks the model."""


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    architecture: str
    label_names: tuple[str, ...]
    data_config: dict
    folder: Path
    source: str
    config: dict
    settings: PostHocSettings
    ood: DermoscopyGuard | None


def export_for_hub(model: torch.nn.Module, architecture: str, label_names, data_config: dict,
                   out_dir: str | Path, settings: PostHocSettings) -> Path:
    """Write model.safetensors and config.json (timm's format, with the post-hoc settings under "dermadetect")
    so that the Predictor and `timm.create_model("local-dir:...", pretrained=True)` rebuild the same model and
    eval transform."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_config = {"label_names": list(label_names),
                    "label_descriptions": {name: readable_name(name) for name in label_names},
                    # these weights' own terms and name, not those of the ImageNet checkpoint they started from
                    "pretrained_cfg": {"license": EXPORT_LICENSE, "tag": EXPORT_TAG},
                    "dermadetect": settings.to_json()}
    keep = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    save_for_hf(model, str(out_dir), model_config=model_config, safe_serialization=True,
                data_config={k: data_config[k] for k in keep if k in data_config})
    config = json.loads((out_dir / CONFIG_FILE).read_text())
    if config["architecture"] != architecture.split(".")[0]:
        raise ValueError(f"exported architecture {config['architecture']} is not {architecture}")
    return out_dir


def resolve_folder(source: str) -> tuple[Path, str]:
    """A local folder, or the Hub cache snapshot of `hf-hub:ORG/NAME[@REVISION]` (downloaded if needed), and how to
    name it: the folder, or the repo at the commit it resolved to."""
    if source.startswith(HUB_PREFIX):
        folder, source = _snapshot(*_hub_ref(source))
    else:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise ModelSourceError(f"model folder {folder} does not exist; pass a folder with {CONFIG_FILE} and "
                                   f"{WEIGHTS_FILE}, or hf-hub:ORG/NAME[@REVISION]")
    if not (folder / WEIGHTS_FILE).is_file():
        raise ModelSourceError(f"{source} has no {WEIGHTS_FILE}: only safetensors weights are loaded")
    if not (folder / CONFIG_FILE).is_file():
        raise ModelSourceError(f"{source} has no {CONFIG_FILE} (timm's model config)")
    return folder, str(source if source.startswith(HUB_PREFIX) else folder)


BUSY_STATUSES = (408, 429)  # a timeout or rate limit: the Hub is out of reach for now, as with a 5xx


def _out_of_reach(exc: Exception) -> bool:
    """No answer, or an answer that means "not now" (5xx, 408, 429), from the Hub or from its storage (the CDN
    that serves the weights), as opposed to an answer about the request itself (a refused token, a missing repo)."""
    if isinstance(exc, httpx2.TransportError):
        return True
    status = exc.response.status_code if isinstance(exc, HfHubHTTPError) else None
    return status is not None and (status >= 500 or status in BUSY_STATUSES)


@without_xet()
def _snapshot(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """The model folder of a Hub repo (only MODEL_FILES: a repo may hold more) through huggingface_hub's cache.
    One request with a short timeout asks the Hub first; when the Hub or its storage is out of reach, the cache is
    used, as with HF_HUB_OFFLINE=1, and nothing is retried. The cache remembers where the revision pointed (for
    the next time the Hub is out of reach) only once that commit's folder is complete."""
    where = f"{repo_id}@{revision or 'main'}"
    if hub_constants.HF_HUB_OFFLINE:
        return _cached_snapshot(repo_id, revision, where)
    try:
        commit = HfApi().repo_info(repo_id, revision=revision, timeout=HUB_TIMEOUT).sha
        # by commit: asked for a branch, huggingface_hub points the cache's ref at the new commit before fetching
        # its files, and a pull cut short (outage, kill, full disk) would leave later offline starts nothing
        folder = snapshot_download(repo_id, revision=commit, allow_patterns=list(MODEL_FILES))
    except LocalEntryNotFoundError:  # the connection dropped after the first answer
        return _cached_snapshot(repo_id, revision, where)
    except RepositoryNotFoundError as exc:
        raise HubRepoMissing(f"repo {repo_id} does not exist on the Hub, or is private (set HF_TOKEN)") from exc
    except RevisionNotFoundError as exc:
        raise ModelSourceError(f"revision {revision!r} does not exist in {repo_id}; pin a commit or tag that "
                               "does, or drop @REVISION to use main") from exc
    except HFValidationError as exc:
        raise ModelSourceError(f"{repo_id!r} is not a Hub repo id: expected hf-hub:ORG/NAME[@REVISION]") from exc
    except (httpx2.HTTPError, HfHubHTTPError) as exc:
        if _out_of_reach(exc):
            logger.info("the Hub did not answer for %s (%s): serving the local cache", where, exc)
            return _cached_snapshot(repo_id, revision, where)
        if isinstance(exc, HfHubHTTPError):  # the Hub answered: a refused token, a disabled repo...
            raise ModelSourceError(f"the Hub refused {where} (HTTP {exc.response.status_code}: "
                                   f"{exc.server_message or exc}); check HF_TOKEN") from exc
        raise HubUnreachable(f"the download of {where} broke off ({type(exc).__name__}); try again") from exc
    _remember(repo_id, revision or "main", commit)
    return Path(folder), f"{HUB_PREFIX}{repo_id}@{Path(folder).name}"


def _remember(repo_id: str, revision: str, commit: str) -> None:
    """Point the cache's refs/<revision> at a complete commit, atomically (huggingface_hub's documented layout)."""
    if revision == commit:
        return
    ref = Path(hub_constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    partial = ref.with_name(f"{ref.name}.{os.getpid()}.partial")
    partial.write_text(commit)
    os.replace(partial, ref)


def _cached_snapshot(repo_id: str, revision: str | None, where: str) -> tuple[Path, str]:
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(MODEL_FILES),
                                   local_files_only=True)
    except LocalEntryNotFoundError as exc:
        why = "HF_HUB_OFFLINE=1 is set" if hub_constants.HF_HUB_OFFLINE else "the Hub is not reachable"
        raise HubUnreachable(f"cannot get {where}: {why} and it is not in the local cache. Connect once to fill "
                             "the cache, or pass a local model folder instead") from exc
    return Path(folder), f"{HUB_PREFIX}{repo_id}@{Path(folder).name}"


def load_model(source: str) -> LoadedModel:
    """Build the model described by a model folder or Hub repo, with its labels and eval data config."""
    folder, described = resolve_folder(source)
    again = ("push the export again, or delete this repo from the Hugging Face cache if only the copy here is "
             "damaged" if described.startswith(HUB_PREFIX) else "copy the whole exported folder again")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"{described}: {CONFIG_FILE} cannot be read ({exc}); {again}") from exc
    if not isinstance(config, dict):
        raise ModelSourceError(f"{described}: {CONFIG_FILE} is not a timm model config; {again}")
    for key in ("label_names", "architecture"):
        if not config.get(key):
            raise ModelSourceError(f"{described}: {CONFIG_FILE} has no {key}; {again}")
    try:
        settings = PostHocSettings.from_json(config.get("dermadetect"), f"{described}: {CONFIG_FILE}")
    except SettingsError as exc:
        raise ModelSourceError(str(exc)) from exc
    ood = None
    if settings.ood_threshold is not None:
        ood_path = folder / OOD_FILE
        if not ood_path.is_file():
            raise ModelSourceError(f"{described}: {CONFIG_FILE} sets an out-of-distribution threshold but "
                                   f"{OOD_FILE} is missing; copy the whole exported folder")
        try:
            ood = DermoscopyGuard.load(ood_path, settings.ood_threshold)
        except SettingsError as exc:
            raise ModelSourceError(f"{described}: {exc}") from exc
        except (OSError, SafetensorError) as exc:
            raise ModelSourceError(f"{described}: {OOD_FILE} cannot be read ({exc}); {again}") from exc
    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except (OSError, SafetensorError) as exc:
        raise ModelSourceError(f"{described}: {WEIGHTS_FILE} cannot be read ({exc}); {again}") from exc
    except RuntimeError as exc:  # an architecture this timm does not know, or weights of other shapes
        raise ModelSourceError(f"{described}: this timm {timm.__version__} cannot build {config['architecture']} "
                               f"from its files ({exc}); {again}, or upgrade timm") from exc
    model.eval()
    if ood is not None:
        try:
            ood.check_network(model)
        except SettingsError as exc:
            raise ModelSourceError(f"{described}: {OOD_FILE}: {exc}; export the model again with this version "
                                   "(`python -m dermadetect evaluate RUN`, then `analyze` and `export`)") from exc
    return LoadedModel(model=model, architecture=config["architecture"],
                       label_names=tuple(config["label_names"]), data_config=resolve_model_data_config(model),
                       folder=folder, source=described, config=config, settings=settings, ood=ood)


def _hub_ref(source: str) -> tuple[str, str | None]:
    """hf-hub:ORG/NAME[@REVISION] -> (repo id, revision or None)."""
    repo_id, _, revision = source[len(HUB_PREFIX):].partition("@")
    return repo_id, revision or None


# ---------------------------------------------------------------- model card

CARD_METRICS = (("balanced_accuracy", "Balanced accuracy"), ("accuracy", "Accuracy"), ("f1_macro", "Macro F1"),
                ("roc_auc_macro", "Macro ROC-AUC"), ("melanoma_sensitivity", "Melanoma sensitivity"),
                ("melanoma_specificity", "Melanoma specificity"))


def model_card(metrics: dict, run_info: dict, repo_id: str | None = None) -> ModelCard:
    """The model card (README.md) of one trained backbone, from its metrics.json and the run's config.json.
    Every number in it is read from those files."""
    backbone = metrics["backbone"]
    label_names = run_info["label_names"]
    config = run_info["config"]
    test = metrics["test"]
    hub_dataset = config["data"]["dataset"]
    hub_start = config["model"]["pretrained"] and backbone not in config["model"]["pretrained_files"]
    base_model = getattr(get_pretrained_cfg(backbone), "hf_hub_id", None) if hub_start else None
    data = ModelCardData(
        license="cc-by-nc-4.0", library_name="timm", pipeline_tag="image-classification",
        tags=["dermatology", "medical", "skin-lesion", "image-classification", "timm", "grad-cam"],
        datasets=[hub_dataset] if hub_dataset else None, base_model=base_model,
        model_name=repo_id or f"dermadetect-{backbone}",
        eval_results=[EvalResult(task_type="image-classification", task_name="Skin lesion classification",
                                 dataset_type=hub_dataset or "imagefolder", dataset_name=metrics["test_split"],
                                 dataset_split="test", metric_type=key, metric_name=name, metric_value=test[key])
                      for key, name in CARD_METRICS if test.get(key) is not None])
    load_id = f"hf-hub:{repo_id}" if repo_id else "local-dir:PATH/TO/THIS/FOLDER"
    init = metrics["init"]
    sizes = run_info["split_sizes"]
    per_class = "\n".join(
        f"| {readable_name(n)} | {_num(test.get(f'precision/{n}'))} | {_num(test.get(f'recall/{n}'))} | "
        f"{_num(test.get(f'f1/{n}'))} | {_num(test.get(f'roc_auc/{n}'))} | {int(test.get(f'support/{n}') or 0)} |"
        for n in label_names)
    summary = "\n".join(f"| {name} | {_num(metrics['validation'].get(key))} | {_num(test.get(key))} |"
                        for key, name in CARD_METRICS)
    command = " ".join(run_info.get("command", []))
    # the command may name a config file that stays on the training machine: the card carries what it resolved to
    settings = yaml.safe_dump(config, sort_keys=False)
    body = f"""
# DermaDetect {backbone}

> **DermaDetect assists; it never diagnoses.** This model is a research tool. Only a clinician who examines
> the lesion can make a diagnosis. Do not use it to decide whether to see a doctor.

## What it is
A timm `{backbone}` image classifier fine-tuned on dermoscopy images to tell {len(label_names)} kinds of skin
lesion apart: {", ".join(readable_name(n) for n in label_names)}.
Initialisation: {init}. It ships with its labels and its eval preprocessing in `config.json`, so it loads with
`timm.create_model("{load_id}", pretrained=True)` or DermaDetect's `Predictor("{load_id.replace('local-dir:', '')}")`,
which also draws a Grad-CAM of what the model looked at.

## Intended use
Research and teaching on dermoscopy image classification and its explanations; comparing backbones; a demo
that shows how such a classifier behaves, including where it fails.

## Out-of-scope use
- Diagnosis, triage or any clinical decision, for anyone.
- Ordinary photos of skin (phone snapshots, clinical close-ups without a dermatoscope): the model has only seen
  dermoscopy images and its outputs on other pictures mean nothing.
- Lesion types outside the {len(label_names)} classes above, and populations the data does not represent (below).

## Training data and split protocol
- Source: `{hub_dataset or Path(config['data']['data_dir']).name}` (HAM10000); test split: {metrics['test_split']}.
- Split sizes: train {sizes['train']}, validation {sizes['validation']}, test {sizes['test']} images.
- Train and validation are cut from the training data **by lesion** (no lesion in two splits; stratified by
  diagnosis). The checkpoint (best epoch {metrics['best_epoch']} of {metrics['epochs_run']}) was chosen on
  validation balanced accuracy; the test split was scored once, at the end.
- Recipe: {config['train']['epochs']} epochs, batch {config['train']['batch_size']}, {config['train']['optimizer']}
  lr {config['train']['lr']}, weight decay {config['train']['weight_decay']}, {config['train']['scheduler']} schedule,
  label smoothing {config['train']['label_smoothing']}, class weighting {config['train']['class_weighting']},
  input {metrics['data_config']['input_size'][1]} px, evaluated and served with timm's crop_pct
  {metrics['data_config']['crop_pct']} (the share of the resized image kept; the checkpoint was chosen with the
  backbone's own).
- Command: `{command}`. Every setting it resolved to, as a `--config` file for `train.py`:

<details><summary>run settings (YAML)</summary>

```yaml
{settings}```
</details>

## Results
| metric | validation | test |
| --- | --- | --- |
{summary}

Per class, on the test split:

| class | precision | recall | F1 | ROC-AUC | images |
| --- | --- | --- | --- | --- | --- |
{per_class}

{analysis_section(metrics.get("analysis"), metrics.get("pictures"))}
## Limitations and bias
- HAM10000 comes from clinics in Austria (Vienna) and Australia (Queensland); most patients have light skin,
  and the data has no skin-type labels, so performance on darker skin is unknown.
- {len(label_names)} classes only; rare lesions are few (e.g. dermatofibroma and vascular lesions), so their
  numbers above are noisy.
- The test images were resized to {metrics['data_config']['input_size'][1]} px; scores on full-resolution images
  or other dermatoscopes may differ.
{robustness_section(metrics.get("robustness"))}
## Licence and citation
The weights are released under CC BY-NC 4.0 (non-commercial, attribution), the terms of the training data.
`examples.json` lists one test image per class ({metrics['test_split']}), shipped under `examples/` on the Hub
(the copy bundled in the code repository reads them from the data instead): HAM10000 and ISIC 2018 images,
CC BY-NC 4.0, by the authors cited here. Cite the data:
- Tschandl P., Rosendahl C., Kittler H. The HAM10000 dataset, a large collection of multi-source dermatoscopic
  images of common pigmented skin lesions. Sci. Data 5, 180161 (2018). doi:10.1038/sdata.2018.161
- Codella N. et al. Skin Lesion Analysis Toward Melanoma Detection 2018: A Challenge Hosted by the ISIC.
  arXiv:1902.03368 (2019).
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def guard_checks(ood: dict, pictures: list[dict] | None = None) -> str:
    """What the guard flags beyond the test set: the non-dermoscopic pictures and, where it was fitted with
    photos of skin, those photos, each held out of the guard's fit by cross-validation; and, where the served
    model was benchmarked on them (benchmarks/bench_pictures.py), everyday pictures it was never fitted on."""
    photos = f"{len(ood['photos'])} non-dermoscopic pictures (samples shipped with Python packages)"
    held = ood.get("cross_validated")
    if held is None:  # the Mahalanobis guard of runs analysed before schema 2 was fitted without the pictures
        return (f"{ood['photos_flagged']:.0%} of {photos}; AUROC test vs pictures {ood['auroc_test_vs_photos']:.3f} "
                f"(energy score: {ood['auroc_energy_test_vs_photos']:.3f}).")
    line = (f"{held['photos_flagged']:.0%} of {photos}, each scored by a guard fitted without it "
            f"({held['folds']}-fold cross-validation)")
    skin = ood["skin_photos"]
    if skin:
        line += (f"; {held['skin_photos_flagged']:.0%} of {skin['photos']} photos of skin taken without a "
                 f"dermatoscope ({Path(skin['folder']).name}, {skin['lesions']} lesions, cross-validated by lesion; "
                 f"AUROC against validation images {held['auroc_validation_vs_skin_photos']:.3f})")
    if ood.get("unseen_clinics"):
        line += ("; dermoscopy from a clinic the guard has not seen (each clinic's validation images, scored by a "
                 "guard fitted and thresholded without that clinic): " +
                 ", ".join(f"{clinic} {r['flagged']:.0%} of {r['validation_images']}"
                           for clinic, r in ood["unseen_clinics"].items()))
    every = pictures[-1] if pictures else {}
    if every.get("threshold") == ood["threshold"] and every["pictures"]:  # measured with this guard, not an older
        line += (f"; {every['flagged_share']:.1%} of {every['pictures']} everyday pictures it was never fitted on "
                 "(wallpapers and cut-out animals, objects and symbols from Debian's artwork packages, as uploads "
                 "through the served model: `benchmarks/bench_pictures.py`)")
    return line + "."


def robustness_markdown(rows: list[dict]) -> str:
    """The robustness benchmark's rows (benchmarks/bench_robustness.py) as a table, each condition's balanced
    accuracy next to its change from the clean images."""
    clean = next((r for r in rows if r["condition"] == "clean"), None)
    lines = ["| condition | balanced accuracy | change | melanoma sensitivity | ECE | flagged not dermoscopy |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        sens, flag = r.get("melanoma_sensitivity"), r.get("ood_flagged")
        change = "n/a" if clean is None else format(r["balanced_accuracy"] - clean["balanced_accuracy"], "+.3f")
        lines.append(f"| {r['condition']} | {r['balanced_accuracy']:.3f} | {change} | "
                     f"{'n/a' if sens is None else f'{sens:.3f}'} | {r['ece']:.3f} | "
                     f"{'n/a' if flag is None else f'{flag:.1%}'} |")
    return "\n".join(lines)


def robustness_section(robustness: dict | None) -> str:
    """The Limitations section's account of the upload shifts: the robustness benchmark on the test set."""
    if not robustness:
        return ("- How the model holds up on uploads (lower resolution, JPEG, other aspect, colour cast, blur, "
                "rotation) was not measured\n  for this card (benchmarks/bench_robustness.py).\n")
    return f"""- Uploads differ from the test images: the {robustness['rows'][0]['images']} test images under the fixed
  shifts of `benchmarks/bench_robustness.py`, everything served applied (the call, the melanoma threshold,
  calibrated probabilities, the guard); "change" is against the clean images.

{robustness_markdown(robustness['rows'])}
"""


def analysis_section(analysis: dict | None, pictures: list[dict] | None = None) -> str:
    """The card's account of what was fitted after training (all on validation) and what it gives on test."""
    if not analysis:
        return ""
    ci = analysis["bootstrap"]["test"]
    mel = analysis["melanoma_operating_point"]
    cal = analysis["calibration"]["test"]
    ood = analysis["ood"]
    rows = "\n".join(f"| {name} | {ci[key]['value']:.3f} | {ci[key]['low']:.3f} to {ci[key]['high']:.3f} |"
                     for key, name in (("balanced_accuracy", "Balanced accuracy"), ("accuracy", "Accuracy"),
                                       ("f1_macro", "Macro F1"), ("roc_auc_macro", "Macro ROC-AUC"),
                                       ("melanoma_sensitivity_at_threshold", "Melanoma sensitivity at threshold"),
                                       ("melanoma_specificity_at_threshold", "Melanoma specificity at threshold"))
                     if key in ci)
    recalls = ", ".join(f"{key.split('/', 1)[1]} {v['value']:.2f} ({v['low']:.2f}-{v['high']:.2f})"
                        for key, v in ci.items() if key.startswith("recall/"))
    groups = "\n".join(
        f"| {column} | {g['group']} | {g['images']} | {g['accuracy']:.3f} | {g['balanced_accuracy']:.3f} | "
        f"{g['melanomas']} | {_num(g['melanoma_sensitivity'])} |"
        for column, entries in analysis["subgroups"].items() for g in entries)
    tta = analysis["tta"]
    decision = analysis["decision"]
    tried = "; ".join(f"{s}: {v:.3f}" for s, v in decision["validation_balanced_accuracy"].items())
    argmax, final = decision["test_argmax"], analysis["test_final"]
    change = ", ".join(f"{label} {_num(argmax[key])} -> {_num(final[key])}" for key, label in (
        ("balanced_accuracy", "balanced accuracy"), ("accuracy", "accuracy"), ("f1_macro", "macro F1")))
    decision_line = f"""- Decision: the class with the highest log P(class) - {decision['strength']:g} * log(its share of the
  training images), which weighs the rarer classes up; the strength was chosen on validation balanced accuracy
  (s {tried}). On test, plain argmax -> this decision: {change} (more of the common class is called something
  else). The probabilities themselves are unchanged."""
    return f"""
## Calibrated, with a class-balanced decision, a melanoma operating point and an out-of-distribution guard
Fitted after training on the validation split only; the test split was scored once. `config.json` carries them
under `dermadetect`, and DermaDetect's `Predictor` applies them.
- Test-time augmentation ({tta['views']} views: {tta['transforms']}): {"used" if tta['used'] else "not used"}
  (validation balanced accuracy {tta['validation_balanced_accuracy']['without']:.3f} without,
  {tta['validation_balanced_accuracy']['with']:.3f} with). Test balanced accuracy {_num(tta['test_without']['balanced_accuracy'])}
  without, {_num(tta['test_with']['balanced_accuracy'])} with.
- Temperature scaling: T = {analysis['temperature']:.3f}. Test expected calibration error (15 bins)
  {cal['before']['ece']:.3f} before, {cal['after']['ece']:.3f} after; NLL {cal['before']['nll']:.3f} -> {cal['after']['nll']:.3f}.
{decision_line}
- Melanoma operating point: flag when P(melanoma) >= {mel['threshold']:.3f}, the threshold that gives
  sensitivity >= {mel['target_sensitivity']} on validation ({_num(mel['validation']['sensitivity'])}). On test: sensitivity
  {_num(mel['test']['sensitivity'])}, specificity {_num(mel['test']['specificity'])}, PPV {_num(mel['test']['ppv'])},
  NPV {_num(mel['test']['npv'])} (TP {mel['test']['tp']}, FP {mel['test']['fp']}, TN {mel['test']['tn']}, FN {mel['test']['fn']}).
- Out-of-distribution guard: {ood['method']}; an image scoring above {ood['threshold']:.2f}
  ({ood['threshold_rule']}) is flagged as probably not a dermoscopy image. Flagged: {ood['test_flagged']:.1%} of
  test images; {guard_checks(ood, pictures)}

Test metrics of the calibrated model and its decision with 95% bootstrap intervals ({analysis['bootstrap']['resamples']} resamples of
lesions):

| metric | value | 95% interval |
| --- | --- | --- |
{rows}

Recall per class (95% interval): {recalls}.

Subgroups of the test split (calibrated model and its decision; balanced accuracy over the classes present in the group):

| by | group | images | accuracy | balanced accuracy | melanomas | melanoma sensitivity |
| --- | --- | --- | --- | --- | --- | --- |
{groups}
"""


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def served_balanced_accuracy(model_dir: Path) -> float:
    """The test balanced accuracy of a model folder's served call, from the analysis it ships with."""
    return float(json.loads((Path(model_dir) / "analysis.json").read_text())["test_final"]["balanced_accuracy"])


def published_model(api: HfApi, repo_id: str) -> tuple[float | None, str | None]:
    """(served test balanced accuracy from analysis.json, commit) of repo_id's main: (None, None) without a repo,
    (None, commit) without a model. Read at that commit, asked for now: a cached copy may be older."""
    try:
        commit = api.model_info(repo_id).sha
    except RepositoryNotFoundError:
        return None, None
    try:
        path = hf_hub_download(repo_id, "analysis.json", revision=commit)
    except RemoteEntryNotFoundError:
        return None, commit
    try:
        return served_balanced_accuracy(Path(path).parent), commit
    except (ValueError, KeyError, TypeError) as exc:
        raise HubPushError(f"{repo_id}'s analysis.json has no served test balanced accuracy to compare with "
                           f"({type(exc).__name__}: {exc}); pass --force to replace its model") from exc


@without_xet()
def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, force: bool = False) -> str:
    """Create the repo if needed and make its main the folder (files it lacks are deleted); returns the commit
    URL. A published model that serves a higher test balanced accuracy is kept unless `force`; the upload names
    the commit it compared with, so a push in between makes it fail rather than be overwritten. Token: HF_TOKEN
    or the login cache."""
    if get_token() is None:
        raise HubPushError(f"no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push {folder} "
                           f"to {repo_id} again (the local export is complete)")
    api = HfApi()
    try:
        new = served_balanced_accuracy(folder)
        old, parent = (None, None) if force else published_model(api, repo_id)
        if old is not None and new < old:
            raise HubPushError(f"{repo_id} serves test balanced accuracy {old:.3f}, above this export's {new:.3f}: "
                               "not pushed (the local export is complete). Push it with `python -m dermadetect "
                               "export RUN --push-to-hub PREFIX --force` to replace the published model anyway")
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), delete_patterns="*",
                                   parent_commit=parent,
                                   commit_message=f"Upload DermaDetect model from {Path(folder).parent.name}")
    except HubPushError:
        raise
    except Exception as exc:  # the local folder is intact either way
        raise write_refused(exc, repo_id) or HubPushError(
            f"could not push {folder} to {repo_id} ({type(exc).__name__}: {exc}); the local export is complete, "
            "push it again later") from exc
    return commit.commit_url


def write_refused(exc: Exception, repo_id: str) -> HubPushError | None:
    """The error to raise when the Hub refused the token the right to write (401, 403): retrying cannot help."""
    if not (isinstance(exc, HfHubHTTPError) and exc.response.status_code in (401, 403)):
        return None
    return HubPushError(f"the Hub refused to write to {repo_id} (HTTP {exc.response.status_code}: "
                        f"{exc.server_message or exc}): use a token (HF_TOKEN or `hf auth login`) with write access "
                        f"to {repo_id.split('/')[0]}")


def example_images(folder: Path) -> list[Path]:
    """The images a model folder's examples.json lists that exist: under its examples/ (exports on the Hub), else
    among the test images of DERMADETECT_DATA (the bundled model carries no dataset images)."""
    listing = folder / "examples.json"
    if not listing.is_file():
        return []
    test_images = Path(os.environ.get("DERMADETECT_DATA", "")).expanduser() / "ham10000-224" / "test"
    paths = []
    for entry in json.loads(listing.read_text()):
        name = Path(str(entry["file"])).name  # a bare name: a listing must not point outside examples/
        shipped = folder / "examples" / name
        paths.append(shipped if shipped.is_file() else test_images / name)
    return [path for path in paths if path.is_file()]


@without_xet()
def deploy_space(space_id: str, repo: Path, model: str | None = None, private: bool = False) -> str:
    """Make a Gradio Space's main exactly the demo: SPACE_FILES, the bundled model and its example images, with
    the binaries in the Hub's LFS/Xet storage (a git push of this repository is refused for its binary files).
    `model` (hf-hub:ORG/NAME[@REV], checked on the Hub first) becomes the Space variable DERMADETECT_MODEL; without
    it the variable stays as it is. Returns the commit URL."""
    if model is not None and not model.startswith(HUB_PREFIX):
        raise HubPushError(f"--model {model}: a Space serves a model from the Hub; give {HUB_PREFIX}ORG/NAME[@REV]")
    if get_token() is None:
        raise HubPushError(f"no Hugging Face token: set HF_TOKEN or run `hf auth login`, then deploy {space_id} again")
    bundled = min((repo / "models").glob("dermadetect-*"), default=None)
    if bundled is None or not (repo / "app.py").is_file():
        raise HubPushError(f"{repo} is not a DermaDetect checkout with a bundled model (models/dermadetect-*)")
    try:
        listed = json.loads((bundled / "examples.json").read_text()) if (bundled / "examples.json").is_file() else []
        examples = example_images(bundled)
    except (ValueError, TypeError, KeyError) as exc:
        raise HubPushError(f"{bundled}/examples.json is damaged ({exc}); publish the bundled model again") from exc
    if len(examples) < len(listed):
        raise HubPushError(f"the bundled model lists {len(listed)} example images and {len(examples)} were found: "
                           "set DERMADETECT_DATA to the folder holding ham10000-224/, whose test images they are")
    api = HfApi()
    if model is not None:
        _check_space_model(api, model)
    with tempfile.TemporaryDirectory() as stage:
        stage = Path(stage)
        for path in sorted(p for pattern in SPACE_FILES for p in repo.glob(pattern)):
            (stage / path.relative_to(repo)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, stage / path.relative_to(repo))
        shutil.copytree(bundled, stage / "models" / bundled.name)
        (stage / "models" / bundled.name / "examples").mkdir(exist_ok=True)
        for image in examples:
            shutil.copy2(image, stage / "models" / bundled.name / "examples" / image.name)
        try:
            api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
            if model is not None:  # before the upload, so that the Space builds once, with it
                api.add_space_variable(space_id, "DERMADETECT_MODEL", model,
                                       description="the model the demo serves (app.py)")
            commit = api.upload_folder(repo_id=space_id, repo_type="space", folder_path=str(stage),
                                       delete_patterns="*", commit_message="Deploy the DermaDetect demo")
        except Exception as exc:  # network, permissions, metadata the Hub refuses
            raise write_refused(exc, space_id) or HubPushError(
                f"could not deploy the demo to the Space {space_id} ({type(exc).__name__}: {exc})") from exc
    return commit.commit_url


def _check_space_model(api: HfApi, model: str) -> None:
    """A Space whose DERMADETECT_MODEL is not on the Hub fails to start: refuse it before anything changes."""
    repo_id, revision = _hub_ref(model)
    try:
        info = api.model_info(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise HubPushError(f"{model} is not on the Hub, or this token cannot read it: push the model first "
                           "(python -m dermadetect export RUN --push-to-hub ORG/PREFIX)") from exc
    except Exception as exc:
        raise HubPushError(f"could not check {model} on the Hub ({type(exc).__name__}: {exc})") from exc
    if info.private:
        logger.warning("%s is private: the Space reads it only with an HF_TOKEN secret that can read it "
                       "(the Space's settings)", model)


class HubPushError(RuntimeError):
    """Uploading to the Hub failed; the local export is complete."""
