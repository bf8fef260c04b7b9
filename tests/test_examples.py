"""Every example runs end to end offline, a few steps on a tiny network.

Each runs in a subprocess through its real `app.run(main)` entry point
(their absl flags share one registry, so they cannot share a process); the
TFDS ones inside `tfds.testing.mock_data` (random images with the dataset's
features), the Fashion-MNIST one on the Debian IDX files and on a synthetic
IDX folder.
"""

import ast
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_dks.data import fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")

_MOCK_RUNNER = textwrap.dedent(
    """
    import runpy, sys
    import tensorflow_datasets as tfds
    script, n = sys.argv[1], int(sys.argv[2])
    sys.argv = [script] + sys.argv[3:]
    with tfds.testing.mock_data(num_examples=n):
        runpy.run_path(script, run_name="__main__")
    """
)


def run_example(script, args, mock_examples=None, timeout=600):
    """Run examples/<script> with `args`; returns stdout (fails on non-zero exit)."""
    path = os.path.join(EXAMPLES, script)
    if mock_examples:
        cmd = [sys.executable, "-c", _MOCK_RUNNER, path, str(mock_examples)] + args
    else:
        cmd = [sys.executable, path] + args
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def result_line(stdout):
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    assert len(lines) == 1, stdout
    return lines[0]


def test_cifar100_wrn_dks_mocked(tmp_path):
    model_dir, export_dir = tmp_path / "run", tmp_path / "export"
    out = run_example(
        "cifar100_wrn.py",
        ["--depth", "10", "--width", "1", "--epochs", "2", "--steps_per_epoch", "2",
         "--batch_size", "8", "--eval_steps", "1", "--benchmark_steps", "3",
         "--data_dir", str(tmp_path / "tfds"), "--model_dir", str(model_dir),
         "--export_dir", str(export_dir)],
        mock_examples=16,
    )
    line = result_line(out)
    assert "RESULT cifar100 WRN-10-1 dks | test error main " in line
    assert "aux_group1" in line and "aux_group0" in line and "images/s" in line
    assert "steps/s with the model" in out and "steps/s input pipeline alone" in out
    with open(model_dir / "history.json") as f:
        history = json.load(f)["history"]
    assert len(history["val_accuracy"]) == 2 and "synergy_loss" in history
    for name in ("curves.png", "model.keras"):
        assert (model_dir / name).stat().st_size > 0
    assert (export_dir / "1" / "saved_model.pb").exists()


def test_cifar100_wrn_srdl_mocked(tmp_path):
    model_dir, export_dir = tmp_path / "run", tmp_path / "export"
    out = run_example(
        "cifar100_wrn.py",
        ["--method", "srdl", "--depth", "10", "--width", "1", "--epochs", "2",
         "--batch_size", "8", "--benchmark_steps", "2",
         "--data_dir", str(tmp_path / "tfds"), "--model_dir", str(model_dir),
         "--export_dir", str(export_dir)],
        mock_examples=16,
    )
    assert "RESULT cifar100 WRN-10-1 srdl | test error main " in result_line(out)
    with open(model_dir / "history.json") as f:
        history = json.load(f)["history"]
    assert len(history["val_accuracy"]) == 2 and np.isfinite(history["distill_loss"][1])
    # Finished: no checkpoint left behind; the final network is plain.
    assert not (model_dir / "backup").exists()
    model = keras.models.load_model(model_dir / "model.keras")
    assert len(model.outputs) == 1 and model.output_shape == (None, 100)
    assert (export_dir / "1" / "saved_model.pb").exists()


def test_cifar100_wrn_baseline_mirrored_mocked(tmp_path):
    out = run_example(
        "cifar100_wrn.py",
        ["--method", "baseline", "--depth", "10", "--width", "1", "--epochs", "1",
         "--steps_per_epoch", "2", "--batch_size", "8", "--eval_steps", "1",
         "--benchmark_steps", "0", "--strategy", "mirrored", "--dataset", "cifar10",
         "--data_dir", str(tmp_path / "tfds"), "--model_dir", str(tmp_path / "run")],
        mock_examples=16,
    )
    line = result_line(out)
    assert "cifar10 WRN-10-1 baseline" in line and "aux" not in line
    assert "heads ['main']" in out


