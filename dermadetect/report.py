"""Plots per backbone and the comparison table across backbones."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402

from .config import DataConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402

ROBUSTNESS_FILE = "robustness_test.json"   # benchmarks/bench_robustness.py --split test --out, per backbone
PICTURES_FILE = "guard_pictures.json"      # benchmarks/bench_pictures.py --out, on the backbone's export

COMPARISON_COLUMNS = (
    ("balanced_accuracy", "Bal. acc"), ("accuracy", "Acc"), ("f1_macro", "Macro F1"),
    ("precision_macro", "Macro prec"), ("recall_macro", "Macro rec"), ("roc_auc_macro", "Macro AUC"),
    ("melanoma_sensitivity", "Mel sens"), ("melanoma_specificity", "Mel spec"),
)


def plot_confusion_matrix(y_true, probs, label_names, path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, normalize, subtitle in ((axes[0], None, "counts"), (axes[1], "true", "row-normalised (recall)")):
        ConfusionMatrixDisplay.from_predictions(
            y_true, probs.argmax(1), labels=np.arange(len(label_names)), display_labels=label_names,
            normalize=normalize, values_format=".2f" if normalize else "d", cmap="Blues", ax=ax, colorbar=False)
        ax.set_title(f"{title}: {subtitle}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc_curves(y_true, probs, label_names, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 6))
    for k, name in enumerate(label_names):
        positives = (y_true == k)
        if 0 < positives.sum() < len(y_true):
            RocCurveDisplay.from_predictions(positives, probs[:, k], name=name, ax=ax, plot_chance_level=(k == 0))
    ax.set_title(f"{title}: one-vs-rest ROC")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training_curves(history: list[dict], path: Path, title: str) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.legend()
    ax_metric.plot(epochs, [h["val_balanced_accuracy"] for h in history], marker="o", label="val balanced acc")
    ax_metric.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="val accuracy")
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylim(0, 1)
    ax_metric.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_backbone_plots(y_true, probs, label_names, history, out_dir: Path, backbone: str) -> None:
    plot_confusion_matrix(y_true, probs, label_names, out_dir / "confusion_matrix.png", f"{backbone} (test)")
    plot_roc_curves(y_true, probs, label_names, out_dir / "roc_curves.png", f"{backbone} (test)")
    plot_training_curves(history, out_dir / "training_curves.png", backbone)


def write_comparison(rows: list[dict], out_dir: Path, select_on: str = "balanced_accuracy") -> dict:
    """comparison.json and comparison.md: one row per backbone; the best is chosen on VALIDATION `select_on`
    (the test split is only reported)."""
    best = max(rows, key=lambda r: r["validation"][select_on])
    comparison = {"selected_on": f"validation {select_on}", "best_backbone": best["backbone"], "rows": rows}
    (out_dir / "comparison.json").write_text(json.dumps(comparison, indent=1, allow_nan=False))
    header = ["Backbone", "Init", "Params (M)"] + [label for _, label in COMPARISON_COLUMNS] + \
             ["Val bal. acc", "Best epoch", "Train min", "Train img/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        test = r["test"]
        cells = [r["backbone"] + (" **(best)**" if r is best else ""), r["init"], f"{r['parameters'] / 1e6:.1f}"]
        cells += [_fmt(test.get(key)) for key, _ in COMPARISON_COLUMNS]
        cells += [_fmt(r["validation"][select_on]), str(r["best_epoch"]), f"{r['train_seconds'] / 60:.1f}",
                  f"{r['train_images_per_second']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    text = (f"# Backbone comparison\n\nTest split: {rows[0]['test_split']}. Metrics on the test split; the best "
            f"backbone is chosen on validation {select_on}.\n\n" + "\n".join(lines) +
            f"\n\nBest model: **{best['backbone']}** ({_where(best)}).\n")
    if all("analysis" in r for r in rows):
        text += "\n" + analysis_markdown(rows) + "\n"
        plot_comparison(rows, label_names_of(rows[0]), out_dir / "comparison.png",
                        f"Test split: {rows[0]['test_split']}")
    convnexts = [r for r in rows if r["backbone"].startswith("convnext")]
    if convnexts:
        best_convnext = max(convnexts, key=lambda r: r["validation"][select_on])
        text += f"Best ConvNeXtV2 (the demo's model): **{best_convnext['backbone']}** ({_where(best_convnext)}).\n"
    (out_dir / "comparison.md").write_text(text)
    return comparison


def label_names_of(row: dict) -> list[str]:
    return [key.split("/", 1)[1] for key in row["test"] if key.startswith("support/")]


def _ci(entry: dict) -> str:
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def analysis_markdown(rows: list[dict]) -> str:
    """The analysed results: every choice made on validation, the test split scored once, 95% bootstrap
    intervals over lesions in brackets."""
    header = ["Backbone", "Bal. acc [95% CI]", "Macro F1 [95% CI]", "Macro AUC [95% CI]", "Bal. acc no TTA / TTA",
              "TTA used", "T", "Decision (bal. acc of argmax)", "ECE before / after", "Mel threshold",
              "Mel sens [95% CI]", "Mel spec", "Mel PPV", "Mel NPV", "OOD AUROC (guard / energy)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        a = r["analysis"]
        ci, mel, cal = a["bootstrap"]["test"], a["melanoma_operating_point"], a["calibration"]["test"]
        lines.append("| " + " | ".join([
            r["backbone"], _ci(ci["balanced_accuracy"]), _ci(ci["f1_macro"]), _ci(ci["roc_auc_macro"]),
            f"{_fmt(a['tta']['test_without']['balanced_accuracy'])} / {_fmt(a['tta']['test_with']['balanced_accuracy'])}",
            "yes" if a["tta"]["used"] else "no", f"{a['temperature']:.2f}", _decision(a),
            f"{cal['before']['ece']:.3f} / {cal['after']['ece']:.3f}", f"{mel['threshold']:.3f}",
            _ci(ci["melanoma_sensitivity_at_threshold"]), _fmt(mel["test"]["specificity"]),
            _fmt(mel["test"]["ppv"]), _fmt(mel["test"]["npv"]),
            f"{a['ood']['auroc_test_vs_photos']:.3f} / {a['ood']['auroc_energy_test_vs_photos']:.3f}"]) + " |")
    return ("## After calibration, test-time augmentation and the melanoma operating point\n\n"
            "TTA (8 dihedral views) is used only if it wins on validation balanced accuracy; the temperature T, the "
            "decision rule, the melanoma threshold (P(mel) for validation sensitivity >= 0.85) and the OOD guard's "
            "threshold are fitted on validation. Decision: the argmax of log P(class) - s * log(class "
            "share of train), with the strength s (0 = plain argmax) that gives the best validation balanced "
            "accuracy. Test metrics below use the calibrated model and this decision; brackets: 95% bootstrap "
            "intervals over lesions. OOD AUROC: ISIC 2018 test images vs the non-dermoscopic sample pictures "
            "shipped with Python packages (listed in each analysis.json).\n\n" + "\n".join(lines))


def _decision(analysis: dict) -> str:
    decision = analysis["decision"]
    return f"s = {decision['strength']:g} ({_fmt(decision['test_argmax']['balanced_accuracy'])})"


def _where(row: dict) -> str:
    hub = row.get("hub")
    return f"Hub `{hub['repo_id']}`, commit {hub['commit_url']}" if hub else row["checkpoint"]


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def plot_cam_gallery(cases: list[dict], path: Path, title: str) -> None:
    """A grid of overlays, one row per class: correct cases on the left, wrong ones on the right.
    Each case: {"overlay": PIL image, "label": true label, "pred": predicted label, "prob": float, "correct": bool}."""
    labels = sorted({c["label"] for c in cases})
    per_row = max((sum(1 for c in cases if c["label"] == label) for label in labels), default=1)
    fig, axes = plt.subplots(len(labels), per_row, figsize=(2.4 * per_row, 2.5 * len(labels)), squeeze=False)
    for row, label in enumerate(labels):
        row_cases = sorted((c for c in cases if c["label"] == label), key=lambda c: not c["correct"])
        for col, ax in enumerate(axes[row]):
            ax.axis("off")
            if col < len(row_cases):
                case = row_cases[col]
                ax.imshow(case["overlay"])
                ax.set_title(f"true {case['label']} / pred {case['pred']} ({case['prob']:.2f})",
                             fontsize=7, color="darkgreen" if case["correct"] else "firebrick")
    fig.suptitle(title, fontsize=9, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def results_markdown(comparison: dict, source: str) -> str:
    """The README's results table, from a committed comparison.json (test split metrics)."""
    rows = comparison["rows"]
    header = ["Backbone", "Init", "Test bal. acc", "Test acc", "Macro F1", "Macro AUC", "Mel sens", "Mel spec",
              "Val bal. acc", "Train min"]
    lines = [f"From `{source}` (test split: {rows[0]['test_split']}; checkpoints chosen on validation "
             "balanced accuracy).", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        t = r["test"]
        lines.append("| " + " | ".join([r["backbone"], r["init"]] + [_fmt(t.get(k)) for k in (
            "balanced_accuracy", "accuracy", "f1_macro", "roc_auc_macro", "melanoma_sensitivity",
            "melanoma_specificity")] + [_fmt(r["validation"]["balanced_accuracy"]),
                                        f"{r['train_seconds'] / 60:.0f}"]) + " |")
    if all("analysis" in r for r in rows):
        lines += ["", analysis_markdown(rows).replace("## ", "#### ", 1)]
    return "\n".join(lines)


SWEEP_IGNORED = {"num_workers", "seed"}  # the machine's, and a column of its own
INIT_SETTINGS = {"pretrained", "pretrained_files"}  # compared as the start they give


def _flat_settings(config: dict, backbone: str) -> dict:
    """The data, model and training settings of a saved run config, in one dict, compared as today's settings:
    a setting the run's version of train.py did not have yet takes today's default; options since removed
    were off in every committed run (results of those that used them went with them); one weights file for
    every backbone (pretrained_file, since folded into pretrained_files) is the same start."""
    model = dict(config["model"])
    if model.pop("pretrained_file", None):
        model["pretrained_files"] = {backbone: config["model"]["pretrained_file"]}
    current = {section: {f.name for f in fields(cls)} for section, cls in
               (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig))}
    sections = {"data": config["data"], "model": model, "train": config["train"]}
    full = RunConfig.from_dict({s: {k: v for k, v in values.items() if k in current[s]}
                                for s, values in sections.items()})
    flat = {k: v for section in (full.data, full.model, full.train) for k, v in asdict(section).items()
            if k not in SWEEP_IGNORED and k not in INIT_SETTINGS}
    return {**flat, "init": full.model.init_description(backbone)}


