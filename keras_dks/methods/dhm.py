"""DHM (Li & Chen, CVPR 2020): DKS with dynamic branch roots.

Dynamic Hierarchical Mimicking trains the same heads and pairwise loss as
DKS, with two kinds of randomness:

- *stochastic pairs* (the released code's optional variant): each pairwise
  term is kept per iteration with probability 0.5. This is
  `DKSModel(pair_keep_prob=...)`; `DHMModel` defaults it to 0.5.
- *dynamic roots* (the paper, Sec. 3.2): an auxiliary branch is forked from
  a location drawn from a discrete distribution over candidate layers, once
  per training epoch. `DHMModel(roots=...)` does this. Candidates of one
  branch must have the same output shape, so the branch's layers fit every
  candidate; a `RootSelector` layer feeds the drawn candidate to the branch,
  and only that candidate gets the branch's gradient.

The draw is reproducible: the candidate of epoch `e` (or step `s` with
`root_sampling="step"`) is a function of `(seed, e)` only, so it is the same
on every replica and after resuming from a checkpoint. Evaluation and
`predict` always use a fixed root (`eval_roots`), so they are deterministic;
the inference model (main head only) never depends on the roots.
"""


import keras
import numpy as np
import tensorflow as tf

from keras_dks import adapt
from keras_dks import taps as taps_lib
from keras_dks.model import DKSModel

ROOT_SAMPLING = ("epoch", "step")


