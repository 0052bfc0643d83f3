"""The data layer on real HAM10000 images: every source layout, the lesion-grouped split, bad-data handling."""

from __future__ import annotations

import collections
import csv
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from PIL import Image
from torch.utils.data import DataLoader

import train
from conftest import (REPO, make_imagefolder, pick_rows, read_metadata, run_train, write_metadata,
                      write_skin_cancer_repo)
from dermadetect.config import DataConfig, ModelConfig, RunConfig
from dermadetect.data import (BadDataError, LabelledImages, LesionLeakError, build_transforms, check_no_lesion_leak,
                              class_weights, collate, guard_photo_files, lesion_grouped_split, lesion_of,
                              load_lesion_data, yield_to_compute)
from dermadetect.engine import start_epoch
from dermadetect.hub import export_for_hub
from dermadetect.inference import Predictor
from dermadetect.labels import HAM10000_CLASSES
from dermadetect.models import create_backbone
from dermadetect.posthoc import PostHocSettings


@pytest.fixture()
def datasets_cache(tmp_path, monkeypatch):
    """A cache of its own: `datasets` keys a local repo folder by its name and card, not by its files."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


@pytest.fixture(scope="module")
def full_data(ham224):
    return load_lesion_data(DataConfig(data_dir=str(ham224)), seed=42)


def test_real_split_keeps_isic_test_and_separates_lesions(full_data, ham224):
    assert full_data.label_names == HAM10000_CLASSES
    test_ids = {r["image_id"] for r in read_metadata(ham224 / "test" / "metadata.csv")}
    assert set(full_data.splits["test"]["image_id"]) == test_ids  # the ISIC 2018 test set, untouched
    train_rows = read_metadata(ham224 / "train" / "metadata.csv")
    assert len(full_data.splits["train"]) + len(full_data.splits["validation"]) == len(train_rows)
    lesions = {s: set(t["lesion_id"]) for s, t in full_data.splits.items()}
    assert not lesions["train"] & lesions["validation"]
    assert not lesions["train"] & lesions["test"]
    assert not lesions["validation"] & lesions["test"]


def test_real_split_every_class_present_and_stratified(full_data):
    train = full_data.class_counts("train") / len(full_data.splits["train"])
    val = full_data.class_counts("validation") / len(full_data.splits["validation"])
    assert (full_data.class_counts("train") > 0).all()
    assert (full_data.class_counts("validation") > 0).all()
    np.testing.assert_allclose(val, train, atol=0.02)  # class shares within 2 points
    assert 0.12 < len(full_data.splits["validation"]) / (len(full_data.splits["train"]) +
                                                         len(full_data.splits["validation"])) < 0.18


def test_splits_csv_lists_exactly_the_tables(full_data, tmp_path):
    full_data.write_splits_csv(tmp_path / "splits.csv")
    with open(tmp_path / "splits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_split = collections.defaultdict(list)
    for row in rows:
        by_split[row["split"]].append((row["image_id"], row["lesion_id"], row["dx"]))
    for name, table in full_data.splits.items():
        assert by_split[name] == list(zip(table["image_id"], table["lesion_id"], table["dx"]))


def test_lesions_with_several_images_never_straddle_splits(ham224, tmp_path):
    """HAM10000 has up to 6 images per lesion; the shared copy has one, so group real images into lesions."""
    src = ham224 / "train"
    rows = sorted(pick_rows(read_metadata(src / "metadata.csv"), per_class=24), key=lambda r: r["dx"])
    rng = np.random.default_rng(0)
    (tmp_path / "train").mkdir()
    grouped, i = [], 0
    while i < len(rows):
        size = int(rng.integers(1, 5))
        group = [r for r in rows[i:i + size] if r["dx"] == rows[i]["dx"]]
        for row in group:
            grouped.append({**row, "lesion_id": f"L{i:05d}"})
            (tmp_path / "train" / row["file_name"]).symlink_to(src / row["file_name"])
        i += len(group)
    write_metadata(tmp_path / "train" / "metadata.csv", grouped)
    data = load_lesion_data(DataConfig(data_dir=str(tmp_path), val_fraction=0.2, test_fraction=0.2), seed=3)
    owners = collections.defaultdict(set)
    for name, table in data.splits.items():
        for lesion in table["lesion_id"]:
            owners[lesion].add(name)
    assert max(len(v) for v in owners.values()) == 1
    assert sum(len(t) for t in data.splits.values()) == len(grouped)
    assert max(collections.Counter(r["lesion_id"] for r in grouped).values()) > 1  # the case is exercised


def test_leak_check_raises():
    a = datasets.Dataset.from_dict({"lesion_id": ["L1", "L2"]})
    b = datasets.Dataset.from_dict({"lesion_id": ["L3", "L2"]})
    with pytest.raises(LesionLeakError, match="L2"):
        check_no_lesion_leak({"train": a, "validation": b})


def test_grouped_split_is_seeded():
    dx = ["a"] * 30 + ["b"] * 30
    lesions = [f"L{i // 2}" for i in range(60)]
    first = lesion_grouped_split(dx, lesions, 0.2, seed=1)
    again = lesion_grouped_split(dx, lesions, 0.2, seed=1)
    other = lesion_grouped_split(dx, lesions, 0.2, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not np.array_equal(first[1], other[1])


def test_split_seed_fixes_the_split_whatever_the_training_seed(small_data):
    def validation(seed, split_seed=None):
        data = load_lesion_data(DataConfig(data_dir=str(small_data), split_seed=split_seed), seed=seed)
        return sorted(data.splits["validation"]["image_id"])

    assert validation(7, split_seed=1) == validation(8, split_seed=1) == validation(1)
    assert validation(7) != validation(8)


def test_hub_dataset_in_skin_cancer_schema_is_pooled_and_resplit(ham224, tmp_path, datasets_cache):
    """marmal88/skin_cancer's layout, types and word labels (parquet splits that share images), through datasets."""
    rows = pick_rows(read_metadata(ham224 / "train" / "metadata.csv"), per_class=12)
    repo = write_skin_cancer_repo(ham224 / "train", rows, tmp_path / "skin_cancer")
    data = load_lesion_data(DataConfig(dataset=str(repo)), seed=0)
    ids = [i for t in data.splits.values() for i in t["image_id"]]
    assert sorted(ids) == sorted(r["image_id"] for r in rows)  # every image once: duplicates across splits dropped
    assert data.source.startswith("hub:")
    assert data.label_names == HAM10000_CLASSES  # the words became the codes
    truth = {r["image_id"]: r["dx"] for r in rows}
    assert all(truth[i] == dx for t in data.splits.values() for i, dx in zip(t["image_id"], t["dx"]))
    check_no_lesion_leak(data.splits)
    assert data.splits["train"][0]["image"].size == (224, 224)


