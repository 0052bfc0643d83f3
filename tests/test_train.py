"""train.py end to end on real images: artifacts, metrics, data-parallel evaluation, resume after a kill."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.metrics import balanced_accuracy_score

from conftest import REPO, SMALL_RUN, read_metadata, read_predictions, run_train, write_metadata
from dermadetect.config import DEFAULT_BACKBONES
from dermadetect.labels import melanoma_index
from dermadetect.metrics import classification_metrics
from dermadetect.posthoc import MahalanobisDetector

PER_BACKBONE_FILES = ("metrics.json", "confusion_matrix.png", "roc_curves.png", "training_curves.png",
                      "predictions_validation.csv", "predictions_test.csv", "best/model.safetensors",
                      "state/trainer_state.json", "explain_faithfulness.json", "gradcam_gallery.png",
                      "export/config.json", "export/model.safetensors", "analysis.json", "reliability_diagram.png",
                      "predictions_calibrated_validation.csv", "predictions_calibrated_test.csv",
                      "export/ood.safetensors")


def test_smoke_run_writes_every_artifact(smoke_run):
    for name in ("config.json", "splits.csv", "comparison.json", "comparison.md", "comparison.png"):
        assert (smoke_run / name).is_file(), name
    for backbone in DEFAULT_BACKBONES:
        for name in PER_BACKBONE_FILES:
            assert (smoke_run / backbone / name).is_file(), f"{backbone}/{name}"
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


def test_saved_metrics_equal_sklearn_on_saved_predictions(smoke_run):
    for backbone in DEFAULT_BACKBONES:
        metrics = json.loads((smoke_run / backbone / "metrics.json").read_text())
        for split in ("validation", "test"):
            _, names, labels, probs = read_predictions(smoke_run / backbone / f"predictions_{split}.csv")
            np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
            expected = classification_metrics(labels, probs, names, melanoma_index(names))
            saved = metrics[split]
            for key in ("accuracy", "balanced_accuracy", "f1_macro", "precision_macro", "recall_weighted",
                        "roc_auc_macro", "melanoma_sensitivity", "melanoma_specificity", "recall/mel"):
                assert saved[key] == pytest.approx(expected[key], abs=1e-4), (backbone, split, key)
                assert 0.0 <= saved[key] <= 1.0


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


def test_two_process_evaluation_matches_one_process(smoke_run, small_data):
    """torchrun with 2 CPU processes (gloo) on the same checkpoint gives the same validation metrics."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the run's own settings come from its config.json: only the folder is needed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "train.py"),
           "--output-dir", str(smoke_run), "--eval-only"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for backbone in ("resnet18",):
        single = json.loads((smoke_run / backbone / "metrics.json").read_text())
        double = json.loads((smoke_run / backbone / "metrics_eval.json").read_text())
        assert single["num_processes"] == 1 and double["num_processes"] == 2
        assert double["validation"]["n"] == single["validation"]["n"]  # no sample dropped or doubled
        for key, value in single["validation"].items():
            if value is None:
                assert double["validation"][key] is None
            else:
                assert double["validation"][key] == pytest.approx(value, abs=1e-5), key