class _StepSource:
    """Plain holder (not tracked by Keras) giving a layer the optimizer's
    step counter without making the counter one of the layer's weights."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def iterations(self):
        return self.optimizer.iterations


def _branch_seed(seed, branch):
    # A separate stateless stream per branch, disjoint from the pair mask's
    # (seed, step) stream.
    return int((int(seed) * 1_000_003 + 7_919 * (branch + 1)) % (2**31 - 1))


@keras.saving.register_keras_serializable(package="keras_dks")
class RootSelector(keras.layers.Layer):
    """Feeds one of several equally shaped candidate tensors to a branch.

    In training the candidate is `index` (a non-trainable int variable that
    `RootResampler` redraws each epoch) or, with `sampling="step"`, a fresh
    stateless draw from `(seed, optimizer.iterations)` every step. Outside
    training it is always `eval_index`. The choice is a `tf.switch_case`, so
    the unchosen candidates get no gradient from the branch.

    Args:
        candidates: names of the candidate layers (for logs and configs).
        probs: probability of each candidate (normalised here).
        eval_index: candidate used when not training. Default: the most
            probable one (the first on ties).
        sampling: `"epoch"` or `"step"`.
        seed: seed of the draws.

    Example:
    ```python
    a, b = keras.Input((4, 4, 8)), keras.Input((4, 4, 8))
    sel = keras_dks.methods.RootSelector(["a", "b"], [0.3, 0.7], seed=1)
    out = sel([a, b])
    int(sel.draw(0))   # the candidate drawn for epoch 0
    ```
    """

    def __init__(
        self, candidates, probs, eval_index=None, sampling="epoch", seed=0, **kwargs
    ):
        super().__init__(**kwargs)
        self.candidates = [str(c) for c in candidates]
        probs = np.asarray(probs, dtype="float64")
        if probs.shape != (len(self.candidates),) or len(self.candidates) < 1:
            raise ValueError(
                f"RootSelector needs one probability per candidate: "
                f"{len(self.candidates)} candidates, probs={probs.tolist()}."
            )
        if not np.all(probs >= 0) or not probs.sum() > 0:
            raise ValueError(
                f"Root probabilities must be non-negative and not all zero; "
                f"got {probs.tolist()} for {self.candidates}."
            )
        self.probs = (probs / probs.sum()).tolist()
        if eval_index is None:
            eval_index = int(np.argmax(self.probs))
        if not 0 <= int(eval_index) < len(self.candidates):
            raise ValueError(
                f"eval_index={eval_index} is not a candidate index of "
                f"{self.candidates}."
            )
        self.eval_index = int(eval_index)
        if sampling not in ROOT_SAMPLING:
            raise ValueError(
                f"sampling must be one of {ROOT_SAMPLING}, got {sampling!r}."
            )
        self.sampling = sampling
        self.seed = int(seed)
        self._step_source = None

    def build(self, input_shape):
        shapes = [tuple(s) for s in input_shape]
        if len(shapes) != len(self.candidates):
            raise ValueError(
                f"RootSelector {self.name!r} got {len(shapes)} inputs for "
                f"{len(self.candidates)} candidates."
            )
        if any(s[1:] != shapes[0][1:] for s in shapes):
            raise ValueError(
                f"The candidate roots {self.candidates} of one branch must have "
                f"the same output shape (the branch's layers fit only one); got "
                f"{[s[1:] for s in shapes]}. Put differently shaped layers in "
                "different branches."
            )
        # Starts at the evaluation root; RootResampler redraws it per epoch.
        # "only_first_replica": one value, broadcast to every replica.
        self.index = self.add_weight(
            shape=(),
            dtype="int32",
            initializer=keras.initializers.Constant(self.eval_index),
            trainable=False,
            aggregation="only_first_replica",
            name="root_index",
        )

    def draw(self, counter):
        """The candidate index for epoch (or step) `counter`, as a tensor.

        Stateless: a function of `(seed, counter)` only.
        """
        seed = tf.stack(
            [tf.constant(self.seed, tf.int64), tf.cast(counter, tf.int64)]
        )
        u = tf.random.stateless_uniform([], seed=seed, dtype=tf.float32)
        bounds = tf.constant(np.cumsum(self.probs)[:-1], tf.float32)
        return tf.reduce_sum(tf.cast(u >= bounds, tf.int32))

    def current_index(self, training=False):
        """The candidate this layer feeds forward in the given mode."""
        if not training:
            return tf.constant(self.eval_index, tf.int32)
        if self.sampling == "step" and self._step_source is not None:
            return self.draw(self._step_source.iterations)
        return tf.convert_to_tensor(self.index)

    def call(self, inputs, training=None):
        inputs = list(inputs)
        if not training:
            return inputs[self.eval_index]
        if len(inputs) == 1:
            return inputs[0]
        index = self.current_index(training=True)
        # switch_case runs only the chosen branch: the others get no gradient.
        return tf.switch_case(
            index, [lambda t=t: tf.identity(t) for t in inputs]
        )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "candidates": list(self.candidates),
                "probs": list(self.probs),
                "eval_index": self.eval_index,
                "sampling": self.sampling,
                "seed": self.seed,
            }
        )
        return config


def root_selectors(model):
    """Every `RootSelector` inside `model` (also inside wrapping models)."""
    return [l for l in model._flatten_layers() if isinstance(l, RootSelector)]


class RootResampler(keras.callbacks.Callback):
    """Redraws the root of every dynamic branch at the start of each epoch.

    `DHMModel.fit` adds one automatically when `root_sampling="epoch"`; pass
    your own to log the choices (`verbose=1`) or to keep them
    (`self.choices`). The draw for epoch `e` depends only on the model's
    seed and `e`, so a resumed run (`initial_epoch`, `BackupAndRestore`)
    draws the same roots as an uninterrupted one.

    The variable is assigned here, between steps and outside the replica
    context, so under `tf.distribute` every replica sees the same root.

    Args:
        verbose: print the chosen roots at each epoch.

    Example:
    ```python
    resampler = keras_dks.methods.RootResampler()
    model.fit(x, y, epochs=3, callbacks=[resampler])
    resampler.choices   # [(0, {"aux_b1_b2": "b2"}), (1, {...}), ...]
    ```
    """

    def __init__(self, verbose=0):
        super().__init__()
        self.verbose = verbose
        self.choices = []

    def resample(self, epoch):
        chosen = {}
        strategy = getattr(self.model, "distribute_strategy", None)
        for sel in root_selectors(self.model):
            if sel.sampling != "epoch":
                continue
            index = int(sel.draw(epoch))
            if strategy is not None:
                with strategy.scope():
                    sel.index.assign(index)
            else:
                sel.index.assign(index)
            chosen[sel.name.removesuffix("_root")] = sel.candidates[index]
        return chosen

    def on_epoch_begin(self, epoch, logs=None):
        chosen = self.resample(epoch)
        self.choices.append((epoch, chosen))
        if self.verbose and chosen:
            print(f"RootResampler: epoch {epoch + 1} roots {chosen}")


def _normalise_roots(roots, root_probs, eval_roots):
    """Validated [(candidates, probs, eval_index)] in the user's order."""
    entries = []
    for r in roots:
        if isinstance(r, str):
            entries.append([r])
        elif isinstance(r, (list, tuple)) and r and all(isinstance(c, str) for c in r):
            entries.append(list(r))
        else:
            raise ValueError(
                f"Each entry of roots must be a layer name or a non-empty list of "
                f"candidate layer names; got {r!r}."
            )
    names = [c for e in entries for c in e]
    if len(set(names)) != len(names):
        raise ValueError(f"roots={roots} names a layer twice; remove it.")
    if root_probs is None:
        root_probs = [None] * len(entries)
    root_probs = list(root_probs)
    if len(root_probs) != len(entries):
        raise ValueError(
            f"root_probs has {len(root_probs)} entries but roots has "
            f"{len(entries)} branches; give one list (or None) per branch."
        )
    if eval_roots is None:
        eval_roots = [None] * len(entries)
    eval_roots = list(eval_roots)
    if len(eval_roots) != len(entries):
        raise ValueError(
            f"eval_roots has {len(eval_roots)} entries but roots has "
            f"{len(entries)} branches; give one name (or None) per branch."
        )
    out = []
    for cands, probs, ev in zip(entries, root_probs, eval_roots):
        if probs is None:
            probs = [1.0 / len(cands)] * len(cands)  # DHM paper: uniform
        probs = [float(p) for p in np.atleast_1d(probs)]
        if len(probs) != len(cands):
            raise ValueError(
                f"Branch {cands} has {len(cands)} candidates but "
                f"{len(probs)} probabilities."
            )
        if any(not p >= 0 for p in probs) or sum(probs) <= 0:
            raise ValueError(
                f"root_probs of {cands} must be non-negative and not all zero; "
                f"got {probs}."
            )
        total = sum(probs)
        probs = [p / total for p in probs]
        if ev is None:
            ev_index = int(np.argmax(probs))
        elif ev in cands:
            ev_index = cands.index(ev)
        else:
            raise ValueError(f"eval root {ev!r} is not a candidate of {cands}.")
        out.append((cands, probs, ev_index))
    return out


