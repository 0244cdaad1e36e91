"""Figures made from result files: training curves from log.csv (detection, classification), precision-recall
curves, per-class AP."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or assumed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def plot_losses(axis, log: pd.DataFrame, ylabel: str) -> pd.DataFrame:
    """Training and validation loss (log scale) against the epoch; returns the validated epochs' rows."""
    axis.plot(log["epoch"], log["train_loss"], label="train")
    validated = log.dropna(subset=["val_loss"])
    axis.plot(validated["epoch"], validated["val_loss"], "o-", label="validation")
    axis.set(xlabel="epoch", ylabel=ylabel, yscale="log")
    axis.legend()
    return validated


def plot_training_curve(log_csv: str | Path, png: str | Path, title: str | None = None) -> None:
    """Training and validation loss (log scale) and validation mAP against the epoch."""
    log = pd.read_csv(log_csv)
    figure, (loss_axis, map_axis) = plt.subplots(1, 2, figsize=(10, 4))
    plot_losses(loss_axis, log, "loss (per image)")
    evaluated = log.dropna(subset=["val_voc12_map"])
    map_axis.plot(evaluated["epoch"], evaluated["val_voc12_map"], "o-", label="VOC2012-style mAP")
    map_axis.plot(evaluated["epoch"], evaluated["val_voc07_map"], "s--", label="VOC2007 11-point mAP")
    map_axis.set(xlabel="epoch", ylabel="validation mAP@0.5", ylim=(0, 1))
    map_axis.legend()
    figure.suptitle(title or str(Path(log_csv).parent.name))
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)


def plot_classification_curve(log_csv: str | Path, png: str | Path, title: str | None = None) -> None:
    """pretrain.py's log: training and validation loss, and validation top-1 / top-5 accuracy, against the epoch."""
    log = pd.read_csv(log_csv)
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    validated = plot_losses(loss_axis, log, "cross-entropy (per image)")
    accuracy_axis.plot(validated["epoch"], validated["val_top1"], "o-", label="top-1")
    accuracy_axis.plot(validated["epoch"], validated["val_top5"], "s--", label="top-5")
    accuracy_axis.set(xlabel="epoch", ylabel="validation accuracy", ylim=(0, 1))
    accuracy_axis.legend()
    figure.suptitle(title or str(Path(log_csv).parent.name))
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)


def plot_precision_recall(curves: dict[str, tuple[np.ndarray, np.ndarray]], png: str | Path, title: str) -> None:
    """One precision-recall curve per class: {class name: (recall, precision)}."""
    figure, axis = plt.subplots(figsize=(7, 6))
    for name, (recall, precision) in curves.items():
        axis.plot(recall, precision, label=name, linewidth=1)
    axis.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    axis.legend(fontsize="small", ncol=2, loc="lower left")
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)


def plot_per_class_ap(ap: dict[str, float], png: str | Path, title: str) -> None:
    """A horizontal bar per class."""
    names = list(ap)
    figure, axis = plt.subplots(figsize=(7, 0.3 * len(names) + 1.5))
    axis.barh(names, [ap[name] for name in names])
    axis.set(xlabel="AP@0.5", xlim=(0, 1), title=title)
    axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
