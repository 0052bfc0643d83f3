"""Shared fixtures: the real HAM10000 data from DERMADETECT_DATA, and small run folders built from it."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file

from dermadetect.config import DEFAULT_BACKBONES

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path | None:
    value = os.environ.get("DERMADETECT_DATA")
    return Path(value).expanduser().resolve() if value else None


@pytest.fixture(scope="session")
def ham224() -> Path:
    """../shared/data/ham10000-224 (train/ and test/ with metadata.csv)."""
    root = data_root()
    # CI must test on the real images: there a missing data folder fails instead of skipping
    missing = pytest.fail if os.environ.get("CI") else pytest.skip
    if root is None:
        missing("DERMADETECT_DATA is not set: point it at the shared data folder (it holds ham10000-224/)")
    path = root / "ham10000-224"
    if not (path / "train" / "metadata.csv").is_file():
        missing(f"DERMADETECT_DATA={root} has no ham10000-224/train/metadata.csv")
    return path


def guard_features_by_hooks(model, pixels) -> np.ndarray:
    """What the guard scores, read the long way: the penultimate features from forward_features and
    forward_head, then the spatial mean of each of the last two feature stages' outputs, caught by forward
    hooks on the modules timm's feature_info names."""
    import torch

    caught = []
    handles = [model.get_submodule(stage["module"]).register_forward_hook(lambda _, __, out: caught.append(out))
               for stage in model.feature_info[-2:]]
    try:
        with torch.no_grad():
            pre_logits = model.forward_head(model.forward_features(pixels), pre_logits=True)
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat([pre_logits] + [out.mean(dim=(2, 3)) for out in caught], dim=1).numpy()


