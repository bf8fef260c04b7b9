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
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import zipfile

import keras
import numpy as np
import pytest

from helpers import offline_command, require_fashion_mnist_package
from keras_dks.data import fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")

_MOCK_RUNNER = textwrap.dedent(
    """
    import runpy, sys
    import tensorflow_datasets as tfds
    script, n, cpus = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sys.argv = [script] + sys.argv[4:]
    if cpus > 1:
        # A 2-device machine on CPU: the CPU split into logical devices, and
        # MirroredStrategy's default device list (all GPUs, else CPU:0) made
        # all of them, as it is all GPUs on a multi-GPU machine.
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpus)
        original = tf.distribute.MirroredStrategy.__init__
        def init(self, devices=None, cross_device_ops=None):
            devices = devices or [f"/cpu:{k}" for k in range(cpus)]
            original(self, devices, cross_device_ops)
        tf.distribute.MirroredStrategy.__init__ = init
    with tfds.testing.mock_data(num_examples=n):
        runpy.run_path(script, run_name="__main__")
    """
)


def _command(script, args, mock_examples=None, cpus=1):
    path = os.path.join(EXAMPLES, script)
    if mock_examples:
        return [sys.executable, "-c", _MOCK_RUNNER, path, str(mock_examples), str(cpus)] + args
    assert cpus == 1
    return [sys.executable, path] + args


def _env(**extra):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO, **extra)


def run_example(script, args, mock_examples=None, timeout=600, cpus=1):
    """Run examples/<script> with `args`; returns stdout (fails on non-zero exit)."""
    cmd = _command(script, args, mock_examples, cpus)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def saved_config(path):
    """config.json of a .keras file (read without deserialising)."""
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("config.json"))


def layer_configs(config):
    """Every layer config in a saved model config, nested models included."""
    found = []
    if isinstance(config, dict):
        if "class_name" in config and isinstance(config.get("config"), dict):
            found.append(config)
        for v in config.values():
            found += layer_configs(v)
    elif isinstance(config, list):
        for v in config:
            found += layer_configs(v)
    return found


def result_line(stdout):
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    assert len(lines) == 1, stdout
    return lines[0]