def test_unknown_label_word_names_the_row_and_the_spellings(ham224, tmp_path, datasets_cache):
    rows = pick_rows(read_metadata(ham224 / "train" / "metadata.csv"), per_class=4)
    repo = write_skin_cancer_repo(ham224 / "train", rows, tmp_path / "skin_cancer")
    part = next((repo / "data").glob("train-00000-of-*.parquet"))  # rows[3] is in the first shard
    table = pq.read_table(part)
    dx = table.column("dx").to_pylist()
    dx[3] = "melanocytic_naevus"
    pq.write_table(table.set_column(table.schema.get_field_index("dx"), "dx", pa.array(dx)), part)
    with pytest.raises(BadDataError) as err:
        load_lesion_data(DataConfig(dataset=str(repo)), seed=0)
    message = str(err.value)
    assert f"image_id={rows[3]['image_id']}: unknown label 'melanocytic_naevus'" in message
    assert "melanocytic nevi" in message and "basal cell carcinoma" in message


def test_raw_ham10000_layout(ham224, tmp_path):
    rows = pick_rows(read_metadata(ham224 / "train" / "metadata.csv"), per_class=6)
    for i, row in enumerate(rows):
        part = tmp_path / f"HAM10000_images_part_{1 + i % 2}"
        part.mkdir(exist_ok=True)
        (part / row["file_name"]).symlink_to(ham224 / "train" / row["file_name"])
    write_metadata(tmp_path / "HAM10000_metadata.csv", [{k: v for k, v in r.items() if k != "file_name"}
                                                        for r in rows])
    data = load_lesion_data(DataConfig(data_dir=str(tmp_path), val_fraction=0.25, test_fraction=0.25), seed=0)
    assert data.source.startswith("ham10000-raw:")
    assert sum(len(t) for t in data.splits.values()) == len(rows)
    assert data.label_names == HAM10000_CLASSES


