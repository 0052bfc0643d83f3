"""The path the product exists for, end to end against the local Hub and nothing mocked above HTTP:
marmal88/skin_cancer through `datasets` -> timm's ImageNet weights through `pretrained=True` -> configs/gpu.yaml
(sizes overridden only) -> export -> push -> `python app.py` pulls the pushed ConvNeXtV2 and answers over HTTP;
then pinned to a commit, and offline from the cache."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import timm
import torch
from timm.models import save_for_hf

from conftest import REPO, App, data_root, run_train, served_model, write_skin_cancer_repo
from local_hub import LocalHub, client_env

# the repos configs/gpu.yaml's backbones resolve to with pretrained=True (their default tags in timm 1.0)
TIMM_REPOS = {"resnet18": "timm/resnet18.a1_in1k", "efficientnet_b0": "timm/efficientnet_b0.ra_in1k",
              "convnextv2_nano": "timm/convnextv2_nano.fcmae_ft_in22k_in1k"}
DATASET = "marmal88/skin_cancer"
PUBLISHED = "dermadetect/dermadetect-convnextv2_nano"  # app.py's default model
SEVEN = {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}


@pytest.fixture(scope="module")
def originals() -> Path:
    root = data_root()
    if root is None or not (root / "ham10000-originals" / "metadata.csv").is_file():
        pytest.fail("DERMADETECT_DATA with ham10000-originals/ is needed: the online path is tested on real images")
    return root / "ham10000-originals"


@pytest.fixture(scope="module")
def hub(originals, tmp_path_factory):
    """The Hub as a user with internet meets it: HAM10000 in marmal88's schema (600x450 originals, word labels,
    overlapping splits) and timm's ImageNet repos in timm's format (random weights: the path is under test)."""
    work = tmp_path_factory.mktemp("hub")
    with open(originals / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    dataset = write_skin_cancer_repo(originals, rows, work / "skin_cancer")
    with LocalHub() as hub:
        hub.add_repo(DATASET, {str(p.relative_to(dataset)): p for p in dataset.rglob("*") if p.is_file()},
                     repo_type="dataset")
        torch.manual_seed(0)
        for name, repo_id in TIMM_REPOS.items():
            save_for_hf(timm.create_model(name, pretrained=False), str(work / name), safe_serialization=True)
            hub.add_repo(repo_id, {"config.json": work / name / "config.json",
                                   "model.safetensors": work / name / "model.safetensors"})
        yield hub


def test_hub_dataset_and_weights_to_pushed_model_to_the_space(hub, originals, tmp_path):
    env = client_env(hub, tmp_path / "hf")

    # before anything is published the Hub answers 404: the page says so and serves the bundled model at once
    with App(env) as app:
        assert served_model(app).startswith("bundled: dermadetect-")
        assert f"The published model ({PUBLISHED}) is not on the Hub yet" in app.text("fallback-notice")

    run = tmp_path / "run"
    run_train("--config", str(REPO / "configs" / "gpu.yaml"), "--dataset", DATASET, "--output-dir", str(run),
              "--image-size", "64", "--epochs", "1", "--batch-size", "16", "--max-steps", "4", "--num-workers", "0",
              "--push-to-hub", "dermadetect/dermadetect", env=env, timeout=3600)

    # the data came from the dataset repo through datasets, the word labels became the seven codes
    data_requests = [path for method, path, status in hub.requests if path.startswith(f"/datasets/{DATASET}/")]
    assert any(path.endswith(".parquet") for path in data_requests)
    info = json.loads((run / "config.json").read_text())
    assert info["config"]["data"]["dataset"] == DATASET and info["config"]["data"]["data_dir"] is None
    assert set(info["label_names"]) == SEVEN
    with open(run / "splits.csv", newline="") as f:
        assert len({row["image_id"] for row in csv.DictReader(f)}) == 163  # overlapping splits pooled, once each
    for name, repo_id in TIMM_REPOS.items():
        # each backbone's ImageNet weights came from its timm repo (HEAD redirected to storage, then GET)
        assert ("HEAD", f"/{repo_id}/resolve/main/model.safetensors", 302) in hub.requests
        metrics = json.loads((run / name / "metrics.json").read_text())
        assert metrics["init"] == "ImageNet (timm, Hub)"
        card = hub.files(f"dermadetect/dermadetect-{name}")["README.md"].decode()
        assert f"base_model: {repo_id}" in card and f"- {DATASET}" in card
    pushed = hub.commits(PUBLISHED)[-1]
    metrics = json.loads((run / "convnextv2_nano" / "metrics.json").read_text())
    example = str(originals / "ISIC_0024306.jpg")

    # the Space's default source resolves to the pushed ConvNeXtV2: its card's numbers, its examples, answers
    with App(env) as app:
        assert served_model(app) == f"{PUBLISHED}@{pushed}" and not app.text("fallback-notice").strip()
        served = json.loads((run / "convnextv2_nano" / "analysis.json").read_text())["bootstrap"]["test"]
        assert f"balanced accuracy {served['balanced_accuracy']['value']:.3f}" in app.text("model-info")
        assert f"Balanced accuracy {metrics['test']['balanced_accuracy']:.3f}" in app.text("model-info")
        examples = app.examples()
        assert len(examples) == 7 and all("ISIC_" in Path(e).name for e in examples)
        chart, overlay, summary = app.predict(example)
        assert len(chart["confidences"]) == 7 and Path(overlay).stat().st_size > 1000
        assert "not a diagnosis" in summary

    # a later push moves main; a pinned revision keeps serving the commit it names
    hub.add_repo(PUBLISHED, {"README.md": hub.files(PUBLISHED)["README.md"] + b"\nA later card.\n"})
    with App({**env, "DERMADETECT_MODEL": f"hf-hub:{PUBLISHED}@{pushed}"}) as app:
        assert served_model(app) == f"{PUBLISHED}@{pushed}"
    with App(env) as app:
        assert served_model(app) == f"{PUBLISHED}@{hub.commits(PUBLISHED)[-1]}"

    # offline: the cache serves main as last seen, with its card and examples
    hub.stop()
    with App({**env, "HF_HUB_OFFLINE": "1"}) as app:
        assert served_model(app) == f"{PUBLISHED}@{hub.commits(PUBLISHED)[-1]}"
        assert "as this page serves it" in app.text("model-info") and len(app.examples()) == 7
        assert len(app.predict(example)[0]["confidences"]) == 7