def test_imagenet_resnet18_mocked(tmp_path):
    # imagenet2012 needs manual archives; mock_data generates random JPEGs
    # of random sizes from its feature spec. 32px crops keep it small.
    out = run_example(
        "imagenet_resnet.py",
        ["--arch", "resnet18", "--image_size", "32", "--epochs", "1", "--steps_per_epoch", "1",
         "--batch_size", "2", "--eval_steps", "1", "--benchmark_steps", "2",
         "--crop", "inception", "--nosave_model", "--data_dir", str(tmp_path / "tfds"),
         "--model_dir", str(tmp_path / "run")],
        mock_examples=8,
    )
    line = result_line(out)
    assert "RESULT imagenet2012 resnet18 dks" in line
    assert "aux_conv4_x" in line and "aux_conv3_x" in line
    assert "top-5 error of the main head" in out


def test_imagenet_resnet50_taps():
    # ResNet-50 from keras.applications (--arch keras_resnet50): heads after
    # conv3_x and conv4_x.
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        from keras_dks import recipes
        from imagenet_resnet import build_backbone
        model = recipes.build_model("dks", build_backbone("keras_resnet50", 10, 32), num_classes=10)
        print(model.taps)
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", code, EXAMPLES], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(ast.literal_eval(proc.stdout.strip().splitlines()[-1])) == ["conv3_block4_out", "conv4_block6_out"]


def per_head_rows(stdout):
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ("baseline", "ds", "dks", "dhm", "srdl") and parts[2].endswith("%"):
            rows[(parts[0], parts[1])] = float(parts[2][:-1])
    return rows


@pytest.mark.skipif(
    not os.path.isdir(fashion_mnist.DEBIAN_DIR), reason="dataset-fashion-mnist not installed"
)
def test_fashion_mnist_real_idx(tmp_path):
    out = run_example(
        "fashion_mnist.py",
        ["--depth", "10", "--width", "1", "--epochs", "2", "--steps_per_epoch", "2",
         "--batch_size", "16", "--train_examples", "64", "--test_examples", "100",
         "--model_dir", str(tmp_path / "run")],
    )
    assert "Fashion-MNIST from /usr/share/datasets/fashion-mnist: 64 training / 100 test" in out
    rows = per_head_rows(out)
    assert set(rows) == {("baseline", "main"), ("dks", "main"), ("dks", "aux_group1"),
                         ("dks", "aux_group0")}
    assert all(0 <= v <= 100 for v in rows.values())
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    assert (tmp_path / "run" / "saved_model" / "1" / "saved_model.pb").exists()
    assert (tmp_path / "run" / "dks" / "history.json").exists()


def test_fashion_mnist_synthetic_idx(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "idx"
    data.mkdir()
    for split, n in (("train", 40), ("test", 20)):
        images, labels = fashion_mnist.FILES[split]
        for stem, array in ((images, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                            (labels, rng.integers(0, 10, n, dtype=np.uint8))):
            # IDX: 0, 0, type 0x08 (uint8), ndim, big-endian sizes, data.
            header = bytes([0, 0, 8, array.ndim]) + b"".join(
                int(d).to_bytes(4, "big") for d in array.shape)
            (data / stem).write_bytes(header + array.tobytes())
    out = run_example(
        "fashion_mnist.py",
        ["--data_dir", str(data), "--methods", "dks,srdl", "--depth", "10", "--epochs", "2",
         "--batch_size", "16", "--train_examples", "0", "--noexport",
         "--model_dir", str(tmp_path / "run")],
    )
    assert "40 training / 20 test images" in out
    assert set(per_head_rows(out)) == {("dks", "main"), ("dks", "aux_group1"), ("dks", "aux_group0"),
                                       ("srdl", "main")}
    with open(tmp_path / "run" / "srdl" / "history.json") as f:
        history = json.load(f)["history"]
    # Two stages of one epoch; only stage 2 distils.
    assert len(history["accuracy"]) == 2 and np.isnan(history["distill_loss"][0])
    assert np.isfinite(history["distill_loss"][1])
