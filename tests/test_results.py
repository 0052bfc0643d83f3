"""The committed study: README's results table, model_card.md and the bundled model all come from the files
that train.py wrote (results/), and `python -m dermadetect publish` puts them there."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

import app
from conftest import REPO, read_predictions
from dermadetect.__main__ import publish_run, results_markers
from dermadetect.hub import model_card
from dermadetect.inference import Predictor
from dermadetect.report import read_backbone_row, results_markdown, sweep_markdown


def committed_runs():
    return sorted(p.parent for p in (REPO / "results").glob("*/comparison.json"))


def committed_sweeps():
    return sorted({p.parent.parent for p in (REPO / "results").glob("*/*/trainer_state.json")})


def readme_results(text: str, run_name: str) -> str:
    start, end = results_markers(run_name)
    return text[text.index(start) + len(start):text.index(end)].strip()


def published_block(run_name: str) -> str:
    """A generated block, from whichever page of the repository's README and docs holds it."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    holding = [p for p in pages if results_markers(run_name)[0] in p.read_text()]
    assert len(holding) == 1, (run_name, holding)
    return readme_results(holding[0].read_text(), run_name)


def test_readme_results_tables_are_generated_from_committed_results():
    runs = committed_runs()
    assert runs, "no committed study in results/"
    for run in runs:
        comparison = json.loads((run / "comparison.json").read_text())
        expected = results_markdown(comparison, f"results/{run.name}/comparison.json")
        assert published_block(run.name) == expected, run.name


def test_readme_sweep_tables_are_generated_from_committed_trainer_states(monkeypatch):
    monkeypatch.chdir(REPO)  # the tables name their folders relative to the repository, as the command does
    sweeps = committed_sweeps()
    assert {s.name for s in sweeps} >= {"lite0-cpu-pilots"}
    for sweep in sweeps:
        block = published_block(sweep.name)
        reference = re.search(r"Differs from `([^`]+)`", block).group(1)
        assert block == sweep_markdown(sweep.relative_to(REPO), reference), sweep.name
        best = {run.name: json.loads((run / "trainer_state.json").read_text())["best_metric"]
                for run in sweep.iterdir()}
        # an independent reading of one row: the run's best validation score and epoch, as the file holds them
        name, value = max(best.items(), key=lambda kv: kv[1])
        assert re.search(rf"\| {re.escape(name)} \|.*\| {value:.3f} \(\d+\) \|", block), name


def test_sweep_table_compares_what_runs_did_not_how_their_config_spelled_it(tmp_path):
    """Configs written by older versions of train.py lack later options (they were off) and name the starting
    weights another way; the table lists only real differences."""
    weights = "../shared/weights/efficientnet_lite0.in1k.safetensors"
    runs = {"old": {"model": {"pretrained": True, "pretrained_file": weights}, "train": {"seed": 42}},
            "new": {"model": {"pretrained": False, "pretrained_files": {"efficientnet_lite0": weights}},
                    "train": {"seed": 43, "mixup": 0.0, "ema_decay": 0.0}},
            "scratch": {"model": {"pretrained": False}, "train": {"seed": 42, "lr": 1e-3}}}
    for name, config in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"config": {"data": {}, **config}}))
        (tmp_path / name / "trainer_state.json").write_text(json.dumps(
            {"history": [{"val_balanced_accuracy": 0.5}], "best_metric": 0.5, "best_epoch": 1}))
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1]
            for line in sweep_markdown(tmp_path, "old").splitlines() if line.startswith("| ") and "Run" not in line}
    assert rows == {"new": "-", "old": "-", "scratch": "init=random (from scratch), lr=0.001"}


def bundled_run():
    """(committed run, backbone) whose regenerated model card is the bundled model's card, else (None, backbone)."""
    bundle = app.BUNDLED_MODEL
    backbone = json.loads((bundle / "config.json").read_text())["architecture"]
    card = (bundle / "README.md").read_text()
    for run in committed_runs():
        if (run / backbone / "metrics.json").is_file():
            run_info = json.loads((run / "config.json").read_text())
            if card == str(model_card(read_backbone_row(run / backbone), run_info)):
                return run, backbone
    return None, backbone


