"""keras_dks.compat: the one home of private Keras members.

- On a Keras version outside the verified range, the first use of a private
  member fails with a RuntimeError naming the range.
- No module of the package other than compat.py touches a private member of
  Keras (or of tf.distribute), checked on the source's syntax tree.
"""

import ast
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dks
from keras_dks import compat
from keras_dks import taps
from helpers import tiny_backbone

PACKAGE = os.path.dirname(os.path.abspath(keras_dks.__file__))


# --------------------------------------------------------------------------
# Version check
# --------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["3.10.0", "3.12.1", "3.15.1", "3.15.1.dev2026"])
def test_verified_versions_pass(monkeypatch, version):
    monkeypatch.setattr(keras, "__version__", version)
    compat.check_keras_version("Trainer._initial_epoch")


@pytest.mark.parametrize("version", ["3.9.2", "3.15.2", "3.16.0", "4.0.0", "nightly"])
def test_unverified_version_fails_at_first_use_naming_the_range(monkeypatch, version):
    monkeypatch.setattr(keras, "__version__", version)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(RuntimeError, match=r"3\.10\.0 to 3\.15\.1") as info:
        compat.set_initial_epoch(model, 1)
    assert version in str(info.value) and "_initial_epoch" in str(info.value)


def test_unverified_version_in_the_package(monkeypatch, tmp_path):
    """Only the features built on a private member fail, at their start."""
    x = np.random.default_rng(0).uniform(size=(8, 16, 16, 3)).astype("float32")
    y = np.arange(8) % 3
    model = keras_dks.DKSModel(tiny_backbone(), num_classes=3, head="simple")
    model.compile("sgd")
    backup = tmp_path / "backup"
    model.fit(x, y, epochs=1, verbose=0, callbacks=[
        keras_dks.callbacks.SafeBackupAndRestore(backup, delete_checkpoint=False)])

    monkeypatch.setattr(keras, "__version__", "3.99.0")
    # Public API only: building a DKSModel on a plain graph still works ...
    fresh = keras_dks.DKSModel(tiny_backbone(), num_classes=3, head="simple")
    fresh.compile("sgd")
    # ... resuming needs Trainer._initial_epoch: a clear error before any step.
    steps = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: steps.append(batch))
    with pytest.raises(RuntimeError, match=r"_initial_epoch.*3\.10\.0 to 3\.15\.1.*3\.99\.0"):
        fresh.fit(x, y, epochs=2, verbose=0, callbacks=[
            keras_dks.callbacks.SafeBackupAndRestore(backup), record])
    assert steps == []
    # A backbone with a shared layer needs Keras' node table.
    inp = keras.Input((8, 8, 3))
    relu = keras.layers.ReLU()
    out = relu(keras.layers.Conv2D(4, 3, strides=2)(relu(inp)))
    with pytest.raises(RuntimeError, match="_nodes_by_depth"):
        taps.BackboneGraph(keras.Model(inp, out))
    with pytest.raises(RuntimeError, match="_maybe_symbolic_build"):
        compat.build_from_local_batch(fresh, lambda v: v)


# --------------------------------------------------------------------------
# No private Keras member outside compat.py
# --------------------------------------------------------------------------
def _keras_private_names():
    """Private attribute names of the Keras (and tf.distribute) objects the
    package works with."""
    inp = keras.Input((4, 4, 3))
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Conv2D(2, 3)(inp)))
    model.compile(keras.optimizers.SGD(), "mse", metrics=["mae"])
    strategy = tf.distribute.MirroredStrategy(["CPU:0"])
    objects = [
        model, model.layers[1], inp, keras.Sequential(), keras.layers.Layer(),
        keras.Function(inp, model.outputs), keras.callbacks.Callback(),
        keras.callbacks.BackupAndRestore("unused"), keras.optimizers.SGD(),
        keras.metrics.Mean(), keras.losses.MeanSquaredError(),
        keras.Variable(1.0), strategy, strategy.extended,
    ]
    names = set()
    for obj in objects:
        names.update(
            n for n in dir(obj) if n.startswith("_") and not n.startswith("__")
        )
    return names


