"""Per-head train/test error curves, like Figure 1 of the DKS paper.

Reads the per-epoch logs of `DKSModel.fit` (a `History.history` dict or the
JSON written by `keras_dks.recipes.train`): `accuracy` /
`<head>_accuracy` are the training accuracies of the main and auxiliary
heads, `val_...` the test accuracies. Needs matplotlib (the
`keras-dks[plots]` extra).
"""

import math
import os


def head_names_of(history):
    """Head names in DKS logs: `"main"` plus every `<head>` of a
    `<head>_ce_loss` entry (the per-head losses `DKSModel` logs)."""
    names = ["main"]
    for key in history:
        if key.endswith("_ce_loss") and not key.startswith("val_"):
            names.append(key[: -len("_ce_loss")])
    return names


def error_curves(history, head_names=None):
    """Per-head error curves (%) from DKS training logs.

    Args:
        history: dict of per-epoch lists, e.g. `model.fit(...).history`.
        head_names: heads to read (default: `head_names_of(history)`, i.e.
            `model.head_names`). The main head's accuracy is `accuracy`,
            an auxiliary head's `<head>_accuracy`; `val_` marks test values.

    Returns:
        `{head: {"train": [...], "test": [...]}}` in percent, in the order
        of `head_names`; heads without any accuracy are left out, a missing
        curve is an empty list, an epoch without evaluation is NaN (as in
        `keras_dks.recipes.read_epoch_log`). Training errors are epoch means
        of the running accuracy on augmented batches (what `fit` logs).

    Example:
    ```python
    curves = error_curves(model.fit(...).history)
    curves["main"]["test"][-1]      # final test error of the main head, %
    ```
    """
    curves = {}
    for head in head_names or head_names_of(history):
        key = "accuracy" if head == "main" else f"{head}_accuracy"
        train, test = history.get(key), history.get("val_" + key)
        if train is None and test is None:
            continue
        curves[head] = {
            split: [100.0 * (1.0 - float(v)) for v in (values or [])]
            for split, values in (("train", train), ("test", test))
        }
    return curves


