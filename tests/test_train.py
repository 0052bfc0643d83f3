"""train.py end to end on real images: artifacts, metrics, data-parallel evaluation, resume after a kill."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.special
import torch
from PIL import Image
from safetensors import numpy as safetensors_numpy
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, f1_score, log_loss, precision_score,
                             recall_score, roc_auc_score)

from conftest import (REPO, SMALL_RUN, guard_features_by_hooks, read_metadata, read_predictions, run_train,
                      write_metadata)
from dermadetect.config import DEFAULT_BACKBONES
from dermadetect.study import GUARD_KEEP, PHOTO_SAMPLES

PER_BACKBONE_FILES = ("metrics.json", "confusion_matrix.png", "roc_curves.png", "training_curves.png",
                      "predictions_validation.csv", "predictions_test.csv", "best/model.safetensors",
                      "state/trainer_state.json", "explain_faithfulness.json", "gradcam_gallery.png",
                      "outputs_train.npz", "outputs_validation.npz", "outputs_test.npz", "outputs_photos.npz",
                      "outputs_train_shifted.npz", "outputs_validation_shifted.npz", "outputs_photo_framings.npz",
                      "analysis.json", "posthoc.json", "ood.safetensors", "reliability_diagram.png",
                      "predictions_calibrated_validation.csv", "predictions_calibrated_test.csv",
                      "export/config.json", "export/model.safetensors", "export/ood.safetensors",
                      "export/analysis.json", "export/README.md", "export/examples.json")


def guard_score(path, features) -> np.ndarray:
    """The guard's score written out from its file: standardised [features, log of the squared Mahalanobis
    distance of their penultimate part to the nearest class mean] dotted with the head."""
    t = {k: v.astype(np.float64) for k, v in safetensors_numpy.load_file(str(path)).items()}
    diff = features[:, None, :t["means"].shape[1]] - t["means"][None]
    distance = np.einsum("ncd,de,nce->nc", diff, t["precision"], diff).min(axis=1)
    inputs = np.hstack([features, np.log(distance)[:, None]])
    return (inputs - t["centre"]) / t["scale"] @ t["weight"] + t["bias"]


def test_smoke_run_writes_every_artifact(smoke_run):
    for name in ("config.json", "splits.csv", "comparison.json", "comparison.md", "comparison.png"):
        assert (smoke_run / name).is_file(), name
    for backbone in DEFAULT_BACKBONES:
        for name in PER_BACKBONE_FILES:
            assert (smoke_run / backbone / name).is_file(), f"{backbone}/{name}"
        # each guard photo as taken and in 8 framings, marked so the guard's cross-validation can group them
        photos = np.load(smoke_run / backbone / "outputs_guard_photos.npz")
        assert len(photos["labels"]) == 9 * len(photos["names"]) and set(photos["views"]) == set(range(9))
        ood = json.loads((smoke_run / backbone / "analysis.json").read_text())["ood"]
        assert ood["skin_photos"]["photos"] == len(photos["names"]) == ood["skin_photos"]["lesions"]
        # so is each ordinary picture, its view 0 being the picture as taken (as the photos split scores it)
        framings = np.load(smoke_run / backbone / "outputs_photo_framings.npz")
        pictures = np.load(smoke_run / backbone / "outputs_photos.npz")["features"]
        assert np.array_equal(framings["labels"], np.repeat(np.arange(len(PHOTO_SAMPLES)), 9))
        assert ood["picture_views"] == 9 and np.array_equal(framings["views"], np.tile(np.arange(9), len(pictures)))
        np.testing.assert_allclose(framings["features"][framings["views"] == 0], pictures, rtol=1e-4, atol=1e-4)
        for plot in ("confusion_matrix.png", "roc_curves.png", "training_curves.png"):
            with Image.open(smoke_run / backbone / plot) as im:
                assert im.size[0] > 300 and im.size[1] > 200
    comparison = json.loads((smoke_run / "comparison.json").read_text())
    assert [r["backbone"] for r in comparison["rows"]] == list(DEFAULT_BACKBONES)
    best = max(comparison["rows"], key=lambda r: r["validation"]["balanced_accuracy"])
    assert comparison["best_backbone"] == best["backbone"]
    table = (smoke_run / "comparison.md").read_text()
    assert all(f"| {b}" in table for b in DEFAULT_BACKBONES) and "(best)" in table
    for row in comparison["rows"]:
        assert row["train_images_per_second"] > 0 and row["parameters"] > 1e6
        assert row["steps"] == 8 and row["init"] == "random (from scratch)"


def sklearn_metrics(labels, probs, names) -> dict:
    """The reference: scikit-learn called directly on a predictions file."""
    pred, present, mel = probs.argmax(1), np.unique(labels), names.index("mel")
    aucs = [roc_auc_score(labels == k, probs[:, k]) for k in present if 0 < np.sum(labels == k) < len(labels)]
    return {"accuracy": accuracy_score(labels, pred), "balanced_accuracy": balanced_accuracy_score(labels, pred),
            "f1_macro": f1_score(labels, pred, labels=present, average="macro", zero_division=0),
            "precision_macro": precision_score(labels, pred, labels=present, average="macro", zero_division=0),
            "recall_weighted": recall_score(labels, pred, labels=present, average="weighted", zero_division=0),
            "roc_auc_macro": np.mean(aucs), "melanoma_sensitivity": recall_score(labels == mel, pred == mel),
            "melanoma_specificity": recall_score(labels != mel, pred != mel),
            "recall/mel": np.mean(pred[labels == mel] == mel), "loss": log_loss(labels, probs, labels=range(7))}


def test_saved_metrics_equal_sklearn_on_saved_predictions(smoke_run):
    for backbone in DEFAULT_BACKBONES:
        metrics = json.loads((smoke_run / backbone / "metrics.json").read_text())
        for split in ("validation", "test"):
            _, names, labels, probs = read_predictions(smoke_run / backbone / f"predictions_{split}.csv")
            np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
            expected = sklearn_metrics(labels, probs, names)
            for key, value in expected.items():
                assert metrics[split][key] == pytest.approx(value, abs=1e-9), (backbone, split, key)


def test_splits_csv_matches_what_was_evaluated(smoke_run, small_data):
    with open(smoke_run / "splits.csv", newline="") as f:
        splits = list(csv.DictReader(f))
    by_split = {s: [r["image_id"] for r in splits if r["split"] == s] for s in ("train", "validation", "test")}
    for split in ("validation", "test"):
        rows = read_predictions(smoke_run / "resnet18" / f"predictions_{split}.csv")[0]
        assert [r["image_id"] for r in rows] == by_split[split]
    train_ids = {r["image_id"] for r in read_metadata(small_data / "train" / "metadata.csv")}
    assert set(by_split["train"]) | set(by_split["validation"]) == train_ids
    lesions = {s: {r["lesion_id"] for r in splits if r["split"] == s} for s in by_split}
    assert not lesions["train"] & lesions["validation"]
    assert not (lesions["train"] | lesions["validation"]) & lesions["test"]


def swappable_classes(logits: np.ndarray, other: np.ndarray, label_names: list[str]) -> set[str]:
    """Classes in which two images' probabilities (first view, as metrics.json uses) are closer than the two passes
    differ, so that their order, and the class's ROC AUC, may differ between two exact passes. An untrained network
    outputs nearly the same for every image (the smoke run's EfficientNet-B0: P(mel) gaps down to 6e-8)."""
    probs, others = (scipy.special.softmax(x[:, 0].astype(np.float64), axis=-1) for x in (logits, other))
    gaps = np.diff(np.sort(probs, axis=0), axis=0).min(axis=0)
    return {name for name, gap, moved in zip(label_names, gaps, np.abs(probs - others).max(axis=0))
            if gap <= 2 * moved}


def test_two_process_evaluation_matches_one_process(smoke_run, tmp_path):
    """`python -m dermadetect evaluate` under torchrun with 2 CPU processes (gloo) on the same checkpoints gives
    the same metrics: every image counted once, none doubled by the padding of the last batch."""
    run = Path(shutil.copytree(smoke_run, tmp_path / "run", ignore=shutil.ignore_patterns("export")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dermadetect", "evaluate",
           str(run)]
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    label_names = json.loads((smoke_run / "config.json").read_text())["label_names"]
    for backbone in DEFAULT_BACKBONES:
        single = json.loads((smoke_run / backbone / "metrics.json").read_text())
        double = json.loads((run / backbone / "metrics.json").read_text())
        assert single["num_processes"] == 1 and double["num_processes"] == 2
        for split in ("validation", "test"):
            assert double[split]["n"] == single[split]["n"]
            passes = [np.load(r / backbone / f"outputs_{split}.npz")["logits"] for r in (smoke_run, run)]
            tied = swappable_classes(*passes, label_names)
            for key, value in single[split].items():
                if key.startswith("roc_auc") and (key.split("/")[-1] in tied or key == "roc_auc_macro" and tied):
                    continue  # the order of two images may differ between exact passes: so may the AUC
                assert double[split][key] == pytest.approx(value, abs=1e-5, nan_ok=True), (backbone, split, key)
        outputs = [np.load(r / backbone / "outputs_test.npz") for r in (smoke_run, run)]
        assert np.array_equal(outputs[0]["labels"], outputs[1]["labels"])
        np.testing.assert_allclose(outputs[1]["logits"], outputs[0]["logits"], atol=1e-4)
    # analysis under the same launcher: one process does it, the other returns at once
    cmd[cmd.index("evaluate")] = "analyze"
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("best on validation:") == 1
    assert all((run / backbone / "analysis.json").is_file() for backbone in DEFAULT_BACKBONES)


def test_two_process_training_run_goes_from_fit_to_export(small_data, tmp_path):
    """`accelerate launch` with the shipped multi-GPU config file, as 2 processes on the CPU (gloo), trains two
    backbones, evaluates, analyses and exports them: the same split as one process, every stage's files, and
    exports the Predictor loads."""
    out = tmp_path / "ddp"
    # not `--cpu`: accelerate then starts a single process; without a visible GPU the workers use gloo
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(REPO / "configs" / "accelerate.yaml"), "--num_processes", "2", str(REPO / "train.py"),
           *SMALL_RUN, "--data-dir", str(small_data), "--backbones", "resnet18", "efficientnet_lite0",
           "--output-dir", str(out)]
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("best on validation:") == 1  # one process analysed and exported
    single = tmp_path / "single"
    run_train(*SMALL_RUN, "--data-dir", str(small_data), "--backbones", "resnet18", "--output-dir", str(single),
              "--stop-after", "fit")
    assert (out / "splits.csv").read_text() == (single / "splits.csv").read_text()
    from dermadetect.inference import Predictor
    for backbone in ("resnet18", "efficientnet_lite0"):
        for name in PER_BACKBONE_FILES:
            assert (out / backbone / name).is_file(), f"{backbone}/{name}"
        assert json.loads((out / backbone / "metrics.json").read_text())["num_processes"] == 2
        image = next((small_data / "test").glob("*.jpg"))
        assert len(Predictor(str(out / backbone / "export")).predict(image).probabilities) == 7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_smoke_runs_every_stage_on_the_gpu(small_data, tmp_path):
    """The whole pipeline on CUDA in bf16: fit, the evaluation pass on the device, analysis, export."""
    out = tmp_path / "cuda"
    result = run_train(*SMALL_RUN, "--data-dir", str(small_data), "--backbones", "resnet18", "convnextv2_nano",
                       "--mixed-precision", "bf16", "--num-workers", "2", "--output-dir", str(out))
    assert "Traceback" not in result.stderr
    for backbone in ("resnet18", "convnextv2_nano"):
        assert (out / backbone / "export" / "README.md").is_file()
        outputs = np.load(out / backbone / "outputs_test.npz")
        assert np.isfinite(outputs["logits"]).all() and outputs["logits"].shape[1] == 8


@pytest.mark.slow
def test_bf16_runs_every_stage_and_evaluates_near_float32(small_data, tmp_path):
    """configs/gpu.yaml trains in bf16, which autocast also does on the CPU: every stage takes bf16 outputs,
    and the evaluation pass's logits are float32's to bf16 precision, not float32's own."""
    out = tmp_path / "bf16"
    backbones = ("resnet18", "convnextv2_atto")
    run_train(*SMALL_RUN, "--data-dir", str(small_data), "--backbones", *backbones, "--mixed-precision", "bf16",
              "--output-dir", str(out))
    half = {b: np.load(out / b / "outputs_test.npz")["logits"] for b in backbones}
    run = json.loads((out / "config.json").read_text())
    assert run["config"]["train"]["mixed_precision"] == "bf16"
    run["config"]["train"]["mixed_precision"] = "no"
    (out / "config.json").write_text(json.dumps(run))
    subprocess.run([sys.executable, "-m", "dermadetect", "evaluate", str(out)], cwd=REPO, check=True,
                   capture_output=True)
    for backbone in backbones:
        assert (out / backbone / "export" / "README.md").is_file()
        full = np.load(out / backbone / "outputs_test.npz")["logits"]
        assert not np.array_equal(half[backbone], full), f"{backbone}: the pass did not run in bf16"
        # bf16 keeps 8 bits of mantissa: about 1% of the largest logit here
        assert np.abs(half[backbone] - full).max() < 0.05 * np.abs(full).max(), backbone


def resume_args(small_data) -> list[str]:
    return [*SMALL_RUN, "--data-dir", str(small_data), "--backbones", "resnet18", "--epochs", "3", "--max-steps", "0"]


@pytest.fixture(scope="module")
def straight_run(small_data, tmp_path_factory):
    """The run that interrupted and split runs must reproduce."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    run_train(*resume_args(small_data), "--output-dir", str(out))
    return out


def assert_same_run(a_dir, b_dir):
    a = json.loads((a_dir / "resnet18" / "metrics.json").read_text())
    b = json.loads((b_dir / "resnet18" / "metrics.json").read_text())
    assert [h["train_loss"] for h in b["history"]] == pytest.approx([h["train_loss"] for h in a["history"]])
    assert b["best_epoch"] == a["best_epoch"]
    for split in ("validation", "test"):
        assert b[split] == pytest.approx(a[split])


def kill_after_first_checkpoint_and_resume(args: list[str], out, env=None,
                                           resume_env=None) -> subprocess.CompletedProcess:
    """Run train.py until its first epoch checkpoint is written, SIGKILLed right then (tests/
    kill_after_checkpoint.py), then --resume it to the end."""
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "kill_after_checkpoint.py"), *args,
                             "--output-dir", str(out)], cwd=REPO, capture_output=True, text=True, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "resnet18" / "metrics.json").exists()
    assert json.loads((out / "resnet18" / "state" / "trainer_state.json").read_text())["epoch"] == 1

    resumed = run_train(*args, "--output-dir", str(out), "--resume", env=resume_env)
    assert "resuming after epoch 1" in resumed.stdout
    return resumed


def test_killed_run_resumes_to_the_same_result(small_data, straight_run, tmp_path):
    resumed = kill_after_first_checkpoint_and_resume(resume_args(small_data), tmp_path / "interrupted")
    assert_same_run(straight_run, tmp_path / "interrupted")
    assert "torch threads" not in resumed.stderr


def test_resuming_with_another_thread_count_says_the_run_will_differ(small_data, tmp_path):
    """Float sums depend on the thread count (a CPU Lite0 run with 1 thread instead of 2 ended elsewhere): the
    run records its count, and a resumption with another one warns and names the setting that matches."""
    out = tmp_path / "run"
    args = [*resume_args(small_data), "--stop-after", "fit"]
    resumed = kill_after_first_checkpoint_and_resume(args, out, env={**os.environ, "OMP_NUM_THREADS": "2"},
                                                     resume_env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert json.loads((out / "config.json").read_text())["torch_threads"] == 2
    assert "started with 2 torch threads and continues with 1" in resumed.stderr
    assert "OMP_NUM_THREADS=2" in resumed.stderr


def test_fitted_run_is_finished_elsewhere_from_best_weights_and_history(small_data, straight_run, tmp_path):
    """Fit on one machine (--stop-after fit), bring back only best/ and the trainer state (not the optimizer
    state), finish with --resume: the same metrics as a run done in one go."""
    trained = tmp_path / "trained"
    run_train(*resume_args(small_data), "--output-dir", str(trained), "--stop-after", "fit")
    assert (trained / "resnet18" / "best" / "model.safetensors").is_file()
    assert not (trained / "resnet18" / "metrics.json").exists() and not (trained / "comparison.json").exists()
    finished = tmp_path / "finished"
    for name in ("config.json", "splits.csv", "resnet18/best/model.safetensors",
                 "resnet18/state/trainer_state.json"):
        (finished / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(trained / name, finished / name)
    # the finishing machine has its own core count: the loader processes may differ from the training run's
    result = run_train("--output-dir", str(finished), "--resume", "--num-workers", "1")
    assert "resnet18: fitted (3 epochs), kept" in result.stdout
    assert_same_run(straight_run, finished)
    assert (finished / "comparison.json").is_file() and (finished / "resnet18" / "analysis.json").is_file()


def test_resume_refuses_data_that_splits_differently(small_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(small_data, root, symlinks=True)
    out = tmp_path / "run"
    run_train(*SMALL_RUN, "--data-dir", str(root), "--output-dir", str(out), "--stop-after", "fit", "--max-steps", "1")
    rows = read_metadata(root / "train" / "metadata.csv")
    write_metadata(root / "train" / "metadata.csv", rows[:-2])
    result = run_train("--output-dir", str(out), "--resume", check=False)
    assert result.returncode != 0 and "splits.csv" in result.stderr and "rows differ" in result.stderr


def test_unusable_run_folders_and_sources_are_one_error_line(tmp_path):
    """What a user gets wrong before any training: one `error:` line saying what, no traceback."""
    old = tmp_path / "old"
    old.mkdir()  # a run folder of an earlier version, with an option that was since removed
    (old / "config.json").write_text(json.dumps({"config": {"train": {"mixup": 0.2}}}))
    commands = [
        ("holds no run", ["train.py", "--resume", "--output-dir", str(tmp_path / "nowhere")]),
        ("another version", ["train.py", "--resume", "--output-dir", str(old)]),
        ("another version", ["-m", "dermadetect", "analyze", str(old)]),
        ("No such file", ["train.py", "--config", str(tmp_path / "missing.yaml")]),
        ("give exactly one data source", ["train.py", "--output-dir", str(tmp_path / "a")]),
        ("does not exist", ["train.py", "--data-dir", str(tmp_path / "no-data"), "--output-dir", str(tmp_path / "b")]),
    ]
    for expected, command in commands:
        result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=300)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode != 0 and "Traceback" not in result.stderr, (command, result.stderr[-2000:])
        assert last.startswith("error:") and expected in last, (command, last)


def test_existing_run_is_not_overwritten(smoke_run, small_data):
    result = run_train("--data-dir", str(small_data), "--output-dir", str(smoke_run), check=False)
    assert result.returncode != 0 and "--resume" in result.stderr
    changed = run_train("--output-dir", str(smoke_run), "--resume", "--epochs", "5", "--lr", "0.1", check=False)
    assert changed.returncode != 0 and "train.epochs, train.lr differ" in changed.stderr


def test_export_refuses_a_guard_fitted_on_another_width(smoke_run, tmp_path):
    """A run analysed before the guard saw the last feature stages (its guard scores the penultimate features
    alone): export stops with one error line naming both widths and the stages to run again, and its served
    folder is left as it was."""
    run = Path(shutil.copytree(smoke_run, tmp_path / "run"))
    guard = run / "resnet18" / "ood.safetensors"
    tensors = safetensors_numpy.load_file(str(guard))
    penultimate = tensors["means"].shape[1]
    for key in ("centre", "scale", "weight"):  # the penultimate part and the distance, as the earlier guard had
        tensors[key] = np.r_[tensors[key][:penultimate], tensors[key][-1:]]
    safetensors_numpy.save_file(tensors, str(guard))
    export = run / "resnet18" / "export"
    before = {p: p.read_bytes() for p in export.rglob("*") if p.is_file()}
    result = subprocess.run([sys.executable, "-m", "dermadetect", "export", str(run)], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert last.startswith("error: resnet18") and f"fitted on {penultimate} features" in last, last
    assert "evaluate" in last and "analyze" in last, last
    assert {p: p.read_bytes() for p in export.rglob("*") if p.is_file()} == before


def test_skip_bad_images_run_reports_dropped_rows(small_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(small_data, root, symlinks=True)
    rows = read_metadata(root / "train" / "metadata.csv")
    rows[0]["dx"] = "not-a-class"
    write_metadata(root / "train" / "metadata.csv", rows)
    failed = run_train(*SMALL_RUN, "--data-dir", str(root), "--output-dir", str(tmp_path / "a"), check=False)
    assert failed.returncode != 0 and "unknown label 'not-a-class'" in failed.stderr
    run_train(*SMALL_RUN, "--data-dir", str(root), "--output-dir", str(tmp_path / "b"), "--skip-bad-images",
              "--max-steps", "1", "--stop-after", "fit")
    dropped = read_metadata(tmp_path / "b" / "dropped_rows.csv")
    assert [(d["image_id"], d["split"]) for d in dropped] == [(rows[0]["image_id"], "train")]
    with open(tmp_path / "b" / "splits.csv", newline="") as f:
        assert rows[0]["image_id"] not in f.read()


def test_fit_selects_with_the_backbones_own_crop_and_stages_refuse_outputs_of_another(smoke_run):
    """smoke.yaml serves crop 1.0 (data.eval_crop_pct), yet the validation loss each backbone's trainer state
    recorded at its best epoch is that of its best checkpoint through timm's own evaluation transform for the
    backbone: the served crop is chosen after training and leaves the weights as they are. The analysis refuses
    evaluation outputs framed with another crop than the run's settings now give."""
    import timm
    from safetensors.torch import load_file
    from timm.data import create_transform, resolve_model_data_config

    from dermadetect.config import replace_nested
    from dermadetect.engine import read_trainer_state
    from dermadetect.pipeline import RunFolderError, load_run_data, read_outputs, read_run

    cfg, _ = read_run(smoke_run)
    data = load_run_data(smoke_run, cfg)
    table, labels = data.splits["validation"], torch.as_tensor(data.labels("validation"))
    for backbone in DEFAULT_BACKBONES:
        model = timm.create_model(backbone, num_classes=7).eval()
        model.load_state_dict(load_file(smoke_run / backbone / "best" / "model.safetensors"))
        own = {**resolve_model_data_config(model), "input_size": (3, cfg.data.image_size, cfg.data.image_size)}
        assert own["crop_pct"] != cfg.data.eval_crop_pct
        transform = create_transform(**own, is_training=False)
        with torch.no_grad():
            logits = torch.cat([model(torch.stack([transform(image.convert("RGB")) for image in
                                                   table[i:i + cfg.train.batch_size]["image"]]))
                                for i in range(0, len(table), cfg.train.batch_size)])
        state = read_trainer_state(smoke_run / backbone)
        recorded = state.history[state.best_epoch - 1]["val_loss"]
        assert torch.nn.functional.cross_entropy(logits, labels).item() == pytest.approx(recorded, abs=1e-4)
    with pytest.raises(RunFolderError, match="another crop"):
        read_outputs(smoke_run, "resnet18", replace_nested(cfg, data={"eval_crop_pct": 0.875}), data)


def test_export_round_trip_matches_the_trained_model(smoke_run, small_data):
    """The exported folder rebuilds the best checkpoint (same logits) and the run's eval transform, both through
    the Predictor and through timm's own local-dir loader."""
    import timm
    import torch
    from safetensors.torch import load_file
    from timm.data import create_transform, resolve_model_data_config

    from dermadetect.data import build_transforms
    from dermadetect.pipeline import read_run
    from dermadetect.inference import Predictor

    served = read_run(smoke_run)[0].data
    for backbone in DEFAULT_BACKBONES:
        export = smoke_run / backbone / "export"
        config = json.loads((export / "config.json").read_text())
        assert config["architecture"] == backbone and config["num_classes"] == 7
        assert config["pretrained_cfg"]["crop_pct"] == served.eval_crop_pct  # smoke.yaml's, not the backbone's
        assert config["label_names"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
        assert config["label_descriptions"]["mel"] == "Melanoma (mel)"
        faithfulness = json.loads((smoke_run / backbone / "explain_faithfulness.json").read_text())
        assert config["dermadetect"]["cam_method"] == faithfulness["best_method"]
        assert set(faithfulness["scores"]) == {"gradcam", "gradcam++", "hirescam", "layercam", "eigencam"}

        trained = timm.create_model(backbone, num_classes=7)
        trained.load_state_dict(load_file(smoke_run / backbone / "best" / "model.safetensors"))
        trained.eval()
        assert resolve_model_data_config(trained)["crop_pct"] != served.eval_crop_pct  # the setting is exercised
        _, run_eval_tf, _ = build_transforms(trained, served)
        from_timm = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
        predictor = Predictor(str(export))
        image = Image.open(next((small_data / "test").glob("*.jpg"))).convert("RGB")
        exported_tf = create_transform(**resolve_model_data_config(from_timm), is_training=False)
        assert repr(exported_tf) == repr(run_eval_tf) == repr(predictor.transform)
        x = run_eval_tf(image).unsqueeze(0)
        with torch.no_grad():
            expected = trained(x)
            torch.testing.assert_close(from_timm(x), expected)
            torch.testing.assert_close(predictor.loaded.model(x), expected)
        # the analysis' choices on validation: temperature, test-time views, decision rule, OOD detector
        settings = config["dermadetect"]
        assert config["pretrained_cfg"]["license"] == "cc-by-nc-4.0"  # these weights' terms, not ImageNet's
        views = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
        views = [v for view in views for v in (view, view.flip(3))][:settings["tta_views"]]
        with torch.no_grad():
            logits = torch.stack([trained(v)[0] for v in views]).mean(0)
        result = predictor.predict(image)
        np.testing.assert_allclose(list(result.probabilities.values()),
                                   (logits / settings["temperature"]).softmax(0).numpy(), atol=1e-5)
        by_hooks = guard_features_by_hooks(trained, x)
        assert result.ood_score == pytest.approx(guard_score(export / "ood.safetensors", by_hooks)[0],
                                                 rel=1e-4, abs=1e-4)
        assert result.out_of_distribution == (result.ood_score > settings["ood_threshold"])
        assert result.melanoma_flag == (result.probabilities["mel"] >= settings["melanoma_threshold"])
        call = ((logits / settings["temperature"]).numpy()
                - settings["adjustment_strength"] * np.log(settings["class_prior"]))
        assert result.top_label == result.explained_label == config["label_names"][int(call.argmax())]


def test_analysis_choices_are_made_on_validation(smoke_run):
    """The melanoma threshold meets the target on validation; the OOD threshold keeps 95% of validation; the
    decision rule is the best on validation; test metrics in analysis.json equal scikit-learn on the calibrated
    test predictions and their decisions."""
    for backbone in DEFAULT_BACKBONES:
        analysis = json.loads((smoke_run / backbone / "analysis.json").read_text())
        config = json.loads((smoke_run / backbone / "export" / "config.json").read_text())["dermadetect"]
        assert config["temperature"] == analysis["temperature"] > 0
        assert config["tta_views"] == (8 if analysis["tta"]["used"] else 1)
        val_rows, names, val_labels, val_probs = read_predictions(
            smoke_run / backbone / "predictions_calibrated_validation.csv")
        mel = names.index("mel")
        # the threshold is one melanoma's P(mel); the CSV and config.json hold the exact float64
        caught = val_probs[val_labels == mel, mel] >= config["melanoma_threshold"]
        assert caught.mean() >= 0.85
        # the guard passes GUARD_KEEP of validation, clean and shifted, to within one image (np.quantile
        # interpolates)
        scores = np.array([float(r["ood_score"]) for r in val_rows])
        shifted = guard_score(smoke_run / backbone / "ood.safetensors",
                              np.load(smoke_run / backbone / "outputs_validation_shifted.npz")["features"])
        pooled = np.r_[scores, shifted]
        assert np.mean(pooled <= config["ood_threshold"]) >= GUARD_KEEP - 1 / len(pooled)
        assert analysis["ood"]["validation_flagged"] == pytest.approx(np.mean(scores > config["ood_threshold"]))
        # the decision: argmax of log P - s * log(train class share), s the best on validation balanced accuracy
        with open(smoke_run / "splits.csv", newline="") as f:
            train_dx = [row["dx"] for row in csv.DictReader(f) if row["split"] == "train"]
        shares = np.array([train_dx.count(n) for n in names]) / len(train_dx)
        adjustment = {"class_prior": config["class_prior"], "strength": config["adjustment_strength"]}
        assert adjustment["class_prior"] == pytest.approx(shares)
        assert adjustment["strength"] == analysis["decision"]["strength"]
        val_decisions = np.array([names.index(r["pred"]) for r in val_rows])
        assert np.array_equal(val_decisions, (val_probs / shares ** adjustment["strength"]).argmax(axis=1))
        assert balanced_accuracy_score(val_labels, val_decisions) == pytest.approx(max(
            analysis["decision"]["validation_balanced_accuracy"].values()))
        test_rows, _, labels, probs = read_predictions(smoke_run / backbone / "predictions_calibrated_test.csv")
        decisions = np.array([names.index(r["pred"]) for r in test_rows])
        assert np.array_equal(decisions, (probs / shares ** adjustment["strength"]).argmax(axis=1))
        present = np.unique(labels)
        expected = {"balanced_accuracy": balanced_accuracy_score(labels, decisions),
                    "accuracy": accuracy_score(labels, decisions),
                    "f1_macro": f1_score(labels, decisions, labels=present, average="macro", zero_division=0),
                    "roc_auc_macro": np.mean([roc_auc_score(labels == k, probs[:, k]) for k in present])}
        for key, value in expected.items():
            assert analysis["test_final"][key] == pytest.approx(value)
            assert analysis["bootstrap"]["test"][key]["value"] == pytest.approx(value)
        assert analysis["ood"]["photos"] and 0 <= analysis["ood"]["auroc_test_vs_photos"] <= 1
        assert {g["group"] for g in analysis["subgroups"]["sex"]} <= {"female", "male", "unknown"}
        assert sum(g["images"] for g in analysis["subgroups"]["dataset"]) == len(labels)


# The ISIC 9-class collection ("Skin Cancer ISIC": Train/<class>/, Test/<class>/) names its classes in words.
# Stand-in images come from HAM10000 classes of the same diagnosis (bkl and akiec each feed two folders).
ISIC_NINE = {"actinic keratosis": "akiec", "basal cell carcinoma": "bcc", "dermatofibroma": "df",
             "melanoma": "mel", "nevus": "nv", "pigmented benign keratosis": "bkl", "seborrheic keratosis": "bkl",
             "squamous cell carcinoma": "akiec", "vascular lesion": "vasc"}


def test_isic_class_folders_run_from_fit_to_the_melanoma_flag(ham224, guard_photos, tmp_path):
    """A class-folder tree in the ISIC 9-class naming trains, is analysed (melanoma threshold chosen on
    validation) and exported; the Predictor raises the melanoma flag from the export's own threshold."""
    import app
    from dermadetect.inference import Predictor
    from dermadetect.labels import readable_name

    rows = read_metadata(ham224 / "train" / "metadata.csv")
    used = set()
    for name, code in ISIC_NINE.items():
        chosen = [r for r in rows if r["dx"] == code and r["image_id"] not in used][:14]
        used |= {r["image_id"] for r in chosen}
        for split, part in (("Train", chosen[:10]), ("Test", chosen[10:])):
            folder = tmp_path / "isic" / split / name
            folder.mkdir(parents=True)
            for row in part:
                (folder / row["file_name"]).symlink_to(ham224 / "train" / row["file_name"])
    out = tmp_path / "run"
    result = run_train(*SMALL_RUN, "--data-dir", str(tmp_path / "isic"), "--output-dir", str(out),
                       "--guard-photos", str(guard_photos))
    assert "no lesion ids" in result.stderr
    config = json.loads((out / "resnet18" / "export" / "config.json").read_text())
    assert config["label_names"] == sorted(ISIC_NINE) and config["num_classes"] == 9
    analysis = json.loads((out / "resnet18" / "analysis.json").read_text())
    threshold = config["dermadetect"]["melanoma_threshold"]
    assert threshold == analysis["melanoma_operating_point"]["threshold"] is not None
    assert analysis["test_final"]["support/melanoma"] == 4 and 0 <= analysis["test_final"]["melanoma_sensitivity"] <= 1
    # the Predictor serves what the evaluation pass scored, and flags the melanomas the analysis counted
    predictor = Predictor(str(out / "resnet18" / "export"))
    rows, names, _, probs = read_predictions(out / "resnet18" / "predictions_calibrated_test.csv")
    scored = {row["image_id"]: p for row, p in zip(rows, probs)}
    melanomas = sorted((tmp_path / "isic" / "Test" / "melanoma").iterdir())
    results = [predictor.predict(path) for path in melanomas]
    for path, result in zip(melanomas, results):
        np.testing.assert_allclose([result.probabilities[n] for n in names], scored[path.stem], atol=1e-4)
    assert sum(r.melanoma_flag for r in results) == analysis["melanoma_operating_point"]["test"]["tp"]
    chart = app.make_handler(predictor)(str(melanomas[0]))[0]
    assert set(chart) == {readable_name(n) for n in ISIC_NINE}