def _keras_classes(trees):
    """Names of the package's classes derived (maybe indirectly) from Keras."""
    classes = {
        node.name: [ast.unparse(b) for b in node.bases]
        for tree in trees.values()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
    }
    derived = set()
    changed = True
    while changed:
        changed = False
        for name, bases in classes.items():
            if name not in derived and any(
                "keras." in b or b.split(".")[-1] in derived for b in bases
            ):
                derived.add(name)
                changed = True
    return derived


def private_keras_uses(package=PACKAGE, names=None):
    """(file, line, code) of every private Keras member used outside
    compat.py: `obj._x` or `getattr(obj, "_x")` on a non-self object,
    `self._x` or `def _x` in a Keras subclass, for `_x` a private name of
    Keras; `keras.src` imports."""
    names = _keras_private_names() if names is None else names
    trees = {}
    for root, _, files in os.walk(package):
        for f in files:
            if not f.endswith(".py") or (root == package and f == "compat.py"):
                continue
            path = os.path.join(root, f)
            with open(path) as fh:
                trees[path] = ast.parse(fh.read())
    keras_classes = _keras_classes(trees)
    found = []

    def visit(node, path, in_keras_class):
        if isinstance(node, ast.ClassDef):
            in_keras_class = node.name in keras_classes
        if isinstance(node, ast.Attribute) and node.attr == "__internal__":
            found.append((path, node.lineno, ast.unparse(node)))  # TF's private API
        if isinstance(node, ast.Attribute) and node.attr in names:
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if not on_self or in_keras_class:
                found.append((path, node.lineno, ast.unparse(node)))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in names
        ):
            found.append((path, node.lineno, ast.unparse(node)))
        if isinstance(node, ast.FunctionDef) and in_keras_class and node.name in names:
            found.append((path, node.lineno, f"def {node.name}"))
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(m.split(".")[:2] in (["keras", "src"], ["tensorflow", "python"])
                   for m in modules):
                found.append((path, node.lineno, ast.unparse(node)))
        for child in ast.iter_child_nodes(node):
            visit(child, path, in_keras_class)

    for path, tree in trees.items():
        visit(tree, path, False)
    return found


def test_no_private_keras_member_outside_compat():
    names = _keras_private_names()
    # The scan knows the members compat.py wraps.
    assert {"_initial_epoch", "_nodes_by_depth", "_maybe_symbolic_build",
            "_keras_history", "_flatten_layers", "_in_multi_worker_mode"} <= names
    found = private_keras_uses(names=names)
    assert not found, "private Keras members outside keras_dks/compat.py:\n" + "\n".join(
        f"{os.path.relpath(p, PACKAGE)}:{line}: {code}" for p, line, code in found
    )


def test_the_scan_finds_private_members(tmp_path):
    """The scan flags each kind of use it is meant to catch."""
    (tmp_path / "compat.py").write_text("def ok(m):\n    return m._nodes_by_depth\n")
    (tmp_path / "bad.py").write_text(
        "import keras\n"
        "from keras.src import ops\n"
        "def f(model, t):\n"
        "    return model._flatten_layers(), t._keras_history\n"
        "def g(t):\n"
        "    return getattr(t, '_keras_history', None)\n"
        "class M(keras.Model):\n"
        "    def _maybe_symbolic_build(self):\n"
        "        self._initial_epoch = 1\n"
        "class N(M):\n"
        "    def g(self):\n"
        "        return self._compile_metrics\n"
        "class Plain:\n"
        "    def _maybe_symbolic_build(self):\n"  # not a Keras class: ours
        "        self._initial_epoch = 1\n"
        "import tensorflow as tf\n"
        "from tensorflow.python.distribute import values\n"
        "def h():\n"
        "    return tf.__internal__.distribute.strategy_supports_no_merge_call()\n"
    )
    found = private_keras_uses(str(tmp_path))
    assert sorted(code for _, _, code in found) == sorted([
        "from keras.src import ops", "model._flatten_layers", "t._keras_history",
        "getattr(t, '_keras_history', None)",
        "def _maybe_symbolic_build", "self._initial_epoch", "self._compile_metrics",
        "from tensorflow.python.distribute import values", "tf.__internal__",
    ])
    assert all(os.path.basename(p) == "bad.py" for p, _, _ in found)


def test_compat_holds_at_most_ten_private_members():
    with open(os.path.join(PACKAGE, "compat.py")) as f:
        tree = ast.parse(f.read())
    names = _keras_private_names()
    used = {
        node.attr for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in names
    }
    assert used and len(used) <= 10, sorted(used)