def sweep_markdown(folder: Path, reference: str = "base", backbone: str = "efficientnet_lite0") -> str:
    """A table of training runs that differ from `reference` in a setting or the seed: each run folder holds
    the run's config.json and the backbone's trainer_state.json (validation balanced accuracy per epoch)."""
    runs = {}
    for run in sorted(p for p in Path(folder).iterdir() if (p / "trainer_state.json").is_file()):
        config = json.loads((run / "config.json").read_text())["config"]
        runs[run.name] = (config, json.loads((run / "trainer_state.json").read_text()))
    base = _flat_settings(runs[reference][0], backbone)
    lines = [f"From `{folder}/*/{{config.json,trainer_state.json}}` ({backbone}; validation balanced accuracy "
             "after each epoch, best in bold).", "",
             "| Run | Differs from `" + reference + "` | Seed | Validation bal. acc by epoch | Best (epoch) |",
             "|---|---|---|---|---|"]
    for name, (config, state) in runs.items():
        changes = {k: v for k, v in _flat_settings(config, backbone).items() if base[k] != v}
        differs = ", ".join(f"{k}={v}" for k, v in sorted(changes.items())) or "-"
        curve = [h["val_balanced_accuracy"] for h in state["history"]]
        epochs = " ".join(f"**{v:.3f}**" if i + 1 == state["best_epoch"] else f"{v:.3f}"
                          for i, v in enumerate(curve))
        lines.append(f"| {name} | {differs} | {config['train']['seed']} | {epochs} | "
                     f"{state['best_metric']:.3f} ({state['best_epoch']}) |")
    return "\n".join(lines)