def points(values, epochs):
    """`(epochs, values)` of the finite entries of a per-epoch curve.

    A curve with one entry per epoch (NaN where an epoch was not
    evaluated, as `recipes.read_epoch_log` gives) keeps its epochs; a
    shorter one (`History` with `validation_freq=k` keeps only the
    evaluated epochs) is placed at every `epochs // len(values)`-th epoch,
    as Keras evaluates.

    Args:
        values: the curve.
        epochs: the number of epochs of the run.

    Returns:
        Two lists: 1-based epochs and values.

    Example:
    ```python
    points([float("nan"), 12.0, float("nan"), 10.0], 4)   # ([2, 4], [12.0, 10.0])
    points([10.0], 24)                                      # ([24], [10.0])
    ```
    """
    if not values:
        return [], []
    if len(values) >= epochs:
        xs = range(1, len(values) + 1)
    else:
        every = max(1, epochs // len(values))
        xs = [every * (k + 1) for k in range(len(values))]
    found = [(x, v) for x, v in zip(xs, values) if math.isfinite(v)]
    return [x for x, _ in found], [v for _, v in found]


def error_figure(histories, title=None, heads=None, zoom_epochs=None):
    """A matplotlib figure of train (dashed) and test (solid, markers) error.

    Two panels: every epoch on the left (training and test error), the
    test error of the last `zoom_epochs` on the right with the y axis
    fitted to it, each curve's last test error written beside the panel.
    Each run and head has one colour; test points carry markers, so a run
    evaluated once (at the end) shows as points.

    Args:
        histories: one history dict, or `{run label: history dict}` to
            compare runs (e.g. baseline vs DKS) in one figure.
        title: figure title.
        heads: head names to draw, in this order (e.g. `model.head_names`;
            default: every head in the logs).
        zoom_epochs: epochs in the right panel (default: the last quarter,
            at least 2).

    Returns:
        The `matplotlib.figure.Figure` (close it with `plt.close(fig)`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.lines
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if histories and all(isinstance(v, dict) for v in histories.values()):
        runs = dict(histories)
    else:
        runs = {"": histories}
    curves = []  # (name, train, test) with per-epoch lists
    for label, history in runs.items():
        for head, curve in error_curves(history, heads).items():
            curves.append((f"{label} {head}".strip(), curve["train"], curve["test"]))
    epochs = max([len(c[1]) for c in curves] + [len(c[2]) for c in curves] + [1])
    zoom = zoom_epochs or max(2, math.ceil(epochs / 4))
    first = max(1, epochs - zoom + 1)

    fig, (ax_all, ax_end) = plt.subplots(
        1, 2, figsize=(11, 4.8), gridspec_kw={"width_ratios": [3, 2]}
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles, zoomed, finals = [], [], []
    for k, (name, train, test) in enumerate(curves):
        color = colors[k % len(colors)]
        x, y = points(train, epochs)
        ax_all.plot(x, y, "--", color=color, linewidth=1.2, alpha=0.8)
        x, y = points(test, epochs)
        for ax in (ax_all, ax_end):
            ax.plot(x, y, "-o", color=color, linewidth=1.8, markersize=5)
        zoomed += [(e, v) for e, v in zip(x, y) if e >= first]
        if x and x[-1] >= first:
            finals.append((y[-1], x[-1], f"{name} {y[-1]:.2f}%", color))
        handles.append(matplotlib.lines.Line2D([], [], color=color, linewidth=1.8, label=name))
    handles += [
        matplotlib.lines.Line2D([], [], color="gray", linestyle="--", label="training error"),
        matplotlib.lines.Line2D([], [], color="gray", marker="o", label="test error"),
    ]
    for ax in (ax_all, ax_end):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_all.set_ylabel("error (%)")
    ax_all.set_xlim(0.5, epochs + 0.5)
    ax_all.set_title("all epochs", fontsize="medium")
    shown = sorted({e for e, _ in zoomed})
    if len(shown) == 1:  # evaluated once in these epochs (e.g. at the end)
        ax_end.set_xlim(shown[0] - 1, shown[0] + 1)
        ax_end.set_title(f"test error at epoch {shown[0]}", fontsize="medium")
    else:
        ax_end.set_xlim(first - 0.5, epochs + 0.5)
        ax_end.set_title(f"test error, last {epochs - first + 1} epochs", fontsize="medium")
    values = [v for _, v in zoomed]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    margin = max(0.1, 0.1 * (high - low))
    ax_end.set_ylim(low - margin, high + margin)
    # Each curve's last test error, written right of the panel, in order,
    # at least a line apart.
    gap = 0.07 * (high - low + 2 * margin)
    placed = []
    for value, _, _, _ in sorted(finals):
        placed.append(max(value, placed[-1] + gap) if placed else value)
    shift = max(0.0, placed[-1] - (high + margin)) if placed else 0.0
    for (value, epoch, text, color), y in zip(sorted(finals), placed):
        right = ax_end.get_xlim()[1]
        ax_end.annotate(text, xy=(epoch, value), xytext=(right + 0.04 * (right - ax_end.get_xlim()[0]), y - shift),
                        textcoords="data", va="center", fontsize="small", color=color,
                        annotation_clip=False,
                        arrowprops={"arrowstyle": "-", "color": color, "linewidth": 0.6})
    if curves:
        ax_all.legend(handles=handles, fontsize="small", ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_error_curves(histories, path, title=None, heads=None, zoom_epochs=None):
    """Write the PNG of `error_figure` (train and test error per head).

    Args:
        histories: one history dict, or `{run label: history dict}` to
            compare runs (e.g. baseline vs DKS) in one figure.
        path: output PNG path (folders are created).
        title, heads, zoom_epochs: see `error_figure`.

    Returns:
        `path`.

    Example:
    ```python
    plot_error_curves({"baseline": h0, "dks": h1}, "runs/curves.png",
                      title="WRN-28-10, CIFAR-100")
    ```
    """
    import matplotlib.pyplot as plt

    fig = error_figure(histories, title=title, heads=heads, zoom_epochs=zoom_epochs)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
