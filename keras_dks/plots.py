"""Per-head train/test error curves, like Figure 1 of the DKS paper.

Reads the per-epoch logs of `DKSModel.fit` (a `History.history` dict or the
JSON written by `keras_dks.recipes.train`): `accuracy` /
`<head>_accuracy` are the training accuracies of the main and auxiliary
heads, `val_...` the test accuracies. Needs matplotlib (the
`keras-dks[plots]` extra).
"""

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
        curve is an empty list. Training errors are epoch means of the
        running accuracy on augmented batches (what `fit` logs).

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


def plot_error_curves(histories, path, title=None, heads=None):
    """Write a PNG of train (dashed) and test (solid) error per head.

    Args:
        histories: one history dict, or `{run label: history dict}` to
            compare runs (e.g. baseline vs DKS) in one figure.
        path: output PNG path (folders are created).
        title: figure title.
        heads: head names to draw, in this order (e.g. `model.head_names`;
            default: every head in the logs).

    Returns:
        `path`.

    Example:
    ```python
    plot_error_curves({"baseline": h0, "dks": h1}, "runs/curves.png",
                      title="WRN-28-10, CIFAR-100")
    ```
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if histories and all(isinstance(v, dict) for v in histories.values()):
        runs = dict(histories)
    else:
        runs = {"": histories}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    k = 0
    for label, history in runs.items():
        for head, curve in error_curves(history, heads).items():
            color = colors[k % len(colors)]
            k += 1
            name = f"{label} {head}".strip()
            for split, style in (("train", "--"), ("test", "-")):
                values = curve[split]
                if values:
                    epochs = range(1, len(values) + 1)
                    ax.plot(epochs, values, style, color=color, label=f"{name} ({split})")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if k:
        ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