def read_backbone_row(folder: Path) -> dict:
    """A finished backbone's metrics.json, with its analysis.json (if analysed) under "analysis", where it
    was pushed (hub.json) under "hub", its robustness benchmark on test under "robustness" and its guard on
    everyday pictures under "pictures"."""
    row = json.loads((Path(folder) / "metrics.json").read_text())
    for key, name in (("analysis", "analysis.json"), ("hub", "hub.json"), ("robustness", ROBUSTNESS_FILE),
                      ("pictures", PICTURES_FILE)):
        if (Path(folder) / name).is_file():
            row[key] = json.loads((Path(folder) / name).read_text())
    return row


def plot_reliability(calibration: dict, temperature: float, path: Path, title: str) -> None:
    """Reliability diagram before and after temperature scaling: accuracy per confidence bin against the
    diagonal, bar width the bin, with each panel's expected calibration error."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "before", "before (T = 1)"), (axes[1], "after", f"after (T = {temperature:.2f})")):
        bins = calibration[key]
        edges = np.array(bins["edges"])
        accuracy = np.array([np.nan if a is None else a for a in bins["accuracy"]])
        confidence = np.array([np.nan if c is None else c for c in bins["confidence"]])
        width = np.diff(edges)
        ax.bar(edges[:-1], np.nan_to_num(accuracy), width=width, align="edge", edgecolor="black",
               color="tab:blue", label="accuracy")
        # the gap spans accuracy..confidence: above the bar when over-confident, inside it when under-confident
        ax.bar(edges[:-1], np.nan_to_num(np.abs(confidence - accuracy)),
               bottom=np.nan_to_num(np.minimum(confidence, accuracy)), width=width, align="edge", color="none",
               edgecolor="tab:red", hatch="//", linewidth=0.8, label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top class)",
               title=f"{label}: ECE {bins['ece']:.3f}, NLL {bins['nll']:.3f}")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_comparison(rows: list[dict], label_names, path: Path, title: str) -> None:
    """The backbones at a glance: test recall per class (left) and balanced accuracy and melanoma sensitivity
    at the validation-chosen threshold with bootstrap 95% intervals (right). Rows carry "analysis"."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / len(rows)
    x = np.arange(len(label_names))
    summary = ("balanced_accuracy", "melanoma_sensitivity_at_threshold")
    for i, row in enumerate(rows):
        ci = row["analysis"]["bootstrap"]["test"]
        recalls = [ci.get(f"recall/{n}", {}).get("value", np.nan) for n in label_names]
        left.bar(x + (i - (len(rows) - 1) / 2) * width, recalls, width, label=f"{row['backbone']} ({row['init']})")
        values = np.array([ci[k]["value"] for k in summary])
        errors = np.array([[ci[k]["value"] - ci[k]["low"], ci[k]["high"] - ci[k]["value"]] for k in summary]).T
        right.bar(np.arange(len(summary)) + (i - (len(rows) - 1) / 2) * width, values, width, yerr=errors,
                  capsize=3)
    left.set(xticks=x, xticklabels=label_names, ylim=(0, 1), ylabel="test recall", title="recall per class")
    left.legend(fontsize=8, loc="upper left")
    right.axhline(0.85, color="gray", linestyle=":", linewidth=1)
    right.set(xticks=np.arange(len(summary)), xticklabels=["balanced acc.", "melanoma sens.\n(val threshold)"],
              ylim=(0, 1), title="with 95% bootstrap intervals")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