def test_bundled_model_and_its_card_come_from_the_results():
    bundle = app.BUNDLED_MODEL
    assert (bundle / "model.safetensors").stat().st_size <= 15 * 2**20
    card = (bundle / "README.md").read_text()
    assert (REPO / "model_card.md").read_text() == card
    run, backbone = bundled_run()
    assert run is not None, "the bundled model's card is not the card of any committed run's backbone"
    run_info = json.loads((run / "config.json").read_text())
    assert f"`{' '.join(run_info['command'])}`" in card  # the exact command is recorded
    predictor = Predictor(str(bundle))
    assert predictor.label_names == tuple(run_info["label_names"])
    assert predictor.default_method == json.loads((run / backbone / "explain_faithfulness.json").read_text())[
        "best_method"]
    # the analysis it ships with (which publish compares against) is the run's
    assert (bundle / "analysis.json").read_text() == (run / backbone / "analysis.json").read_text()


def test_publish_copies_a_run(smoke_run, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    start, end = results_markers(smoke_run.name)
    (repo / "README.md").write_text("# x\n")
    with pytest.raises(SystemExit, match=start):  # no place for the table: nothing is written
        publish_run(smoke_run, "resnet18", repo)
    assert not (repo / "results").exists() and not (repo / "models").exists()

    (repo / "README.md").write_text(f"# x\n\n{start}\nold\n{end}\n\nafter\n")
    publish_run(smoke_run, None, repo)  # results only: no model bundled
    assert not (repo / "models").exists() and not (repo / "model_card.md").exists()
    publish_run(smoke_run, "resnet18", repo)
    comparison = json.loads((smoke_run / "comparison.json").read_text())
    assert readme_results((repo / "README.md").read_text(), smoke_run.name) == results_markdown(
        comparison, f"results/{smoke_run.name}/comparison.json")
    assert (repo / "README.md").read_text().endswith("after\n")
    bundled = repo / "models" / "dermadetect-resnet18"
    assert sorted(p.name for p in bundled.iterdir()) == ["README.md", "analysis.json", "config.json",
                                                          "examples.json", "model.safetensors", "ood.safetensors"]
    # no dataset image enters the repository: the demo reads the listed examples from DERMADETECT_DATA
    assert len(json.loads((bundled / "examples.json").read_text())) == 7 and not list(repo.rglob("*.jpg"))
    assert "CC BY-NC 4.0" in (bundled / "README.md").read_text().split("examples/", 1)[1][:300]
    assert (repo / "model_card.md").read_text() == (smoke_run / "resnet18" / "export" / "README.md").read_text()
    for backbone in ("resnet18", "efficientnet_b0", "convnextv2_nano"):
        assert (repo / "results" / smoke_run.name / backbone / "metrics.json").is_file()

    # a bundled model that serves better is kept unless forced, and the refusal names both numbers
    new = json.loads((smoke_run / "efficientnet_b0" / "export" / "analysis.json").read_text())
    served = new["test_final"]["balanced_accuracy"]
    analysis = json.loads((bundled / "analysis.json").read_text())
    analysis["test_final"]["balanced_accuracy"] = served + 0.1
    (bundled / "analysis.json").write_text(json.dumps(analysis))
    with pytest.raises(SystemExit, match=rf"{served:.3f}.*below.*{served + 0.1:.3f}.*--force"):
        publish_run(smoke_run, "efficientnet_b0", repo)
    assert [p.name for p in (repo / "models").iterdir()] == ["dermadetect-resnet18"]
    publish_run(smoke_run, "efficientnet_b0", repo, force=True)
    assert [p.name for p in (repo / "models").iterdir()] == ["dermadetect-efficientnet_b0"]  # one bundled model

    # an incomplete export is refused before anything changes; a republished run leaves no file of an earlier one
    bundled = repo / "models" / "dermadetect-efficientnet_b0"
    before = {p.name: p.read_bytes() for p in bundled.iterdir()}
    run = Path(shutil.copytree(smoke_run, tmp_path / "runs" / smoke_run.name, ignore=shutil.ignore_patterns("state")))
    (run / "resnet18" / "export" / "ood.safetensors").unlink()
    stale = repo / "results" / run.name / "resnet18" / "robustness_test.json"
    stale.write_text("{}")
    with pytest.raises(SystemExit, match="export/? lacks ood.safetensors.*Nothing was changed"):
        publish_run(run, "resnet18", repo, force=True)
    assert {p.name: p.read_bytes() for p in bundled.iterdir()} == before and stale.is_file()
    publish_run(run, None, repo)
    assert not stale.exists()
    (run / "comparison.json").unlink()  # an unfinished run: refused before results/ is touched
    with pytest.raises(SystemExit, match="lacks comparison.json.*Nothing was changed"):
        publish_run(run, None, repo)
    assert (repo / "results" / run.name / "comparison.json").is_file()
    shutil.rmtree(repo)


@pytest.mark.parametrize("name", ["comparison.json", "config.json", "splits.csv"])
def test_committed_run_is_complete(name):
    assert all((run / name).is_file() for run in committed_runs())


def test_bundled_model_applies_the_studied_ood_guard():
    """The Predictor flags exactly the non-dermoscopic pictures the study's analysis flagged, with its scores."""
    from dermadetect.study import photo_samples

    bundle = app.BUNDLED_MODEL
    run, backbone = bundled_run()
    analysis = json.loads((run / backbone / "analysis.json").read_text())
    predictor = Predictor(str(bundle))
    assert predictor.ood.threshold == analysis["ood"]["threshold"]
    flagged = []
    for name, image in photo_samples():
        result = predictor.predict(image)
        flagged.append(result.out_of_distribution)
        if max(image.size) <= 1024:  # larger uploads are reduced first, so their pixels differ slightly
            assert result.ood_score == pytest.approx(analysis["ood"]["photo_scores"][name], rel=1e-3)
    assert sum(flagged) / len(flagged) == pytest.approx(analysis["ood"]["photos_flagged"])


def calibrated_predictions(folder, split: str) -> tuple[list[dict], np.ndarray, np.ndarray, np.ndarray]:
    """A committed predictions_calibrated_<split>.csv: rows, labels, probabilities and decisions as indices."""
    rows, names, labels, probs = read_predictions(folder / f"predictions_calibrated_{split}.csv")
    return rows, labels, probs, np.array([names.index(r["pred"]) for r in rows])


def test_decision_rule_is_redone_from_the_committed_predictions():
    """Each strength's validation balanced accuracy, redone by hand from the validation file's probabilities, is
    the recorded one and the chosen strength wins it; the test balanced accuracy is the test file's decisions'
    (scikit-learn), as analysis.json and README report it."""
    analysed = [folder for run in committed_runs() for folder in sorted(run.iterdir())
                if (folder / "analysis.json").is_file() and "decision" in json.loads(
                    (folder / "analysis.json").read_text())]
    assert analysed, "no committed analysis has a decision rule"
    for folder in analysed:
        analysis = json.loads((folder / "analysis.json").read_text())
        decision = analysis["decision"]
        prior = np.array(list(decision["class_prior"].values()))
        _, val_labels, val_probs, _ = calibrated_predictions(folder, "validation")
        redone = {s: balanced_accuracy_score(val_labels, (val_probs / prior ** float(s)).argmax(axis=1))
                  for s in decision["validation_balanced_accuracy"]}
        assert redone == pytest.approx(decision["validation_balanced_accuracy"]), folder
        assert redone[f"{decision['strength']:g}"] == max(redone.values()), folder
        _, labels, probs, decisions = calibrated_predictions(folder, "test")
        assert balanced_accuracy_score(labels, decisions) == pytest.approx(
            analysis["bootstrap"]["test"]["balanced_accuracy"]["value"]), folder
        assert balanced_accuracy_score(labels, probs.argmax(axis=1)) == pytest.approx(
            decision["test_argmax"]["balanced_accuracy"]), folder


def test_bundled_model_makes_the_studys_calls(ham224):
    """On real test images the bundled Predictor gives the probabilities and the decision that the study
    recorded for them: test-time augmentation, temperature and decision rule are applied as analysed. The
    images include every class and calls that differ from the argmax."""
    run, backbone = bundled_run()
    rows, labels, probs, decisions = calibrated_predictions(run / backbone, "test")
    chosen = [int(np.flatnonzero(labels == k)[0]) for k in np.unique(labels)]
    moved = np.flatnonzero(decisions != probs.argmax(axis=1))
    assert len(moved), "the bundled model's decision rule changes no test call"
    chosen += list(moved[:6])
    predictor = Predictor(str(app.BUNDLED_MODEL))
    for i in chosen:
        result = predictor.predict(ham224 / "test" / f"{rows[i]['image_id']}.jpg")
        assert result.top_label == rows[i]["pred"], rows[i]["image_id"]
        assert list(result.probabilities.values()) == pytest.approx(probs[i], abs=2e-4), rows[i]["image_id"]


def test_readme_is_a_short_space_card_whose_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert text.startswith("---\n") and "app_file: app.py" in text  # the Space's front matter
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (REPO / link).is_file(), link


def test_robustness_benchmark_agrees_with_the_analysis_on_clean_test_images():
    """The card's robustness table (benchmarks/bench_robustness.py, its own data loading and forward pass) and
    the evaluation pass behind analysis.json score the clean test set alike: the same served call, melanoma
    sensitivity, calibration and guard flags."""
    run, backbone = bundled_run()
    robustness = json.loads((run / backbone / "robustness_test.json").read_text())
    analysis = json.loads((run / backbone / "analysis.json").read_text())
    clean = next(r for r in robustness["rows"] if r["condition"] == "clean")
    assert clean["images"] == sum(analysis["test_final"][k] for k in analysis["test_final"] if k.startswith("support/"))
    assert clean["balanced_accuracy"] == pytest.approx(analysis["test_final"]["balanced_accuracy"], abs=2e-3)
    assert clean["melanoma_sensitivity"] == pytest.approx(analysis["melanoma_operating_point"]["test"]["sensitivity"],
                                                          abs=0.01)
    assert clean["ece"] == pytest.approx(analysis["calibration"]["test"]["after"]["ece"], abs=3e-3)
    assert clean["ood_flagged"] == pytest.approx(analysis["ood"]["test_flagged"], abs=3e-3)
    assert {r["condition"] for r in robustness["rows"]} >= {"clean", "downscale_128", "downscale_160", "jpeg_30",
                                                            "aspect_4_3", "colour_cast", "blur", "rotate_37"}


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_pictures_benchmark_scores_each_picture_once_as_an_upload(ham224, monkeypatch, tmp_path):
    """benchmarks/bench_pictures.py through the bundled model: one line per package (Tux Paint's stamps per top
    folder), each picture once (a link, an identical copy, a mirrored copy and a preview thumbnail are left out; of
    one picture's sizes the largest is scored): a picture is flagged, the test image the evaluation pass scored
    most like dermoscopy passes, a file too small to upload is refused with the reason. The interval is the
    textbook Wilson one."""
    from skimage import data as pictures

    bench = load_benchmark("bench_pictures")
    run, backbone = bundled_run()
    rows, *_ = read_predictions(run / backbone / "predictions_calibrated_test.csv")
    most_dermoscopic = min(rows, key=lambda r: float(r["ood_score"]))["image_id"]
    stamps, wallpaper = tmp_path / "stamps", tmp_path / "wallpapers" / "Lesion" / "contents" / "images"
    for folder in (stamps / "animals", stamps / "people", stamps / "food", wallpaper):
        folder.mkdir(parents=True)
    cat = Image.fromarray(pictures.chelsea())
    for path in (stamps / "animals" / "cat.png", stamps / "animals" / "cat_mirror.png", stamps / "people" / "cat.png",
                 wallpaper.parent / "screenshot.png"):
        cat.save(path)
    cat.resize((100, 66)).save(wallpaper / "100x66.png")  # named as a smaller size of the wallpaper
    Image.new("RGB", (20, 20), "brown").save(stamps / "food" / "nut.png")
    shutil.copy(ham224 / "test" / f"{most_dermoscopic}.jpg", wallpaper / "224x224.jpg")
    (wallpaper / "640x480.jpg").symlink_to("224x224.jpg")
    files = {"tuxpaint-stamps-default": sorted(stamps.rglob("*.png")),
             "plasma-workspace-wallpapers": sorted(wallpaper.parent.rglob("*.*"))}
    monkeypatch.setattr(bench, "STAMPS", stamps)
    monkeypatch.setattr(bench, "package_files", lambda package: files.get(package, []))
    out = tmp_path / "pictures.json"
    bench.main(["--out", str(out)])
    lines = {line["set"]: line for line in json.loads(out.read_text())}
    assert set(lines) == {"tuxpaint-stamps-default/animals", "tuxpaint-stamps-default/food",
                          "plasma-workspace-wallpapers", "kind: wallpapers", "kind: cut-outs", "all"}
    assert lines["tuxpaint-stamps-default/animals"] == {
        "set": "tuxpaint-stamps-default/animals", "pictures": 1, "flagged": 1, "flagged_share": 1.0,
        "interval95": [0.2065, 1.0], "passed": [], "refused": []}
    assert lines["plasma-workspace-wallpapers"]["passed"] == [str((wallpaper / "224x224.jpg").resolve())]
    (refused,) = lines["tuxpaint-stamps-default/food"]["refused"]
    assert refused.startswith(f"{stamps / 'food' / 'nut.png'}: the image is 20x20") and "32 pixels" in refused
    assert (lines["kind: wallpapers"]["pictures"], lines["kind: cut-outs"]["refused"]) == (1, [refused])
    every = lines["all"]
    assert (every["pictures"], every["flagged"], every["model"]) == (2, 1, "models/" + app.BUNDLED_MODEL.name)
    assert every["interval95"] == [0.0945, 0.9055]  # Wilson, 1 of 2; 1 of 1 above: 1 / (1 + 1.96^2)
    assert every["threshold"] == json.loads((run / backbone / "analysis.json").read_text())["ood"]["threshold"]

    def dpkg_refuses(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", f"dpkg-query: package '{command[-1]}' is not installed")
    monkeypatch.setattr(subprocess, "run", dpkg_refuses)
    with pytest.raises(SystemExit, match="mate-backgrounds is not installed .*: apt-get install mate-backgrounds"):
        load_benchmark("bench_pictures").package_files("mate-backgrounds")


def test_card_states_the_pictures_benchmark_only_for_the_guard_it_measured():
    from dermadetect.hub import guard_checks

    run, backbone = bundled_run()
    ood = json.loads((run / backbone / "analysis.json").read_text())["ood"]
    *sets, every = json.loads((run / backbone / "guard_pictures.json").read_text())
    stated = f"{every['flagged_share']:.1%} of {every['pictures']} everyday pictures"
    assert stated in guard_checks(ood, [*sets, every])
    assert "everyday pictures" not in guard_checks(ood, [*sets, every | {"threshold": ood["threshold"] + 0.1}])
    assert "everyday pictures" not in guard_checks(ood, None)


def test_committed_pictures_benchmark_is_the_bundled_guards():
    """The card's everyday-pictures figure (guard_pictures.json) was measured with the bundled guard, and its last
    line adds up the sets."""
    run, backbone = bundled_run()
    lines = json.loads((run / backbone / "guard_pictures.json").read_text())
    every = lines[-1]
    sets = [line for line in lines[:-1] if not line["set"].startswith("kind: ")]
    kinds = [line for line in lines[:-1] if line["set"].startswith("kind: ")]
    assert every["threshold"] == json.loads((run / backbone / "analysis.json").read_text())["ood"]["threshold"]
    for pooled in (sets, kinds):
        for key in ("pictures", "flagged"):
            assert every[key] == sum(line[key] for line in pooled)
        for key in ("passed", "refused"):
            assert sorted(every[key]) == sorted(file for line in pooled for file in line[key])
    assert every["flagged"] == every["pictures"] - len(every["passed"])


def test_guard_benchmark_scores_the_choices_the_guard_was_made_with(smoke_run, tmp_path):
    """benchmarks/bench_guard.py on a run's evaluation outputs: one line per variant, with every picture of the
    evaluation pass and the photos of skin cross-validated; the served line is the analysis's guard. The same head
    with a threshold that passes more of validation sits higher and flags no more of anything."""
    from dermadetect.study import GUARD_KEEP, GUARD_KEEPS_TRIED, PHOTO_SAMPLES

    out = tmp_path / "guard.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_guard.py"), str(smoke_run), "resnet18",
                    "--out", str(out)], check=True, capture_output=True)
    lines = json.loads(out.read_text())
    analysis = json.loads((smoke_run / "resnet18" / "analysis.json").read_text())["ood"]
    (served,) = [line for line in lines if line["served"]]
    assert (served["validation_passed"], served["clinics"]) == (GUARD_KEEP, "weighed equally")
    assert served["threshold"] == pytest.approx(analysis["threshold"])
    for rate in ("photos_flagged", "skin_photos_flagged", "validation_flagged"):
        assert served[rate] == pytest.approx(analysis["cross_validated"][rate])
    assert {line["clinics"] for line in lines} == {"weighed equally", "pooled"}
    assert sorted({line["features"] for line in lines}) == [512, served["features"]]  # resnet18's penultimate
    assert served["features"] > 512
    for line in lines:
        assert line["photos"] == len(PHOTO_SAMPLES) and 0 <= line["skin_photos_flagged"] <= 1
        assert line["unseen_clinics"] == {}  # the smoke run validates on too few images of each clinic
    for features in (512, served["features"]):
        same_head = sorted((line for line in lines if line["features"] == features
                            and line["clinics"] == "weighed equally"), key=lambda line: line["validation_passed"])
        assert [line["validation_passed"] for line in same_head] == list(GUARD_KEEPS_TRIED)
        for looser, stricter in zip(same_head, same_head[1:]):
            assert stricter["threshold"] > looser["threshold"]
            for rate in ("photos_flagged", "skin_photos_flagged", "validation_flagged"):
                assert stricter[rate] <= looser[rate]


