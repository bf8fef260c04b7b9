"""DHM (Li & Chen, CVPR 2020): DKS's heads and pairwise loss, with the
paper's stochastic branch locations as options.

`DHMModel`'s defaults train what the paper's main experiments and the
released code (github.com/d-li14/DHM) train: fixed branches, every branch's
CE and every ordered pair, weights 1, temperature 1. Options: Bernoulli
branch locations (`branch_keep_prob`, Eq. 6-9), dynamic roots (`roots` with
candidate lists, `RootSelector`), per-pair dropping (`pair_keep_prob`).
Every draw is a stateless function of the model's seed and its step counter
(`keras_dks.draws`), the same on every replica and after resuming.
"""


import keras
import numpy as np
from keras import ops

from keras_dks import adapt
from keras_dks import draws
from keras_dks import taps as taps_lib
from keras_dks.model import DKSModel

ROOT_SAMPLING = ("epoch", "step")


class _StepSource:
    """Plain holder (not tracked by Keras) giving a layer the model's step
    counter without making the counter one of the layer's weights."""

    def __init__(self, model):
        self.model = model

    @property
    def iterations(self):
        return self.model.step_counter()


def _branch_seed(seed, branch):
    # A separate stateless stream per branch (branch -2: the branch mask),
    # disjoint from the pair mask's (seed, step) stream.
    return int((int(seed) * 1_000_003 + 7_919 * (branch + 1)) % (2**31 - 1))


