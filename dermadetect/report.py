"""Plots per backbone and the comparison table across backbones."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402

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
    convnexts = [r for r in rows if r["backbone"].startswith("convnext")]
    if convnexts:
        best_convnext = max(convnexts, key=lambda r: r["validation"][select_on])
        text += f"Best ConvNeXtV2 (the demo's model): **{best_convnext['backbone']}** ({_where(best_convnext)}).\n"
    (out_dir / "comparison.md").write_text(text)
    return comparison


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
    return "\n".join(lines)