@pytest.mark.parametrize("names, label_names", [
    # the ISIC 9-class layout has classes HAM10000 lacks: its folder names stay the labels
    ({"mel": "melanoma", "nv": "nevus", "bkl": "seborrheic keratosis"},
     ("melanoma", "nevus", "seborrheic keratosis")),
    # folders that all name HAM10000 classes, in any spelling, become its codes
    ({"mel": "Melanoma", "nv": "melanocytic_Nevi", "bcc": "BCC"}, ("bcc", "mel", "nv"))])
def test_class_folders_warn_and_split_by_image(ham224, tmp_path, names, label_names):
    """Train/<class>/ and Test/<class>/, labels from the folder names."""
    for split, per_class in (("Train", 8), ("Test", 3)):
        rows = pick_rows(read_metadata(ham224 / "train" / "metadata.csv"), per_class=per_class + 8)
        for code, name in names.items():
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            chosen = [r for r in rows if r["dx"] == code]
            chosen = chosen[:per_class] if split == "Test" else chosen[per_class:per_class + 8]
            for row in chosen:
                (folder / row["file_name"]).symlink_to(ham224 / "train" / row["file_name"])
    with pytest.warns(UserWarning, match="no lesion ids"):
        data = load_lesion_data(DataConfig(data_dir=str(tmp_path), val_fraction=0.25), seed=0)
    assert data.label_names == label_names
    assert len(data.splits["test"]) == 9
    assert not data.grouped_by_lesion