def _kill_when(proc, path, timeout=600):
    """SIGKILL `proc` as soon as `path` exists; returns False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"{path} did not appear within {timeout} s")


def _epochs_started(stdout):
    # recipes.EpochProgress: "[label] Epoch k/n - ...", one line per epoch.
    return [int(m) for m in re.findall(r"^(?:.* )?Epoch (\d+)/\d+ - ", stdout, flags=re.M)]


def run_killed_then_again(script, args, backup, mock_examples):
    """README: run an example, SIGKILL it once its first epoch is committed
    to `backup`, run the same command again. Returns (epochs finished before
    the kill, `Epoch k/n` numbers the second run started, its stdout)."""
    proc = subprocess.Popen(_command(script, args, mock_examples), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env(), cwd=REPO)
    assert _kill_when(proc, backup / "training_metadata.json"), "finished before the kill"
    done = json.loads((backup / "training_metadata.json").read_text())["epoch"]
    out = run_example(script, args, mock_examples=mock_examples)
    return done, _epochs_started(out), out


def optimizer_iterations(keras_file):
    """The optimizer step counter stored in a .keras file (the inner
    optimizer's under `SkipNonFinite`, which `iterations` reads)."""
    model = keras.models.load_model(keras_file)
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def test_cifar100_wrn_dks_mocked_killed_and_run_again(tmp_path):
    """The DKS recipe end to end with --jit_compile; killed after its first
    epoch and run again, it resumes at the start of epoch 2 with the
    optimizer state and ends with the step count of an uninterrupted run
    (3 epochs x 2 steps)."""
    model_dir, export_dir = tmp_path / "run", tmp_path / "export"
    args = ["--depth", "10", "--width", "1", "--epochs", "3", "--steps_per_epoch", "2",
            "--batch_size", "8", "--eval_steps", "1", "--benchmark_steps", "3", "--jit_compile",
            "--data_dir", str(tmp_path / "tfds"), "--model_dir", str(model_dir),
            "--export_dir", str(export_dir)]
    done, started, out = run_killed_then_again("cifar100_wrn.py", args, model_dir / "backup", 16)
    assert done == 1 and started == [2, 3], (done, started)
    line = result_line(out)
    assert "RESULT cifar100 WRN-10-1 dks | test error main " in line
    assert "aux_group1" in line and "aux_group0" in line and "images/s" in line
    assert "steps/s with the model" in out and "steps/s input pipeline alone" in out
    with open(model_dir / "history.json") as f:
        history = json.load(f)["history"]
    # One row per epoch: the killed run's first epoch kept, none repeated.
    assert len(history["val_accuracy"]) == 3 and "synergy_loss" in history
    assert optimizer_iterations(model_dir / "model.keras") == 6
    assert saved_config(model_dir / "model.keras")["compile_config"]["jit_compile"] is True
    for name in ("curves.png", "model.keras"):
        assert (model_dir / name).stat().st_size > 0
    assert (export_dir / "1" / "saved_model.pb").exists()
    assert not (model_dir / "backup").exists()


def test_cifar100_wrn_srdl_mocked_killed_in_stage_1_and_run_again(tmp_path):
    """SRDL (2 stages of 2 epochs) killed after stage 1's first epoch: the
    same command resumes stage 1 at its epoch 2, then runs stage 2."""
    model_dir, export_dir = tmp_path / "run", tmp_path / "export"
    args = ["--method", "srdl", "--depth", "10", "--width", "1", "--epochs", "4",
            "--batch_size", "8", "--benchmark_steps", "2",
            "--data_dir", str(tmp_path / "tfds"), "--model_dir", str(model_dir),
            "--export_dir", str(export_dir)]
    done, started, out = run_killed_then_again(
        "cifar100_wrn.py", args, model_dir / "backup" / "stage1", 16)
    assert done == 1 and started == [2, 1, 2], (done, started)
    assert "RESULT cifar100 WRN-10-1 srdl | test error main " in result_line(out)
    with open(model_dir / "history.json") as f:
        history = json.load(f)["history"]
    assert len(history["val_accuracy"]) == 4
    # Stage 1 trains on CE only; stage 2 distils.
    assert np.isnan(history["distill_loss"][:2]).all() and np.isfinite(history["distill_loss"][2:]).all()
    # Finished: no checkpoint left behind; the final network is plain.
    assert not (model_dir / "backup").exists()
    model = keras.models.load_model(model_dir / "model.keras")
    assert len(model.outputs) == 1 and model.output_shape == (None, 100)
    assert (export_dir / "1" / "saved_model.pb").exists()


def test_cifar100_wrn_mirrored_sync_bn_mixed_precision_mocked(tmp_path):
    """The multi-GPU line of the example's docstring on 2 CPU replicas:
    --strategy mirrored --sync_batchnorm --mixed_precision, checked on the
    saved model (every BN synchronized, bfloat16 compute on CPU).
    (--jit_compile runs in the single-device test above: XLA on CPU cannot
    reach variables of another logical CPU device, TensorFlow's known XLA
    issue "tf.Variable on a different device", nor compile collectives
    for CPU devices, so it is not combined with a strategy here.)"""
    model_dir = tmp_path / "run"
    out = run_example(
        "cifar100_wrn.py",
        ["--depth", "10", "--width", "1", "--epochs", "1", "--steps_per_epoch", "2",
         "--batch_size", "8", "--eval_steps", "1", "--benchmark_steps", "0",
         "--strategy", "mirrored", "--sync_batchnorm", "--mixed_precision",
         "--data_dir", str(tmp_path / "tfds"), "--model_dir", str(model_dir)],
        mock_examples=16, cpus=2,
    )
    assert "2 replica(s), policy mixed_bfloat16" in out
    line = result_line(out)
    assert "aux_group1" in line and "aux_group0" in line
    errors = [float(e) for e in re.findall(r"(\d+\.\d+)%", line)]
    assert errors and all(0 <= e <= 100 for e in errors), line
    model = keras.models.load_model(model_dir / "model.keras")
    bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    bns += [l for l in model.backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    heads_bn = [l for l in bns if l.name.startswith("aux_")]
    assert heads_bn and len(bns) > len(heads_bn)
    assert all(l.synchronized for l in bns)
    # The backbone was built under the mixed policy (saved per layer).
    layers = layer_configs(saved_config(model_dir / "model.keras")["config"])
    convs = [l for l in layers if l["class_name"] == "Conv2D"]
    policies = {json.dumps(l["config"]["dtype"]) for l in convs}
    assert all("mixed_bfloat16" in p for p in policies), policies
    with open(model_dir / "history.json") as f:
        history = json.load(f)["history"]
    assert np.isfinite(history["loss"]).all() and np.isfinite(history["synergy_loss"]).all()


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_cifar100_wrn_multi_worker_mocked(tmp_path):
    """The docstring's two-worker launch on 127.0.0.1: both workers finish,
    the chief writes --model_dir, the other worker its own folder below."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    model_dir = tmp_path / "run"
    args = ["--depth", "10", "--width", "1", "--epochs", "2", "--steps_per_epoch", "2",
            "--batch_size", "8", "--eval_steps", "1", "--benchmark_steps", "0",
            "--strategy", "multi_worker", "--data_dir", str(tmp_path / "tfds"),
            "--model_dir", str(model_dir)]
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            _command("cifar100_wrn.py", args, mock_examples=16), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=_env(TF_CONFIG=tf_config), cwd=REPO,
        ))
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"worker failed:\n{out[-3000:]}\n{err[-5000:]}"
            outs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for out in outs:
        assert "2 replica(s)" in out  # one per worker, in sync
        assert "RESULT cifar100 WRN-10-1 dks" in result_line(out)
    with open(model_dir / "history.json") as f:
        assert len(json.load(f)["history"]["loss"]) == 2
    assert (model_dir / "workers" / "worker_1" / "history.json").exists()
    assert not (model_dir / "backup").exists()  # finished: checkpoints gone


def test_kd_distiller_runs_with_a_dks_teacher():
    """examples/kd_distiller.py in-process (argparse, no absl), tiny."""
    sys.path.insert(0, EXAMPLES)
    try:
        import kd_distiller
    finally:
        sys.path.remove(EXAMPLES)
    distiller = kd_distiller.main([
        "--num-train", "64", "--num-test", "32", "--image-size", "8", "--teacher-width", "4",
        "--student-width", "2", "--teacher-epochs", "1", "--student-epochs", "1",
        "--batch-size", "32",
    ])
    assert isinstance(distiller, keras.distillation.Distiller)
    teacher, student = distiller.teacher, distiller.student
    # The teacher is a DKS network's inference model: backbone + main head,
    # no auxiliary head, one output; frozen during distillation.
    names = {l.name for l in teacher.layers}
    assert {"s1_conv", "s2_conv", "s3_conv"} <= names
    assert not any(n.startswith("aux") for n in names)
    assert len(teacher.outputs) == 1 and teacher.output_shape == (None, 10)
    assert not teacher.trainable
    assert student.name == "student" and int(distiller.optimizer.iterations.numpy()) == 2


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
        from keras_dks import methods
        from imagenet_resnet import build_backbone
        model = methods.build_model("dks", build_backbone("keras_resnet50", 10, 32), num_classes=10)
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


def run_demo(args):
    """examples/fashion_mnist.py with `args`; returns its stdout after
    checking what a terminal shows: no TensorFlow / absl noise, no traceback,
    and every line whole: a method's labelled progress line or one of the
    demo's own lines."""
    proc = subprocess.run(_command("fashion_mnist.py", args), capture_output=True, text=True,
                          timeout=600, env=_env(), cwd=REPO)
    assert proc.returncode == 0, f"failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    for noise in ("oneDNN", "cpu_feature_guard", "absl::InitializeLog", "Assets written",
                  "Traceback", "I0000"):
        assert noise not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    for line in proc.stdout.splitlines():
        if re.match(r"^(baseline|dks|srdl)\s", line):
            method = line.split()[0]
            # A method's line is whole: one label, then one line's text
            # (its size, a progress line, or its row of the final table).
            assert re.match(rf"^{method} +(heads |two stages |(stage \d )?Epoch \d+/\d+ - \d+ "
                            r"steps - |\w+ +\d+\.\d\d%)", line), line
            assert len(re.findall(r"Epoch \d+/", line)) <= 1, line
    return proc.stdout


def progress_lines(stdout, method):
    return [l for l in stdout.splitlines() if re.match(rf"^{method} +(stage \d )?Epoch ", l)]


def test_fashion_mnist_real_idx(tmp_path):
    """The demo on the real files, the methods one after the other
    (--jobs 1); the synthetic test below runs them side by side."""
    data_dir = require_fashion_mnist_package()
    out = run_demo(
        ["--depth", "10", "--width", "1", "--epochs", "2", "--steps_per_epoch", "2",
         "--batch_size", "16", "--train_examples", "64", "--test_examples", "100", "--jobs", "1",
         "--model_dir", str(tmp_path / "run")],
    )
    assert f"Fashion-MNIST from {data_dir}: 64 training / 100 test" in out
    rows = per_head_rows(out)
    assert set(rows) == {("baseline", "main"), ("dks", "main"), ("dks", "aux_group1"),
                         ("dks", "aux_group0")}
    assert all(0 <= v <= 100 for v in rows.values())
    # One line per epoch and method; the baseline's without DKS-only columns.
    baseline, dks = progress_lines(out, "baseline"), progress_lines(out, "dks")
    assert len(baseline) == 2 and len(dks) == 2, out
    assert not any(k in l for l in baseline for k in ("synergy", "skipped", "aux_"))
    assert all("synergy_loss" in l and "aux_group0_accuracy" in l for l in dks)
    picture = tmp_path / "run" / "curves.png"
    assert f"Picture (train and test error per head): {picture}" in out
    assert picture.stat().st_size > 0
    saved = tmp_path / "run" / "saved_model" / "1"
    assert f"SavedModel of the dks inference network: {saved}" in out
    assert (saved / "saved_model.pb").exists()
    assert (tmp_path / "run" / "dks" / "history.json").exists()


def test_fashion_mnist_synthetic_idx_side_by_side(tmp_path):
    """The demo's parallel path (--jobs 2: one process per method, as
    `make demo`) on synthetic IDX files: whole labelled lines from both."""
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
    out = run_demo(
        ["--data_dir", str(data), "--methods", "baseline,srdl", "--depth", "10", "--epochs", "2",
         "--batch_size", "16", "--train_examples", "0", "--noexport", "--jobs", "2",
         "--model_dir", str(tmp_path / "run")],
    )
    assert "40 training / 20 test images" in out
    assert "Training baseline, srdl side by side: 2 processes" in out
    assert set(per_head_rows(out)) == {("baseline", "main"), ("srdl", "main")}
    assert len(progress_lines(out, "baseline")) == 2
    assert [l.split()[1:3] for l in progress_lines(out, "srdl")] == [["stage", "1"], ["stage", "2"]]
    with open(tmp_path / "run" / "srdl" / "history.json") as f:
        history = json.load(f)["history"]
    # Two stages of one epoch; only stage 2 distils.
    assert len(history["accuracy"]) == 2 and np.isnan(history["distill_loss"][0])
    assert np.isfinite(history["distill_loss"][1])


def test_cifar100_wrn_offline_fails_fast_without_traceback(tmp_path):
    """No network, cifar100 not prepared: the example exits with status 1
    and the loader's message (naming --data_dir) in seconds, not after
    TFDS' ~3.5 minutes of retries, and without a traceback."""
    command, env = offline_command(_command("cifar100_wrn.py", [
        "--epochs", "1", "--lr_boundaries", "", "--data_dir", str(tmp_path / "tfds"),
        "--model_dir", str(tmp_path / "run")]))
    start = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env(**env),
                          cwd=REPO)
    seconds = time.monotonic() - start
    assert proc.returncode == 1, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert ("cifar100_wrn.py: error: Could not download TFDS dataset 'cifar100': no connection"
            in proc.stderr), proc.stderr[-3000:]
    assert "pass data_dir (--data_dir)" in proc.stderr
    # Importing TensorFlow takes most of it (5-20 s on a loaded 2-core
    # machine); TFDS alone would retry for ~205 s.
    assert seconds < 60, seconds