def _branch_taps(backbone, entries, sampling, seed):
    """One `adapt.Tap` per branch; a `RootSelector` feeds dynamic ones."""
    adapt.check_backbone(backbone)
    graph = taps_lib.BackboneGraph(backbone)
    known = list(getattr(backbone, "dks_taps", None) or [])
    out = []
    for k, (cands, probs, ev) in enumerate(entries):
        # DKSModel's checks (known layer, 4-D, before the final map).
        by_name = {t.name: t.tensor for t in adapt.resolve_taps(backbone, graph, cands)}
        tensors = [by_name[c] for c in cands]
        if len(cands) == 1:
            out.append(cands[0])
            continue
        label = "|".join(cands)
        selector = RootSelector(
            cands, probs, eval_index=ev, sampling=sampling,
            seed=_branch_seed(seed, k), name=f"{adapt.head_name(label)}_root",
        )
        # The head is laid out for the first candidate (equal shapes = same
        # stage), or for the one the backbone describes its heads for.
        out.append(
            adapt.Tap(
                name=label,
                tensor=selector(tensors),
                layout_name=next((c for c in cands if c in known), cands[0]),
                layout_tensor=tensors[0],
                depth_tensors=tensors,
            )
        )
    return out


@keras.saving.register_keras_serializable(package="keras_dks")
class DHMModel(DKSModel):
    """Dynamic Hierarchical Mimicking (Li & Chen, CVPR 2020).

    A `DKSModel` whose auxiliary branches may have several candidate roots.
    `roots` lists one entry per branch: a layer name (fixed root, as in
    DKS) or a list of candidate layer names with the same output shape. In
    training, each dynamic branch is fed from a candidate drawn from
    `root_probs`, once per epoch (`root_sampling="epoch"`, the paper; the
    draw is made by `RootResampler`, which `fit` adds) or at every step
    (`"step"`). Evaluation uses `eval_roots`. Pair dropping is on by default
    (`pair_keep_prob=0.5`). Training step, losses, metrics and
    `inference_model()` are `DKSModel`'s.

    Differences from the papers/code, by design:
    - `pair_keep_prob` defaults to 0.5, the released code's optional
      Bernoulli variant; the paper's main experiments keep every pair
      (pass 1.0) and fix the roots ("probabilities toggling between zero and
      one", i.e. plain strings in `roots`).
    - `root_probs` defaults to uniform over a branch's candidates (the
      paper's example distribution).
    - The branch's layers are shared by all candidates of the branch, which
      is why they must have the same shape (the paper grows branches from
      the sampled node; with equal shapes the branch is the same module).

    Args:
        backbone: see `DKSModel`.
        num_classes: see `DKSModel`.
        roots: `"auto"` (the fixed taps of `DKSModel`) or a list with one
            entry per auxiliary branch: a layer name, or a list of candidate
            layer names (e.g. `[["conv3_block2_out", "conv3_block4_out"],
            "conv4_block6_out"]`). A branch's head is laid out for its
            first candidate, or, on `keras_dks.backbones` models, for the
            candidate that is one of the backbone's `dks_taps`.
        root_probs: one entry per branch: None (uniform) or a probability
            per candidate (normalised).
        root_sampling: `"epoch"` or `"step"`.
        eval_roots: one entry per branch: None (the most probable candidate,
            the first on ties) or the candidate name used at evaluation.
        pair_keep_prob: DHM's stochastic pairs, see `DKSModel`.
        seed: seed of pair dropping and root draws (random if None).
        taps: alias of `roots`, so the kwargs of a `DKSModel` also build a
            `DHMModel`.
        **kwargs: every other `DKSModel` argument (`head`, `pairs`,
            `aux_weight`, `synergy_weight`, `weight_decay`, ...).

    Example:
    ```python
    import keras, keras_dks
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="a")(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", name="b")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="c")(x)
    backbone = keras.Model(inp, x)
    model = keras_dks.methods.DHMModel(
        backbone, num_classes=5, roots=[["a", "b"]], root_probs=[[0.5, 0.5]],
        head="conv")
    model.compile(optimizer="sgd", metrics=["accuracy"])
    model.fit(keras.random.uniform((8, 16, 16, 3)),
              keras.random.randint((8,), 0, 5), epochs=2, verbose=0)
    ```
    """

    def __init__(
        self,
        backbone,
        num_classes=None,
        roots="auto",
        root_probs=None,
        root_sampling="epoch",
        eval_roots=None,
        pair_keep_prob=0.5,
        seed=None,
        taps=None,
        name="dhm_model",
        **kwargs,
    ):
        if taps is not None:
            if not (isinstance(roots, str) and roots == "auto"):
                raise ValueError("Pass roots or taps (an alias), not both.")
            roots = taps
        if root_sampling not in ROOT_SAMPLING:
            raise ValueError(
                f"root_sampling must be one of {ROOT_SAMPLING}, got {root_sampling!r}."
            )
        if seed is None:
            seed = int(np.random.randint(0, 2**31 - 1))
        if isinstance(roots, str):
            if root_probs is not None or eval_roots is not None:
                raise ValueError(
                    f"roots={roots!r} has fixed roots; root_probs and eval_roots "
                    "need a list of candidate roots per branch."
                )
            spec = roots
            entries = None
        else:
            entries = _normalise_roots(list(roots), root_probs, eval_roots)
            spec = _branch_taps(backbone, entries, root_sampling, int(seed))
        super().__init__(
            backbone,
            num_classes=num_classes,
            taps=spec,
            pair_keep_prob=pair_keep_prob,
            seed=seed,
            name=name,
            **kwargs,
        )
        if entries is None:
            self.roots = list(self.taps)  # "auto" resolved: a stable config
            self.root_probs = None
            self.eval_roots = None
        else:
            self.roots = [c[0] if len(c) == 1 else list(c) for c, _, _ in entries]
            self.root_probs = [list(p) for _, p, _ in entries]
            self.eval_roots = [c[e] for c, _, e in entries]
        self.root_sampling = root_sampling

    # -- training ---------------------------------------------------------
    @property
    def root_selectors(self):
        """The `RootSelector` layer of every dynamic branch."""
        return root_selectors(self)

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        # Per-step draws read the optimizer's step counter, like the pair
        # mask, so they are identical on every replica.
        for sel in self.root_selectors:
            sel._step_source = _StepSource(self.optimizer)

    def fit(self, *args, callbacks=None, **kwargs):
        """`keras.Model.fit`, adding a `RootResampler` when roots are drawn
        per epoch and none is in `callbacks`."""
        callbacks = list(callbacks or [])
        if (
            self.root_sampling == "epoch"
            and self.root_selectors
            and not any(isinstance(c, RootResampler) for c in callbacks)
        ):
            callbacks.append(RootResampler())
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.pop("taps", None)
        config.update(
            {
                "roots": self.roots,
                "root_probs": self.root_probs,
                "root_sampling": self.root_sampling,
                "eval_roots": self.eval_roots,
            }
        )
        return config