@keras.saving.register_keras_serializable(package="keras_dks")
class RootSelector(keras.layers.Layer):
    """Feeds one of several equally shaped candidate tensors to a branch.

    In training the candidate is `index` (a non-trainable int variable that
    `RootResampler` redraws at the start of each epoch from
    `(seed, model.step_counter())`) or, with `sampling="step"`, a fresh
    stateless draw from `(seed, model.step_counter())` every step. Outside
    training it is always `eval_index`. The choice is a `keras.ops.switch`
    (`tf.switch_case`, `jax.lax.switch`), so the unchosen candidates get no
    gradient from the branch.

    Args:
        candidates: names of the candidate layers (for logs and configs).
        probs: probability of each candidate, non-negative and not all zero
            (normalised here).
        eval_index: candidate used when not training. Defaults to `None`,
            meaning the most probable one (the first on ties).
        sampling: `"epoch"` (default) or `"step"`.
        seed: seed of the draws. Defaults to `0`.
        **kwargs: passed on to `keras.layers.Layer` (e.g. `name`).

    Raises:
        ValueError: not one probability per candidate, negative or all-zero
            probabilities, an `eval_index` out of range, an unknown
            `sampling`; when built, a number of inputs other than the
            number of candidates, or inputs of different shapes.

    Example:
    ```python
    import keras, keras_dks
    a, b = keras.Input((4, 4, 8)), keras.Input((4, 4, 8))
    sel = keras_dks.methods.RootSelector(["a", "b"], [0.3, 0.7], seed=1)
    out = sel([a, b])              # (None, 4, 4, 8)
    print(sel.eval_index)          # 1: the most probable, used at inference
    print(int(sel.draw(0)) in (0, 1))  # True: the candidate drawn for step 0
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
        """The candidate index for counter `counter`, as a tensor.

        The counter is the model's step counter (per-step sampling) or its
        value at the start of the epoch (per-epoch sampling):
        `keras_dks.draws.categorical(cumsum(probs), seed, counter)`.

        Args:
            counter: an integer (or integer scalar tensor).

        Returns:
            An int32 scalar tensor in `[0, len(candidates))`, the same for
            the same `(seed, counter)`.
        """
        return draws.categorical(np.cumsum(self.probs), self.seed, counter)

    def current_index(self, training=False):
        """The candidate this layer feeds forward in the given mode.

        Args:
            training: whether in training. Defaults to `False`
                (`eval_index`).

        Returns:
            An int32 scalar tensor.
        """
        if not training:
            return ops.convert_to_tensor(self.eval_index, "int32")
        if self.sampling == "step" and self._step_source is not None:
            return self.draw(self._step_source.iterations)
        return ops.convert_to_tensor(self.index)

    def call(self, inputs, training=None):
        inputs = list(inputs)
        if not training:
            return inputs[self.eval_index]
        if len(inputs) == 1:
            return inputs[0]
        index = self.current_index(training=True)
        # switch runs only the chosen branch: the others get no gradient.
        branches = [lambda *xs, k=k: xs[k] for k in range(len(inputs))]
        return ops.switch(index, branches, *inputs)

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
    """Every `RootSelector` inside `model` (also inside nested models).

    Args:
        model: a `keras.Model` (or any object with a `layers` list).

    Returns:
        A list of `RootSelector`, breadth first.

    Example:
    ```python
    import keras
    from keras_dks.methods.dhm import root_selectors
    inputs = keras.Input((4,))
    print(root_selectors(keras.Model(inputs, keras.layers.Dense(2)(inputs))))
    # []
    ```
    """
    found, queue, seen = [], list(getattr(model, "layers", [])), set()
    while queue:
        layer = queue.pop(0)
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, RootSelector):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            queue.extend(layer.layers)
    return found


class RootResampler(keras.callbacks.Callback):
    """Redraws DHM's per-epoch choices at the start of each epoch.

    Per-epoch choices are the root of every dynamic branch
    (`root_sampling="epoch"`) and the on/off mask of the auxiliary branches
    (`branch_keep_prob < 1` with `branch_sampling="epoch"`). `DHMModel.fit`
    adds one automatically when needed; pass your own to log the choices
    (`verbose=1`) or to keep them (`choices`, `active`).

    The draw of an epoch depends only on the model's seed and its
    `step_counter()` at the start of that epoch, so a second `fit` call goes
    on with new draws (Keras numbers its epochs from 0 again, the step
    counter goes on), and a run resumed from a checkpoint that restores the
    model and optimizer (`BackupAndRestore`,
    `keras_dks.callbacks.SafeBackupAndRestore`) draws what an uninterrupted
    run draws.

    The variables are assigned here, between steps and outside the replica
    context, so under `tf.distribute` every replica sees the same choice.

    Args:
        verbose: print the choices at each epoch. Defaults to `0`.

    Attributes:
        choices: `[(epoch, {head name: chosen root})]`, one entry per epoch.
        active: `[(epoch, [names of the auxiliary heads that are on])]`,
            for epochs whose branch mask was drawn.

    Example:
    ```python
    import numpy as np, keras, keras_dks
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="b1")(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", name="b2")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="c")(x)
    # One branch whose root is drawn from "b1" and "b2" every epoch.
    model = keras_dks.methods.DHMModel(keras.Model(inp, x), num_classes=5,
                                       roots=[["b1", "b2"]], head="conv",
                                       seed=0)
    model.compile(optimizer="sgd")
    resampler = keras_dks.methods.RootResampler()
    model.fit(np.random.rand(8, 16, 16, 3), np.random.randint(0, 5, 8),
              epochs=3, callbacks=[resampler], verbose=0)
    print(resampler.choices)
    # [(0, {'aux_b1_b2': 'b1'}), (1, {'aux_b1_b2': ...}), (2, {...})]
    ```
    """

    def __init__(self, verbose=0):
        super().__init__()
        self.verbose = verbose
        self.choices = []
        self.active = []

    def _assign(self, variable, value):
        strategy = getattr(self.model, "distribute_strategy", None)
        if strategy is not None:
            with strategy.scope():
                variable.assign(value)
        else:
            variable.assign(value)

    def resample(self, counter):
        """Draws and assigns the choices of counter `counter`.

        Args:
            counter: the model's step counter at the start of the epoch
                (an int).

        Returns:
            `(roots, active)`: `{head name: chosen root}` of the per-epoch
            dynamic branches, and the names of the auxiliary heads that are
            on (None when the branch mask is not drawn per epoch).
        """
        chosen = {}
        for sel in root_selectors(self.model):
            if sel.sampling != "epoch":
                continue
            index = int(sel.draw(counter))
            self._assign(sel.index, index)
            chosen[sel.name.removesuffix("_root")] = sel.candidates[index]
        active = None
        if getattr(self.model, "branch_sampling", None) == "epoch" and (
            self.model.samples_branches
        ):
            mask = ops.convert_to_numpy(self.model.draw_branch_mask(counter))
            self._assign(self.model.branch_mask, mask)
            active = [
                h for h, m in zip(self.model.head_names[1:], mask) if m
            ]
        return chosen, active

    def on_epoch_begin(self, epoch, logs=None):
        counter = int(ops.convert_to_numpy(self.model.step_counter()))
        chosen, active = self.resample(counter)
        self.choices.append((epoch, chosen))
        if active is not None:
            self.active.append((epoch, active))
        if self.verbose and (chosen or active is not None):
            print(
                f"RootResampler: epoch {epoch + 1} roots {chosen}"
                + ("" if active is None else f" active branches {active}")
            )


def _check_keep_probs(value):
    """A float or a list of floats, each in (0, 1]."""
    values = [value] if isinstance(value, (int, float)) else list(value)
    for v in values:
        if not 0.0 < float(v) <= 1.0:
            raise ValueError(
                f"branch_keep_prob must be in (0, 1], got {v}; to remove a "
                "branch for good, leave its layer out of roots."
            )
    if isinstance(value, (int, float)):
        return float(value)
    return [float(v) for v in values]


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

    A `DKSModel` trained with DHM's loss: every auxiliary branch's CE plus
    the pairwise mimicking term of every ordered pair of heads (main head
    included), with optional stochastic branch locations (the paper's
    Eq. 6-9) and optional dynamic roots. With the defaults it trains what the
    paper's main experiments and the released code train: fixed branches,
    every CE and every pair, weights 1, temperature 1; evaluation,
    `predict` and `inference_model()` are `DKSModel`'s.

    Defaults and where they come from:
    - `branch_keep_prob=1.0`: the paper's main experiments fork branches
      "with probabilities toggling between zero and one" (fixed; Sec. 3.2)
      and the released code computes every branch's CE and every pair on
      every step. Values < 1 are the paper's Bernoulli location variant
      (supplement): an off branch adds no CE and no pair (Eq. 8-9), nothing
      is rescaled.
    - `branch_sampling="epoch"`: "Locations of such intermediate layers are
      dynamically drawn ... at each training epoch" (Sec. 3.2). `"step"`
      draws at every step instead.
    - `pair_keep_prob=1.0`: neither the paper nor the released code drops
      single pairs; `pair_keep_prob < 1` is a library option (independent
      Bernoulli per pair per step, no rescaling), kept under that name
      only. (The released code's commented-out variant detaches a random
      number of terms; it is not offered.)
    - `aux_weight=1`, `synergy_weight=1` (`lambda_l = mu_pq = 1`, Sec. 3.2;
      `--alpha 1 --temperature 1` in the code), pairs `"bidirectional"`
      (the paper's default, Sec. 4.3.1). Pairs include the main head: Eq. 9
      as printed sums over the auxiliary locations only, but the objective
      is over the selected branches and the top classifier (Fig. 1), and the
      released code pairs the main head too.
    - `root_probs=None`: uniform over a branch's candidates (the paper's
      example distribution, Sec. 1).

    Dynamic roots (`roots` with a list of candidate layers) are an
    extension: the branch's layers are shared by all of its candidates,
    which must therefore have the same output shape, while the paper gives
    each location its own classifier (`W_s^l`, Eq. 8). For the paper's
    formulation, give each location its own fixed root and use
    `branch_keep_prob`.

    Known differences: an off branch still runs forward (its BatchNorm
    statistics update) and its weights still get `weight_decay` and
    optimizer momentum; it gets no gradient from the loss.

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
        root_sampling: `"epoch"` or `"step"`: when dynamic roots are drawn.
        eval_roots: one entry per branch: None (the most probable candidate,
            the first on ties) or the candidate name used at evaluation.
        branch_keep_prob: probability that an auxiliary branch is on in
            training, a float or one per auxiliary head in `head_names[1:]`
            order (deepest first), each in (0, 1]. 1.0: always on.
        branch_sampling: `"epoch"` (a mask per epoch, drawn by
            `RootResampler`, which `fit` adds) or `"step"`.
        pair_keep_prob: per-pair dropping probability, see `DKSModel`.
        seed: seed of every draw (random if None).
        taps: alias of `roots`, so the kwargs of a `DKSModel` also build a
            `DHMModel`. Defaults to `None`.
        name: model name. Defaults to `"dhm_model"`.
        **kwargs: every other `DKSModel` argument (`head`, `pairs`,
            `aux_weight`, `synergy_weight`, `weight_decay`, ...).

    Argument defaults: `roots="auto"`, `root_probs=None`,
    `root_sampling="epoch"`, `eval_roots=None`, `branch_keep_prob=1.0`,
    `branch_sampling="epoch"`, `pair_keep_prob=1.0`, `seed=None` (see the
    list above for where they come from).

    Raises:
        ValueError: both `roots` and `taps` given; an unknown
            `root_sampling` / `branch_sampling`; a `branch_keep_prob`
            outside (0, 1] or with another length than the auxiliary heads;
            `root_probs` / `eval_roots` with `roots="auto"`, or with another
            length than `roots`; a root named twice, an eval root that is
            not a candidate, candidates of different shapes; and every
            `DKSModel` check.

    Example:
    ```python
    import keras, keras_dks
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="a")(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", name="b")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="c")(x)
    backbone = keras.Model(inp, x)
    # Two branches, at "a" and "b", each on with probability 0.5 per epoch.
    model = keras_dks.methods.DHMModel(
        backbone, num_classes=5, roots=["a", "b"], branch_keep_prob=0.5,
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
        branch_keep_prob=1.0,
        branch_sampling="epoch",
        pair_keep_prob=1.0,
        seed=None,
        taps=None,
        name="dhm_model",
        **kwargs,
    ):
        if taps is not None:
            if not (isinstance(roots, str) and roots == "auto"):
                raise ValueError("Pass roots or taps (an alias), not both.")
            roots = taps
        for arg, value in (
            ("root_sampling", root_sampling),
            ("branch_sampling", branch_sampling),
        ):
            if value not in ROOT_SAMPLING:
                raise ValueError(
                    f"{arg} must be one of {ROOT_SAMPLING}, got {value!r}."
                )
        keep = _check_keep_probs(branch_keep_prob)
        if (
            isinstance(keep, list)
            and not isinstance(roots, str)
            and len(keep) != len(list(roots))
        ):
            raise ValueError(
                f"branch_keep_prob has {len(keep)} entries but roots has "
                f"{len(list(roots))} branches; pass a float or one per branch."
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
        num_branches = len(self.head_names) - 1
        if isinstance(keep, list) and len(keep) != num_branches:
            raise ValueError(
                f"branch_keep_prob has {len(keep)} entries but the model has "
                f"{num_branches} auxiliary heads {self.head_names[1:]}; pass a "
                "float or one per auxiliary head, deepest first."
            )
        self.branch_keep_prob = keep
        self.branch_sampling = branch_sampling
        self._branch_probs = (
            [keep] * num_branches if isinstance(keep, float) else list(keep)
        )
        if (self.samples_branches and branch_sampling == "step") or any(
            sel.sampling == "step" for sel in self.root_selectors
        ):
            self.add_draw_step()
        for sel in self.root_selectors:
            # Per-step roots read the model's step counter.
            sel._step_source = _StepSource(self)
        if self.samples_branches and branch_sampling == "epoch":
            # The mask of the current epoch; RootResampler assigns it.
            # "only_first_replica": one value, broadcast to every replica.
            self.branch_mask = self.add_weight(
                shape=(num_branches,),
                dtype="float32",
                initializer="ones",
                trainable=False,
                aggregation="only_first_replica",
                name="branch_mask",
            )

    # -- training ---------------------------------------------------------
    @property
    def root_selectors(self):
        """The `RootSelector` layer of every dynamic branch."""
        return root_selectors(self)

    @property
    def samples_branches(self):
        """Whether some auxiliary branch is switched off at random."""
        return any(p < 1.0 for p in self._branch_probs)

    @property
    def branch_mask_seed(self):
        """Seed of the branch-mask stream, see `draw_branch_mask`."""
        return _branch_seed(self.seed, -2)

    def draw_branch_mask(self, counter):
        """The 0/1 mask of the auxiliary heads for counter `counter`.

        `counter` is the model's step counter (`branch_sampling="step"`) or
        its value at the start of the epoch (`"epoch"`):
        `keras_dks.draws.bernoulli_mask(branch_keep_prob, branch_mask_seed,
        counter)`, one entry per auxiliary head in `head_names[1:]` order.

        Args:
            counter: an integer (or integer scalar tensor).

        Returns:
            A float32 tensor of 0s and 1s, shape `(len(head_names) - 1,)`.
        """
        return draws.bernoulli_mask(self._branch_probs, self.branch_mask_seed, counter)

    def head_mask(self, training=False):
        """DHM's location indicators `I(l)` of this step: a 0/1 float32
        tensor with one entry per head (the main head always 1), or None
        when every branch is on (evaluation, `branch_keep_prob=1`).
        `DKSModel.compute_dks_loss` weights head `k`'s CE by it (Eq. 8);
        `pair_mask` weights the pairs (Eq. 9)."""
        if not training or not self.samples_branches:
            return None
        if self.branch_sampling == "step":
            branches = self.draw_branch_mask(self.step_counter())
        else:
            branches = ops.convert_to_tensor(self.branch_mask)
        return ops.concatenate([ops.ones((1,), "float32"), branches], axis=0)

    def pair_mask(self, training=False):
        """The 0/1 weight of every pair this step: `I(s) * I(t)` of its two
        heads (Eq. 9), times the per-pair dropping mask if
        `pair_keep_prob < 1`; None when every pair counts."""
        dropped = super().pair_mask(training)
        heads = self.head_mask(training)
        if heads is None or not self.pair_list:
            return dropped
        pairs = ops.stack([heads[s] * heads[t] for s, t in self.pair_list])
        return pairs if dropped is None else pairs * dropped

    def fit(self, *args, callbacks=None, **kwargs):
        """`keras.Model.fit`, adding a `RootResampler` when something is
        drawn per epoch and none is in `callbacks`.

        Args:
            *args: `keras.Model.fit`'s positional arguments.
            callbacks: list of callbacks, as in `keras.Model.fit`.
            **kwargs: `keras.Model.fit`'s other keyword arguments.

        Returns:
            The `keras.callbacks.History` of `keras.Model.fit`.
        """
        callbacks = list(callbacks or [])
        per_epoch = (self.root_sampling == "epoch" and self.root_selectors) or (
            self.branch_sampling == "epoch" and self.samples_branches
        )
        if per_epoch and not any(isinstance(c, RootResampler) for c in callbacks):
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
                "branch_keep_prob": self.branch_keep_prob,
                "branch_sampling": self.branch_sampling,
            }
        )
        return config