def read_metadata(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_predictions(path: Path) -> tuple[list[dict], list[str], np.ndarray, np.ndarray]:
    """A predictions CSV that train.py wrote: its rows, the label names, labels and probabilities."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    names = [k[len("prob_"):] for k in rows[0] if k.startswith("prob_")]
    labels = np.array([names.index(r["label"]) for r in rows])
    probs = np.array([[float(r[f"prob_{n}"]) for n in names] for r in rows])
    return rows, names, labels, probs


def write_metadata(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def pick_rows(rows: list[dict], per_class: int) -> list[dict]:
    """The first `per_class` rows of every class, in file order."""
    taken: dict[str, int] = {}
    picked = []
    for row in rows:
        if taken.get(row["dx"], 0) < per_class:
            taken[row["dx"]] = taken.get(row["dx"], 0) + 1
            picked.append(row)
    return picked


def make_imagefolder(src: Path, dst: Path, per_class_train: int, per_class_test: int) -> Path:
    """A small imagefolder copy of ham10000-224 (images linked, not copied) with every class in both splits."""
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        (dst / split).mkdir(parents=True)
        rows = pick_rows(read_metadata(src / split / "metadata.csv"), per_class)
        for row in rows:
            (dst / split / row["file_name"]).symlink_to(src / split / row["file_name"])
        write_metadata(dst / split / "metadata.csv", rows)
    return dst


# marmal88/skin_cancer (the Hub's HAM10000) labels rows with these words, not with the HAM10000 codes
SKIN_CANCER_WORDS = {"akiec": "actinic_keratoses", "bcc": "basal_cell_carcinoma", "bkl": "benign_keratosis-like_lesions",
                     "df": "dermatofibroma", "mel": "melanoma", "nv": "melanocytic_Nevi", "vasc": "vascular_lesions"}
SKIN_CANCER_FEATURES = {"image": {"_type": "Image"}, "image_id": "string", "lesion_id": "string", "dx": "string",
                        "dx_type": "string", "age": "float64", "sex": "string", "localization": "string"}


def write_skin_cancer_repo(image_dir: Path, rows: list[dict], dst: Path) -> Path:
    """A dataset repo laid out and typed as marmal88/skin_cancer (main at bdd59e1): parquet shards as
    `datasets` pushed them in 2023 (data/<split>-0000k-of-0000n-<hash>.parquet, images embedded), a README.md
    with dataset_info (features, split sizes) but no `configs`, so the splits come from the file names, the raw
    HAM10000_metadata.csv beside them, word labels, and splits that share rows as the published ones do
    (13,354 rows for 10,015 images)."""
    import hashlib

    import datasets
    import yaml

    features = datasets.Features.from_dict({name: kind if isinstance(kind, dict) else {"dtype": kind, "_type": "Value"}
                                            for name, kind in SKIN_CANCER_FEATURES.items()})
    (dst / "data").mkdir(parents=True)
    n = len(rows)
    splits = []
    for split, (start, stop), shards in (("train", (0, int(n * 0.8)), 5), ("validation", (int(n * 0.6), n), 2),
                                         ("test", (int(n * 0.5), n), 1)):
        part = rows[start:stop]
        size = 0
        shards = min(shards, len(part))
        for k in range(shards):
            shard = part[k * len(part) // shards:(k + 1) * len(part) // shards]
            table = datasets.Dataset.from_dict({
                "image": [{"bytes": (image_dir / r["file_name"]).read_bytes(), "path": None} for r in shard],
                "image_id": [r["image_id"] for r in shard], "lesion_id": [r["lesion_id"] for r in shard],
                "dx": [SKIN_CANCER_WORDS[r["dx"]] for r in shard], "dx_type": [r["dx_type"] for r in shard],
                "age": [float(r["age"]) if r["age"] else None for r in shard], "sex": [r["sex"] for r in shard],
                "localization": [r["localization"] for r in shard]}, features=features)
            staged = dst / "data" / f"{split}.staged"
            size += table.to_parquet(str(staged))
            digest = hashlib.sha256(staged.read_bytes()).hexdigest()[:16]
            staged.rename(dst / "data" / f"{split}-{k:05d}-of-{shards:05d}-{digest}.parquet")
        splits.append({"name": split, "num_bytes": float(size), "num_examples": len(part)})
    columns = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
    with open(dst / "HAM10000_metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([r[c] for c in columns] for r in rows)
    card = {"dataset_info": {"features": [{"name": name, "dtype": "image" if isinstance(kind, dict) else kind}
                                          for name, kind in SKIN_CANCER_FEATURES.items()], "splits": splits}}
    (dst / "README.md").write_text(f"---\n{yaml.safe_dump(card, sort_keys=False)}---\n# Dataset Card for \"skin_cancer\"\n")
    return dst


def run_train(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """train.py in a fresh process, as a user runs it."""
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, capture_output=True,
                            text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


SMALL_RUN = ("--config", str(REPO / "configs" / "smoke.yaml"))  # 64 px, random init, few resamples and ROAD images


@pytest.fixture(scope="session")
def small_data(ham224, tmp_path_factory):
    """About 100 real training images (every class) and 42 test images."""
    return make_imagefolder(ham224, tmp_path_factory.mktemp("data") / "ham", per_class_train=15,
                            per_class_test=6)


@pytest.fixture(scope="session")
def guard_photos(ham224, tmp_path_factory) -> Path:
    """Twelve real phone photos of skin (clinical-photos, PAD-UFES-20) for the out-of-distribution guard."""
    source = ham224.parent / "clinical-photos"
    files = sorted(source.glob("*.jpg"))[::9]
    if len(files) < 12:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{source} lacks the clinical photos")
    folder = tmp_path_factory.mktemp("guard-photos")
    for f in files:
        (folder / f.name).symlink_to(f)
    return folder


@pytest.fixture(scope="session")
def smoke_run(small_data, guard_photos, tmp_path_factory):
    """All three default backbones, random init, 64 px, 8 steps: every artifact a run writes."""
    out = tmp_path_factory.mktemp("runs") / "smoke"
    run_train(*SMALL_RUN, "--data-dir", str(small_data), "--backbones", *DEFAULT_BACKBONES, "--output-dir", str(out),
              "--epochs", "2", "--guard-photos", str(guard_photos))
    return out


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """A served-model folder without data or training: an untrained ConvNeXtV2-atto at 64 px written by the
    export's own writers, with every post-hoc setting switched on (8 views, temperature, class-balanced call,
    melanoma flag, a guard on synthetic features) and three synthetic example images. Its guard threshold
    never flags: what the guard flags is tested on the bundled model, whose guard saw real images."""
    import timm
    import torch
    from PIL import Image, ImageDraw

    from dermadetect.config import DataConfig
    from dermadetect.data import build_transforms
    from dermadetect.hub import export_for_hub
    from dermadetect.labels import HAM10000_CLASSES
    from dermadetect.pipeline import write_examples
    from dermadetect.posthoc import DermoscopyGuard, PostHocSettings, guard_width

    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", num_classes=len(HAM10000_CLASSES)).eval()
    _, _, data_config = build_transforms(model, DataConfig(image_size=64))
    prior = (0.033, 0.051, 0.110, 0.011, 0.111, 0.670, 0.014)  # HAM10000's class shares
    settings = PostHocSettings(temperature=1.4, tta_views=8, class_prior=prior, adjustment_strength=0.5,
                               melanoma_threshold=0.15, ood_threshold=1e6)
    export = export_for_hub(model, "convnextv2_atto", HAM10000_CLASSES, data_config,
                            tmp_path_factory.mktemp("tiny") / "export", settings)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(70, guard_width(model)))
    guard = DermoscopyGuard.fit(features, np.arange(70) % len(HAM10000_CLASSES), features,
                                rng.normal(1.0, size=(30, guard_width(model))), penultimate=model.head_hidden_size)
    guard.threshold = settings.ood_threshold
    guard.save(export)
    examples = []
    for i, label in enumerate(("bkl", "mel", "nv")):
        image = Image.new("RGB", (120, 90), (205, 160, 140))
        ImageDraw.Draw(image).ellipse((30 + 5 * i, 20, 90, 70), fill=(110 - 30 * i, 70, 50))
        examples.append((image, label, f"synthetic-{label}"))
    write_examples(export, examples)
    return export


DATA_FIXTURES = {"ham224", "small_data", "guard_photos", "smoke_run", "full_data", "originals", "straight_run"}
TRAINING_FIXTURES = {"smoke_run", "straight_run"}
TRAINING_MODULES = {"test_train", "test_online_path"}  # they run train.py themselves


def pytest_collection_modifyitems(items):
    """Tier every test by what it needs: real data, training runs."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & DATA_FIXTURES:
            item.add_marker(pytest.mark.data)
        if names & TRAINING_FIXTURES or item.module.__name__ in TRAINING_MODULES:
            item.add_marker(pytest.mark.slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """`python app.py` of `folder` in its own process, as a Space runs it; the page's config and the API over HTTP."""

    def __init__(self, env: dict, folder: Path = REPO):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/"
        self.process = subprocess.Popen([sys.executable, str(folder / "app.py"), "--port", str(port)], cwd=folder,
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"app.py exited with {self.process.returncode}:\n{self.process.stdout.read()}")
            try:
                self.config = json.loads(urllib.request.urlopen(self.url + "config", timeout=5).read())
                break
            except OSError:
                assert time.time() < deadline, "app.py did not come up in 5 minutes"
                time.sleep(0.2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=60)

    def text(self, elem_id: str) -> str:
        return " ".join(str(c["props"].get("value")) for c in self.config["components"]
                        if c["props"].get("elem_id") == elem_id)

    def examples(self) -> list[str]:
        return [sample[0]["path"] for c in self.config["components"] if c["type"] == "dataset"
                for sample in c["props"]["samples"]]

    def predict(self, image: str):
        return Client(self.url, verbose=False).predict(handle_file(image), api_name="/predict")


def served_model(app: App) -> str:
    """The model id the page names: `ORG/NAME@COMMIT` or `bundled: NAME`."""
    return app.text("model-info").split("`")[1]