def _study_lines(*flag_sets):
    """`fashion_mnist.study_lines()` under each list of flags, one process."""
    code = textwrap.dedent(
        """
        import json, sys
        sys.path.insert(0, sys.argv[1])
        import fashion_mnist
        out = []
        for flags in json.loads(sys.argv[2]):
            fashion_mnist.FLAGS.unparse_flags()
            fashion_mnist.FLAGS(["fashion_mnist.py"] + flags)
            out.append(fashion_mnist.study_lines())
        print("LINES " + json.dumps(out))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code, EXAMPLES, json.dumps(flag_sets)],
                          capture_output=True, text=True, timeout=120, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("LINES ")]
    assert len(lines) == 1, proc.stdout[-3000:]
    return json.loads(lines[0][len("LINES "):])


def _paired_text(paired):
    lo, hi = paired["ci95"]
    return (f"{paired['n']} seeds paired by seed): mean gain of DKS over the baseline "
            f"{100 * paired['mean_gain']:+.2f} points, 95 % CI [{100 * lo:+.2f}, {100 * hi:+.2f}], "
            f"one-sided paired t-test p = {paired['p_one_sided']:.3f}.")


def test_fashion_mnist_prints_the_committed_result_of_its_recipe():
    """`make demo` (default flags) prints the committed sweep point of its
    recipe, then the headline study; with the headline's recipe, only that."""
    results = os.path.join(REPO, "benchmarks", "results")
    with open(os.path.join(results, "accuracy", "summary.json")) as f:
        headline = json.load(f)
    with open(os.path.join(results, "size_sweep", "summary.json")) as f:
        sweep = json.load(f)
    default, two_k = _study_lines([], ["--train_examples", "2000"])
    point = sweep["points"]["1000"]
    assert point["config"]["train_examples"] == 1000 and point["config"]["epochs"] == 24
    assert len(default) == 3, default
    assert default[0].startswith("Committed size sweep at 1,000 images")
    assert "(this recipe: 1,000 images, 24 epochs; " in default[0]
    assert default[0].endswith(_paired_text(point["paired"]["dks_vs_baseline"]))
    assert default[1].startswith("Committed headline study")
    assert "(another recipe than this run: 2,000 images" in default[1]
    assert default[1].endswith(_paired_text(headline["paired"]["dks_vs_baseline"]))
    assert default[2].startswith("One seed cannot show this")
    assert len(two_k) == 2 and "headline study" in two_k[0] and "(this recipe: 2,000" in two_k[0]
