"""The examples check every flag before reading data or training.

One subprocess runs both examples (absl flags live in one registry: the
first example's flags are removed before the second is loaded): for every
case the flags are parsed and the example's real `main` is called, with the
data loaders replaced by a sentinel, so a case either stops with a usage
error or reaches the data, and nothing in between.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest


from keras_dks.methods import METHODS

# Its module-scoped fixtures run once: keep its tests on one xdist worker.
pytestmark = pytest.mark.xdist_group("example_flags")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")

_RUNNER = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys
    from absl import app, flags
    from keras_dks.data import fashion_mnist, pipelines

    class ReachedData(Exception):
        pass

    def reached(*args, **kwargs):
        raise ReachedData()

    fashion_mnist.load_data = pipelines.load_tfds = reached
    results = {}
    for script, cases in json.loads(sys.argv[1]):
        for flag in flags.FLAGS.get_flags_for_module("example"):
            delattr(flags.FLAGS, flag.name)
        module = runpy.run_path(script, run_name="example")
        results[script] = []
        for args in cases:
            flags.FLAGS.unparse_flags()
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    flags.FLAGS([script] + args)
                    module["main"]([script])
                outcome = ["finished", out.getvalue()]
            except ReachedData:
                outcome = ["data", out.getvalue()]
            except app.UsageError as e:
                outcome = ["usage", str(e)]
            except flags.Error as e:  # absl's own parsing (types, enums)
                outcome = ["flags", str(e)]
            results[script].append(outcome)
    print("RESULTS " + json.dumps(results))
    """
)


def run_cases(jobs):
    """jobs: [(script, [args, ...])] -> {script: [(outcome, message), ...]}."""
    jobs = [(os.path.join(EXAMPLES, script), cases) for script, cases in jobs]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(jobs)],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(lines[0][len("RESULTS "):])
    return {os.path.basename(path): outcomes for path, outcomes in results.items()}


def fashion_mnist_cases(tmp_path):
    """(args, expected outcome, regexes the message must contain)."""
    a_file = tmp_path / "file"
    a_file.write_text("")
    every = ",".join(METHODS)
    return [
        # Issue 15: trained the baseline, then failed naming 4 of 5 methods.
        (["--methods", "baseline,bogus"], "usage", ["'bogus'", ", ".join(METHODS)]),
        (["--methods", ""], "usage", ["--methods is empty"]),
        (["--methods", "dks,dks"], "usage", ["twice"]),
        (["--depth", "12"], "usage", ["6n \\+ 4"]),
        (["--width", "0"], "usage", ["--width must be >= 1"]),
        (["--epochs", "0"], "usage", ["--epochs must be >= 1"]),
        (["--batch_size", "0"], "usage", ["--batch_size must be >= 1"]),
        (["--methods", "baseline,srdl", "--epochs", "3"], "usage", ["even with srdl"]),
        (["--train_examples", "-5"], "usage", ["--train_examples must be >= 0"]),
        (["--lr", "0"], "usage", ["--lr and --lr_decay must be > 0"]),
        (["--lr_boundaries", "0.5,x"], "usage", ["must be numbers"]),
        (["--lr_boundaries", "0.75,0.5"], "usage", ["increasing fractions"]),
        (["--lr_boundaries", "60,120"], "usage", ["fractions of --epochs in \\[0, 1\\]"]),
        (["--momentum", "1"], "usage", ["--momentum must be in \\[0, 1\\)"]),
        (["--weight_decay", "-1"], "usage", ["--weight_decay must be >= 0"]),
        (["--verbose", "3"], "usage", ["--verbose must be 0, 1 or 2"]),
        (["--data_dir", str(tmp_path / "nowhere")], "usage", ["not a folder.*dataset-fashion-mnist"]),
        (["--model_dir", str(a_file)], "usage", ["is a file"]),
        # Every problem at once, not one per run.
        (["--depth", "12", "--epochs", "0"], "usage", ["--depth.*--epochs"]),
        (["--epochs", "abc"], "flags", ["--epochs"]),
        # Valid flags reach the data.
        ([], "data", []),
        (["--methods", every, "--epochs", "2", "--model_dir", str(tmp_path)], "data", []),
    ]