@pytest.fixture()
def bad_folder(ham224, tmp_path):
    """A small imagefolder with one of each problem: truncated JPEG, missing file, unknown label, duplicate id,
    blank lesion id."""
    root = make_imagefolder(ham224, tmp_path / "bad", per_class_train=6, per_class_test=2)
    rows = read_metadata(root / "train" / "metadata.csv")
    truncated = root / "train" / rows[0]["file_name"]
    data = truncated.read_bytes()
    truncated.unlink()
    truncated.write_bytes(data[: len(data) // 2])
    (root / "train" / rows[1]["file_name"]).unlink()
    rows[2]["dx"] = "melanomaa"
    rows.append({**rows[3]})  # the same image_id twice
    rows[-2]["lesion_id"] = " "  # blank lesion ids would pool into one lesion
    write_metadata(root / "train" / "metadata.csv", rows)
    return root, rows


def test_bad_rows_give_one_clear_error(bad_folder):
    root, rows = bad_folder
    with pytest.raises(BadDataError) as err:
        load_lesion_data(DataConfig(data_dir=str(root)), seed=0)
    message = str(err.value)
    assert message.startswith("5 bad row(s)")
    assert f"image_id={rows[-2]['image_id']}: empty lesion_id" in message
    assert rows[0]["image_id"] in message and "unreadable image" in message
    assert rows[1]["image_id"] in message and "missing file" in message
    assert "unknown label 'melanomaa'" in message
    assert f"image_id={rows[3]['image_id']}: duplicate image_id" in message
    assert "--skip-bad-images" in message


@pytest.mark.parametrize("chunk", [256, 1])  # 1: a chunk per image, the row numbers must carry over
def test_skip_bad_images_drops_and_reports(bad_folder, chunk, monkeypatch):
    monkeypatch.setattr("dermadetect.data.VALIDATION_CHUNK", chunk)
    root, rows = bad_folder
    with pytest.warns(UserWarning, match=r"too few images of .*\(3\).* 4 folds"):
        data = load_lesion_data(DataConfig(data_dir=str(root), skip_bad_images=True, val_fraction=0.25), seed=0)
    assert sorted(b.image_id for b in data.dropped) == sorted(r["image_id"] for r in [*rows[:4], rows[-2]])
    kept = set(data.splits["train"]["image_id"]) | set(data.splits["validation"]["image_id"])
    assert not kept & {rows[0]["image_id"], rows[1]["image_id"], rows[2]["image_id"]}
    assert rows[3]["image_id"] in kept  # its first occurrence stays
    assert len(data.splits["train"]) + len(data.splits["validation"]) == len(rows) - 5


def test_error_listing_is_capped_at_twenty(ham224, tmp_path):
    root = make_imagefolder(ham224, tmp_path / "many", per_class_train=5, per_class_test=1)
    rows = read_metadata(root / "train" / "metadata.csv")
    for row in rows[:25]:
        row["dx"] = "unknown"
    write_metadata(root / "train" / "metadata.csv", rows)
    with pytest.raises(BadDataError) as err:
        load_lesion_data(DataConfig(data_dir=str(root)), seed=0)
    assert "... and 5 more" in str(err.value)
    assert str(err.value).count("unknown label") == 20


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(BadDataError, match="exactly one data source"):
        load_lesion_data(DataConfig(), seed=0)
    with pytest.raises(BadDataError, match="nope does not exist"):
        load_lesion_data(DataConfig(data_dir=str(tmp_path / "nope")), seed=0)
    shutil.rmtree(tmp_path)


def test_compact_copy_keeps_rows_and_pixels_and_loads_the_same(ham224, tmp_path):
    """`python -m dermadetect compact-copy`: WebP images of the same size and near-identical pixels, the same
    metadata rows, and the same lesion split when loaded."""
    source = make_imagefolder(ham224, tmp_path / "src", per_class_train=6, per_class_test=2)
    target = tmp_path / "compact"
    subprocess.run([sys.executable, "-m", "dermadetect", "compact-copy", str(source), str(target)], check=True,
                   cwd=REPO, capture_output=True)
    for split in ("train", "test"):
        before, after = read_metadata(source / split / "metadata.csv"), read_metadata(target / split / "metadata.csv")
        assert [{**r, "file_name": None} for r in before] == [{**r, "file_name": None} for r in after]
        for a, b in zip(before, after):
            with Image.open(source / split / a["file_name"]) as original, \
                    Image.open(target / split / b["file_name"]) as copy:
                assert copy.format == "WEBP" and copy.size == original.size
                diff = np.abs(np.asarray(copy.convert("RGB"), float) - np.asarray(original.convert("RGB"), float))
                assert diff.mean() < 4.0
    sizes = [sum(f.stat().st_size for f in (root / "train").iterdir()) for root in (source, target)]
    assert sizes[1] < 0.6 * sizes[0]  # stat() follows the source's links to the real JPEGs
    config = dict(val_fraction=0.25)
    a = load_lesion_data(DataConfig(data_dir=str(source), **config), seed=0)
    b = load_lesion_data(DataConfig(data_dir=str(target), **config), seed=0)
    for split in a.splits:
        assert a.splits[split]["image_id"] == b.splits[split]["image_id"]


def test_class_weights_by_hand():
    labels = np.array([0, 0, 0, 1])  # 4 images, 2 classes: inverse frequency 4 / (2 * count)
    np.testing.assert_allclose(class_weights(labels, 2, "balanced"), [2 / 3, 2])
    np.testing.assert_allclose(class_weights(labels, 2, "sqrt"), [np.sqrt(2 / 3), np.sqrt(2)])
    np.testing.assert_allclose(class_weights(labels, 2, "none"), [1, 1])
    np.testing.assert_allclose(class_weights(labels, 3, "balanced"), [2 / 3, 2, 1])  # absent class: weight 1
    with pytest.raises(ValueError, match="choose one of"):
        class_weights(labels, 2, "inverse")


def test_training_loader_shuffles_without_replacement(full_data):
    loader, _ = train.make_loaders(full_data, None, None, RunConfig(data=DataConfig(num_workers=0)))
    assert sorted(loader.sampler) == list(range(len(full_data.splits["train"])))


def test_eval_crop_pct_frames_the_served_transform_and_not_the_checkpoint_selection(tmp_path):
    """Lite0's own eval crop (timm crop_pct 0.875) cuts a 3% red border off; data.eval_crop_pct 1.0 keeps it in the
    evaluation and served transform and in the exported config, while the fit keeps selecting its checkpoint
    with the backbone's own crop. A crop outside (0, 1] is refused when the settings are read."""
    image = Image.new("RGB", (200, 200), (255, 0, 0))
    image.paste((128, 128, 128), (6, 6, 194, 194))
    red, grey = (1.0 - 0.485) / 0.229, (128 / 255 - 0.485) / 0.229  # channel 0 after ImageNet normalisation
    model = create_backbone("efficientnet_lite0", 7, ModelConfig(pretrained=False))
    cfg = DataConfig(image_size=64, eval_crop_pct=1.0)
    _, served, data_config = build_transforms(model, cfg)
    _, selection, _ = build_transforms(model, cfg, served_framing=False)
    _, own, own_config = build_transforms(model, DataConfig(image_size=64))
    assert own_config["crop_pct"] == 0.875 and data_config["crop_pct"] == 1.0
    corners = [(0, 0), (0, -1), (-1, 0), (-1, -1)]
    assert all(abs(served(image)[0][c].item() - red) < 0.3 for c in corners)
    for transform in (selection, own):
        assert all(abs(transform(image)[0][c].item() - grey) < 0.05 for c in corners)
    export = export_for_hub(model, "efficientnet_lite0", HAM10000_CLASSES, data_config, tmp_path, PostHocSettings())
    assert json.loads((export / "config.json").read_text())["pretrained_cfg"]["crop_pct"] == 1.0
    assert torch.equal(Predictor(str(export)).transform(image), served(image))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="eval_crop_pct is"):
            RunConfig.from_dict({"data": {"eval_crop_pct": bad}})


@pytest.mark.skipif(sys.platform != "linux", reason="batch helpers are forked processes: Linux only")
@pytest.mark.parametrize("processes", [1, 2])
def test_augmentations_are_the_same_with_any_number_of_loader_workers_or_helpers(full_data, processes, caplog):
    """Each image's augmentation is seeded by (seed, epoch, row), so an epoch's batches are the same with 0 or 2
    loader workers or with a helper process preparing part of each batch (a resumed run may use other counts),
    the epoch reaches the images whether Accelerate shards the loader over processes or not, another epoch draws
    others, and the caller's generators and thread count are left alone."""
    cfg = DataConfig(image_size=64, shift_probability=0.4)
    train_tf, _, _ = build_transforms(create_backbone("efficientnet_lite0", 7, ModelConfig(pretrained=False)), cfg)
    rows = full_data.splits["train"].select(range(16))
    images = LabelledImages(rows, full_data.label_names, train_tf, seed=42, helpers=0)
    helped = LabelledImages(rows, full_data.label_names, train_tf, seed=42, helpers=1)

    def epoch_batches(images: LabelledImages, workers: int, epoch: int) -> torch.Tensor:
        torch.manual_seed(0)  # the shuffle
        # rank 0 of `processes`, as Accelerate's prepare shards a loader (make_accelerator's seedable sampler)
        loader = prepare_data_loader(DataLoader(images, batch_size=4, shuffle=True, num_workers=workers,
                                                worker_init_fn=yield_to_compute, collate_fn=collate),
                                     num_processes=processes, process_index=0, put_on_device=False,
                                     use_seedable_sampler=True, data_seed=42)
        start_epoch(loader, epoch)
        return torch.cat([pixels for pixels, _ in loader])

    first = epoch_batches(images, 0, 1)
    assert images.epoch == 1
    assert torch.equal(first, epoch_batches(images, 2, 1))
    second = epoch_batches(images, 0, 2)
    assert not torch.equal(first, second)
    threads = torch.get_num_threads()
    assert torch.equal(first, epoch_batches(helped, 0, 1)) and torch.equal(second, epoch_batches(helped, 0, 2))
    assert helped._pool is not None and torch.get_num_threads() == threads
    for pid in list(helped._pool._processes):  # a helper killed (say, out of memory) loses no batch
        os.kill(pid, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="dermadetect.data"):
        assert torch.equal(first, epoch_batches(helped, 0, 1))
    assert helped.helpers == 0 and "helper process stopped" in caplog.text
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    images[3]
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state


def test_guard_photos_folder_is_checked_before_training(small_data, tmp_path):
    """A missing folder, or photos of too few lesions to cross-validate the guard, stop train.py before it
    trains, with one plain line; PAD-UFES photos of one lesion (PAT_<patient>_<lesion>_<image>) count once."""
    missing = run_train("--config", str(REPO / "configs" / "smoke.yaml"), "--data-dir", str(small_data),
                        "--guard-photos", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "run"),
                        check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("error: data.guard_photos:")
    assert not (tmp_path / "run" / "resnet18").exists()
    with pytest.raises(BadDataError, match="not a folder.*--guard-photos ''"):
        guard_photo_files(tmp_path / "nowhere")
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("PAT_1_2_3", "PAT_1_2_4", "PAT_1_5_6", "PAT_7_8_9", "PAT_10_11_12"):
        Image.new("RGB", (64, 64)).save(folder / f"{name}.jpg")
    with pytest.raises(BadDataError, match="5 images of 4 lesion"):
        guard_photo_files(folder)
    Image.new("RGB", (64, 64)).save(folder / "PAT_13_14_15.png")
    assert len(guard_photo_files(folder)) == 6
    assert lesion_of("padufes20__ACK__PAT_1020_111_593.jpg") == "padufes20__ACK__PAT_1020_111"
    assert lesion_of("IMG_0001.jpg") != lesion_of("IMG_0002.jpg")  # a camera's numbering: photos of any lesions