def test_ensemble_benchmark_of_a_model_with_itself_is_that_model(smoke_run, tmp_path):
    """The mean of a model with itself is the model: the same balanced accuracy in every condition and a zero
    bootstrap interval. Models validated on other images are refused."""
    bench = [sys.executable, str(REPO / "benchmarks" / "bench_ensemble.py")]
    model, out = smoke_run / "resnet18", tmp_path / "same.json"
    subprocess.run([*bench, str(model), str(model), "--resamples", "50", "--out", str(out)], check=True,
                   capture_output=True)
    lines = json.loads(out.read_text())
    assert [(line["split"], line["views"]) for line in lines] == [("validation", 8), ("validation", 1),
                                                                  ("validation_shifted", 1)]
    for line in lines:
        assert line["balanced_accuracy"]["mean"] == line["balanced_accuracy"][str(model)]
        assert line["mean_minus_best_95"] == [0.0, 0.0]
    other = tmp_path / "other"
    shutil.copytree(model, other, ignore=shutil.ignore_patterns("best", "state", "export"))
    table = (other / "predictions_validation.csv").read_text().splitlines()
    (other / "predictions_validation.csv").write_text("\n".join([table[0], *reversed(table[1:])]) + "\n")
    refused = subprocess.run([*bench, str(model), str(other)], capture_output=True, text=True)
    assert refused.returncode != 0 and "other images" in refused.stderr


