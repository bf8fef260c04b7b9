"""Small shared helpers: atomic file writes and the step learning-rate
schedule. Imports nothing from keras_dks, so every module may use it."""

import json
import os

import keras


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write, suffix=""):
    """Write a file so readers see the old or the new one, never a mix.

    `write(tmp_path)` writes a temporary file in the same directory (ending
    in `suffix`, for writers that check the extension, e.g. Keras'
    `.weights.h5`); it is then `os.replace`d over `path` (atomic on POSIX
    and Windows local file systems) and the directory is synced.

    Example:
    ```python
    atomic_write("w.weights.h5", model.save_weights, ".weights.h5")
    ```
    """
    base = path[: -len(suffix)] if suffix and path.endswith(suffix) else path
    tmp = f"{base}.tmp-{os.getpid()}{suffix}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A failed write leaves the old file and no half-written sibling.
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_json(path, data, **dump_kwargs):
    """`atomic_write` of `json.dump(data, f, **dump_kwargs)`.

    Example:
    ```python
    atomic_write_json("history.json", {"loss": [1.2]}, indent=1)
    ```
    """

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, **dump_kwargs)

    atomic_write(path, write)


def step_schedule(lr, steps_per_epoch, boundaries, decay):
    """Step decay by epochs: `lr * decay**k` from the start of the k-th
    boundary epoch on.

    A `keras.optimizers.schedules.PiecewiseConstantDecay` on the optimizer's
    step counter (the number of updates already applied). Keras switches
    to the next value *after* a boundary step, so the boundary of epoch `e`
    is step `e * steps_per_epoch - 1`: the first update of epoch `e`
    (0-based, step `e * steps_per_epoch`) uses the decayed rate, as
    PyTorch's `MultiStepLR(milestones=[e])` does.

    Args:
        lr: initial learning rate.
        steps_per_epoch: optimizer steps per epoch.
        boundaries: epochs (0-based, may be fractional) at which the rate
            is multiplied by `decay`, e.g. `(60, 120, 160)`. Boundaries
            that round to the same step apply together.
        decay: multiplier per boundary (0.2 for the CIFAR WRN recipe, 0.1
            for ImageNet).

    Returns:
        The schedule.

    Example:
    ```python
    s = step_schedule(0.1, 391, (60, 120, 160), 0.2)
    float(s(60 * 391 - 1)), float(s(60 * 391))   # (0.1, 0.02)
    ```
    """
    boundaries = [float(e) for e in boundaries]
    if any(e < 0 for e in boundaries) or boundaries != sorted(boundaries):
        raise ValueError(
            f"Boundaries {boundaries} (epochs) must be non-negative and increasing."
        )
    # Boundaries that fall on the same step (short runs) decay together.
    steps = [int(round(e * steps_per_epoch)) - 1 for e in boundaries]
    unique = sorted(set(steps))
    values = [lr] + [lr * decay ** sum(s <= b for s in steps) for b in unique]
    if not unique:  # constant learning rate
        unique, values = [2**62], [lr, lr]
    return keras.optimizers.schedules.PiecewiseConstantDecay(unique, values)