def cifar100_wrn_cases(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    tfds = ["--data_dir", str(tmp_path / "tfds")]
    cases = [
        (["--method", "bogus"], "flags", ["srdl"]),
        (["--depth", "27"], "usage", ["6n \\+ 4"]),
        (["--width", "0"], "usage", ["--width must be >= 1"]),
        (["--dropout", "1"], "usage", ["--dropout must be in \\[0, 1\\)"]),
        (["--epochs", "0"], "usage", ["--epochs must be >= 1"]),
        (["--method", "srdl", "--epochs", "5"], "usage", ["even with srdl"]),
        (["--batch_size", "0"], "usage", ["--batch_size must be >= 1"]),
        (["--validation_freq", "0"], "usage", ["--validation_freq must be >= 1"]),
        (["--lr", "-0.1"], "usage", ["--lr and --lr_decay must be > 0"]),
        (["--lr_boundaries", "120,60"], "usage", ["increasing epochs"]),
        (["--lr_boundaries", "a"], "usage", ["must be epochs \\(numbers\\)"]),
        (["--momentum", "-0.1"], "usage", ["--momentum"]),
        (["--weight_decay", "-1"], "usage", ["--weight_decay"]),
        (["--train_examples", "-1"], "usage", ["--train_examples must be >= 0"]),
        (["--image_size", "-1"], "usage", ["--image_size must be >= 0"]),
        # [0, 1] statistics in the 0-255 flags: the input would be scaled x255.
        (["--mean", "0.49,0.48,0.45", "--std", "0.25,0.24,0.26"], "usage", ["multiply by 255"]),
        (["--std", "63,0,66"], "usage", ["--std must be > 0"]),
        (["--mean", "120,120"], "usage", ["--mean has 2 values; cifar100 images have 3"]),
        (["--mean", "x,1,2"], "usage", ["--mean must be numbers"]),
        (["--train_split", "train[:10]", "--train_examples", "5"], "usage", ["already a slice"]),
        (["--model_dir", str(a_file)], "usage", ["--model_dir .* is a file"]),
        (["--dataset", "cifar1000"], "usage", ["Did you mean 'cifar100'"]),
        (["--dataset", "imagenette"], "usage", ["varying size.*--image_size"]),
        (["--dataset", "mnist"], "usage", ["--mean has 3 values; mnist images have 1 channel"]),
        (["--dataset", "glue/cola"], "usage", ["not an image classification dataset|no \\(image, label\\)"]),
        # Valid flags reach the data; late decays are pointed out.
        ([], "data", []),
        (["--epochs", "30"], "data", ["Warning: --lr_boundaries 60,120,160 reach --epochs 30"]),
        (["--method", "srdl", "--epochs", "2"], "data", []),
        (["--dataset", "mnist", "--mean", "33", "--std", "78"], "data", []),
        (["--dataset", "imagenette/160px", "--image_size", "32"], "data", []),
    ]
    return [(args + tfds, outcome, patterns) for args, outcome, patterns in cases]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flags")
    cases = {"fashion_mnist.py": fashion_mnist_cases(tmp), "cifar100_wrn.py": cifar100_wrn_cases(tmp)}
    results = run_cases([(script, [args for args, _, _ in c]) for script, c in cases.items()])
    return {script: list(zip(cases[script], results[script])) for script in cases}


def check(pairs, script):
    for (args, outcome, patterns), (got, message) in pairs:
        assert got == outcome, f"{script} {args}: {got} {message}"
        for pattern in patterns:
            assert re.search(pattern, message, re.S), f"{script} {args}: {message!r} lacks {pattern!r}"


def test_fashion_mnist_flags_checked_before_data(outcomes):
    check(outcomes["fashion_mnist.py"], "fashion_mnist.py")


def test_cifar100_wrn_flags_checked_before_data(outcomes):
    check(outcomes["cifar100_wrn.py"], "cifar100_wrn.py")