def test_framing_benchmark_scores_the_served_crop_as_the_evaluation_pass_did(smoke_run, tmp_path):
    """The run's served crop (smoke.yaml: 1.0) scored by the framing benchmark's pass gives the balanced accuracies
    the ensemble benchmark computes from the evaluation pass's outputs, in every condition; another crop is
    compared with it by a lesion-bootstrap interval. A crop outside (0, 1] is refused in plain words."""
    model, out, same = smoke_run / "resnet18", tmp_path / "framing.json", tmp_path / "same.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_framing.py"), str(smoke_run), "resnet18",
                    "--crop-pcts", "1.0", "0.875", "--resamples", "50", "--out", str(out)], check=True,
                   capture_output=True)
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_ensemble.py"), str(model), str(model),
                    "--resamples", "10", "--out", str(same)], check=True, capture_output=True)
    framing, evaluated = json.loads(out.read_text()), json.loads(same.read_text())
    assert [(line["split"], line["views"]) for line in framing] == [(line["split"], line["views"])
                                                                    for line in evaluated]
    for line, reference in zip(framing, evaluated):
        assert line["balanced_accuracy"]["1.0"] == pytest.approx(reference["balanced_accuracy"][str(model)])
        low, high = line["minus_reference_95"]["0.875"]
        assert low <= high and set(line["minus_reference_95"]) == {"0.875"}
        assert line["melanoma_auc"]["0.875"] != line["melanoma_auc"]["1.0"]  # the other crop was really applied
    refused = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_framing.py"), str(smoke_run),
                              "resnet18", "--crop-pcts", "1.0", "1.5"], capture_output=True, text=True)
    assert refused.returncode != 0 and "eval_crop_pct is 1.5" in refused.stderr