def resume_args(small_data) -> list[str]:
    return ["--data-dir", str(small_data), "--backbones", "resnet18", "--epochs", "3", "--val-fraction", "0.25",
            *SMALL_RUN]


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
    """Start train.py, SIGKILL it as soon as its first epoch checkpoint exists, then --resume it to the end."""
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, "--output-dir", str(out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    marker = out / "resnet18" / "state" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert not (out / "resnet18" / "metrics.json").exists()
    epochs_done = json.loads(marker.read_text())["epoch"]
    assert 1 <= epochs_done < 3

    resumed = run_train(*args, "--output-dir", str(out), "--resume", env=resume_env)
    assert f"resuming after epoch {epochs_done}" in resumed.stdout
    return resumed


def test_killed_run_resumes_to_the_same_result(small_data, straight_run, tmp_path):
    resumed = kill_after_first_checkpoint_and_resume(resume_args(small_data), tmp_path / "interrupted")
    assert_same_run(straight_run, tmp_path / "interrupted")
    assert "torch threads" not in resumed.stderr


def test_resuming_with_another_thread_count_says_the_run_will_differ(small_data, tmp_path):
    """Float sums depend on the thread count (a CPU Lite0 run with 1 thread instead of 2 ended elsewhere): the
    run records its count, and a resumption with another one warns and names the setting that matches."""
    out = tmp_path / "run"
    args = [*resume_args(small_data), "--train-only"]
    resumed = kill_after_first_checkpoint_and_resume(args, out, env={**os.environ, "OMP_NUM_THREADS": "2"},
                                                     resume_env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert json.loads((out / "config.json").read_text())["torch_threads"] == 2
    assert "started with 2 torch threads and continues with 1" in resumed.stderr
    assert "OMP_NUM_THREADS=2" in resumed.stderr


def test_killed_run_with_mixup_ema_layer_decay_and_class_sampling_resumes_exactly(small_data, tmp_path):
    """The weight average and the mixing draws are part of the checkpoint and the class sampler's draws follow
    from (seed, epoch): an interrupted run ends where a straight one does."""
    args = [*resume_args(small_data), "--mixup", "0.4", "--cutmix", "1.0", "--ema-decay", "0.9",
            "--layer-decay", "0.7", "--class-sampling", "sqrt", "--train-only"]
    run_train(*args, "--output-dir", str(tmp_path / "straight"))
    kill_after_first_checkpoint_and_resume(args, tmp_path / "interrupted")
    states = [json.loads((tmp_path / run / "resnet18" / "state" / "trainer_state.json").read_text())
              for run in ("straight", "interrupted")]
    for key in ("train_loss", "val_loss", "val_balanced_accuracy"):
        assert [h[key] for h in states[1]["history"]] == pytest.approx([h[key] for h in states[0]["history"]])
    best = [load_file(tmp_path / run / "resnet18" / "best" / "model.safetensors") for run in ("straight", "interrupted")]
    for name, tensor in best[0].items():
        torch.testing.assert_close(best[1][name], tensor)


def test_ema_run_validates_and_keeps_the_averaged_weights(small_data, tmp_path):
    out = tmp_path / "run"
    run_train("--data-dir", str(small_data), "--backbones", "resnet18", "--output-dir", str(out), "--train-only",
              "--epochs", "1", "--val-fraction", "0.25", "--ema-decay", "0.9", "--mixup", "0.2", *SMALL_RUN)
    folder = out / "resnet18"
    best = load_file(folder / "best" / "model.safetensors")
    trained = load_file(folder / "state" / "model.safetensors")
    average = torch.load(folder / "state" / "custom_checkpoint_0.pkl", weights_only=True)
    # one epoch: the best checkpoint is the last one, so it is the average timm's ModelEmaV3 kept, not the weights
    # the optimizer left
    for name, tensor in best.items():
        torch.testing.assert_close(tensor, average[f"module.{name}"])
    assert any(not torch.equal(best[name], trained[name]) for name in best if name.endswith("weight"))
    # mixing pairs images within a batch: the odd tail of the epoch is dropped, every batch is full
    history = json.loads((folder / "state" / "trainer_state.json").read_text())["history"]
    train_rows = sum(row["split"] == "train" for row in read_metadata(out / "splits.csv"))
    assert train_rows % 16 and history[0]["train_images"] == train_rows // 16 * 16


def test_train_only_run_is_finished_elsewhere_from_best_weights_and_history(small_data, straight_run, tmp_path):
    """Train on one machine with --train-only, bring back only best/ and the trainer state (not the optimizer
    state), finish with --resume: the same metrics as a run done in one go."""
    trained = tmp_path / "trained"
    run_train(*resume_args(small_data), "--output-dir", str(trained), "--train-only")
    assert (trained / "resnet18" / "best" / "model.safetensors").is_file()
    assert not (trained / "resnet18" / "metrics.json").exists() and not (trained / "comparison.json").exists()
    finished = tmp_path / "finished"
    for name in ("config.json", "splits.csv", "resnet18/best/model.safetensors",
                 "resnet18/state/trainer_state.json"):
        (finished / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(trained / name, finished / name)
    # the finishing machine has its own core count: the loader processes may differ from the training run's
    result = run_train("--output-dir", str(finished), "--resume", "--num-workers", "1")
    assert "training finished (3 epochs)" in result.stdout
    assert_same_run(straight_run, finished)
    assert (finished / "comparison.json").is_file() and (finished / "resnet18" / "analysis.json").is_file()


def test_resume_refuses_data_that_splits_differently(small_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(small_data, root, symlinks=True)
    out = tmp_path / "run"
    run_train("--data-dir", str(root), "--backbones", "resnet18", "--output-dir", str(out), "--train-only",
              "--epochs", "1", "--max-steps", "1", "--val-fraction", "0.25", *SMALL_RUN)
    rows = read_metadata(root / "train" / "metadata.csv")
    write_metadata(root / "train" / "metadata.csv", rows[:-2])
    result = run_train("--output-dir", str(out), "--resume", check=False)
    assert result.returncode != 0 and "splits.csv" in result.stderr and "rows differ" in result.stderr


def test_existing_run_is_not_overwritten(smoke_run, small_data):
    result = run_train("--data-dir", str(small_data), "--output-dir", str(smoke_run), check=False)
    assert result.returncode != 0 and "--resume" in result.stderr
    changed = run_train("--output-dir", str(smoke_run), "--resume", "--epochs", "5", "--lr", "0.1", check=False)
    assert changed.returncode != 0 and "train.epochs, train.lr differ" in changed.stderr


def test_skip_bad_images_run_reports_dropped_rows(small_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(small_data, root, symlinks=True)
    rows = read_metadata(root / "train" / "metadata.csv")
    rows[0]["dx"] = "not-a-class"
    write_metadata(root / "train" / "metadata.csv", rows)
    failed = run_train("--data-dir", str(root), "--backbones", "resnet18", "--output-dir", str(tmp_path / "a"),
                       *SMALL_RUN, check=False)
    assert failed.returncode != 0 and "unknown label 'not-a-class'" in failed.stderr
    run_train("--data-dir", str(root), "--backbones", "resnet18", "--output-dir", str(tmp_path / "b"),
              "--skip-bad-images", "--epochs", "1", "--max-steps", "1", "--val-fraction", "0.25", *SMALL_RUN)
    dropped = read_metadata(tmp_path / "b" / "dropped_rows.csv")
    assert [(d["image_id"], d["split"]) for d in dropped] == [(rows[0]["image_id"], "train")]
    with open(tmp_path / "b" / "splits.csv", newline="") as f:
        assert rows[0]["image_id"] not in f.read()


def test_export_round_trip_matches_the_trained_model(smoke_run, small_data):
    """The exported folder rebuilds the best checkpoint (same logits) and the run's eval transform, both through
    the Predictor and through timm's own local-dir loader."""
    import timm
    import torch
    from safetensors.torch import load_file
    from timm.data import create_transform, resolve_model_data_config

    from dermadetect.data import build_transforms
    from dermadetect.config import DataConfig
    from dermadetect.inference import Predictor

    for backbone in DEFAULT_BACKBONES:
        export = smoke_run / backbone / "export"
        config = json.loads((export / "config.json").read_text())
        assert config["architecture"] == backbone and config["num_classes"] == 7
        assert config["label_names"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
        assert config["label_descriptions"]["mel"] == "Melanoma (mel)"
        faithfulness = json.loads((smoke_run / backbone / "explain_faithfulness.json").read_text())
        assert config["dermadetect"]["cam_method"] == faithfulness["best_method"]
        assert set(faithfulness["scores"]) == {"gradcam", "gradcam++", "hirescam", "layercam", "eigencam"}

        trained = timm.create_model(backbone, num_classes=7)
        trained.load_state_dict(load_file(smoke_run / backbone / "best" / "model.safetensors"))
        trained.eval()
        _, run_eval_tf, _ = build_transforms(trained, DataConfig(image_size=64))
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
        views = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
        views = [v for view in views for v in (view, view.flip(3))][:settings["tta_views"]]
        with torch.no_grad():
            logits = torch.stack([trained(v)[0] for v in views]).mean(0)
            pre_logits = trained.forward_head(trained.forward_features(x), pre_logits=True)[0].numpy()
        result = predictor.predict(image)
        np.testing.assert_allclose(list(result.probabilities.values()),
                                   (logits / settings["temperature"]).softmax(0).numpy(), atol=1e-5)
        ood = MahalanobisDetector.load(export / settings["ood"]["file"], settings["ood"]["threshold"])
        assert result.ood_score == pytest.approx(float(ood.score(pre_logits[None])[0]), rel=1e-4)
        assert result.out_of_distribution == (result.ood_score > settings["ood"]["threshold"])
        assert result.melanoma_flag == (result.probabilities["mel"] >= settings["melanoma_threshold"])
        adjustment = settings["logit_adjustment"]
        call = (logits / settings["temperature"]).numpy() - adjustment["strength"] * np.log(adjustment["class_prior"])
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
        scores = np.array([float(r["ood_score"]) for r in val_rows])
        # np.quantile interpolates: on a small validation split the share kept is 95% to within one image
        assert np.mean(scores <= config["ood"]["threshold"]) >= 0.95 - 1 / len(scores)
        # the decision: argmax of log P - s * log(train class share), s the best on validation balanced accuracy
        with open(smoke_run / "splits.csv", newline="") as f:
            train_dx = [row["dx"] for row in csv.DictReader(f) if row["split"] == "train"]
        shares = np.array([train_dx.count(n) for n in names]) / len(train_dx)
        adjustment = config["logit_adjustment"]
        assert adjustment["class_prior"] == pytest.approx(shares)
        assert adjustment["strength"] == analysis["decision"]["strength"]
        val_decisions = np.array([names.index(r["pred"]) for r in val_rows])
        assert np.array_equal(val_decisions, (val_probs / shares ** adjustment["strength"]).argmax(axis=1))
        assert balanced_accuracy_score(val_labels, val_decisions) == pytest.approx(max(
            analysis["decision"]["validation_balanced_accuracy"].values()))
        test_rows, _, labels, probs = read_predictions(smoke_run / backbone / "predictions_calibrated_test.csv")
        decisions = np.array([names.index(r["pred"]) for r in test_rows])
        assert np.array_equal(decisions, (probs / shares ** adjustment["strength"]).argmax(axis=1))
        expected = classification_metrics(labels, probs, names, melanoma_index(names), y_pred=decisions)
        for key in ("balanced_accuracy", "accuracy", "f1_macro", "roc_auc_macro"):
            assert analysis["test_final"][key] == pytest.approx(expected[key])
            assert analysis["bootstrap"]["test"][key]["value"] == pytest.approx(expected[key])
        assert analysis["ood"]["photos"] and 0 <= analysis["ood"]["auroc_test_vs_photos"] <= 1
        assert {g["group"] for g in analysis["subgroups"]["sex"]} <= {"female", "male", "unknown"}
        assert sum(g["images"] for g in analysis["subgroups"]["dataset"]) == len(labels)
