"""The DKS family behind one switch: baseline, DS, DKS, DHM, SRDL, KD.

- `baseline`: the plain network (`DKSModel(taps=[])`, one head).
- `ds`: deep supervision, auxiliary heads with cross-entropy only
  (`pairs="none"`).
- `dks`: DKS (Sun et al., CVPR 2019), heads + pairwise synergy loss.
- `dhm`: DHM (Li & Chen, CVPR 2020), `DHMModel`: by default the paper's
  main setting and released code (every branch's CE and every pair, the
  DKS loss); optionally the paper's stochastic branch locations
  (`branch_keep_prob`), dynamic roots, per-pair dropping (`pair_keep_prob`).
- `srdl`: SRDL (Lan et al., ACCV 2018), a two-stage self-distillation of a
  plain network; it is a training *procedure*, driven by `SRDL`, not a set
  of `DKSModel` arguments.
- KD: use `keras.distillation.Distiller`; `frozen_teacher` turns a trained
  DKSModel into a teacher (see `keras_dks.methods.kd`).

`dks_kwargs(method)` gives the constructor arguments of the first four;
`build_model(method, backbone, ...)` builds the model.
"""

from keras_dks.methods.dhm import DHMModel
from keras_dks.methods.dhm import RootResampler
from keras_dks.methods.dhm import RootSelector
from keras_dks.methods.kd import frozen_teacher
from keras_dks.methods.srdl import SRDL
from keras_dks.methods.srdl import SRDLModel
from keras_dks.methods.srdl import step_decay
from keras_dks.methods.srdl import with_index
from keras_dks.model import DKSModel

METHODS = ("baseline", "ds", "dks", "dhm", "srdl")
# The methods that are a DKSModel configuration (`build_model`); SRDL is a
# training procedure (`SRDL`).
MODEL_METHODS = tuple(m for m in METHODS if m != "srdl")

_ROOT_ARGS = (
    "roots", "root_probs", "root_sampling", "eval_roots",
    "branch_keep_prob", "branch_sampling",
)


def dks_kwargs(method, pairs=None, **overrides):
    """Constructor arguments of `DKSModel` / `DHMModel` for a method.

    Args:
        method: `"baseline"` (`taps=[]`), `"ds"` (`pairs="none"`), `"dks"`
            (`pairs=pairs`) or `"dhm"` (`pairs=pairs`; pass `roots=...`,
            `branch_keep_prob=...` for DHM's options, which need
            `DHMModel`, see `build_model`). `"srdl"` raises: use `SRDL`.
        pairs: pair strategy of `dks` and `dhm`. Defaults to `None`,
            meaning `"bidirectional"` (the DKS paper's best).
        **overrides: any other constructor argument (`taps`, `head`,
            `aux_weight`, `weight_decay`, ...); they win over the defaults,
            except where they contradict the method (taps for the baseline,
            pairs for DS, dynamic roots outside DHM).

    Returns:
        A dict of keyword arguments.

    Raises:
        ValueError: an unknown method, `"srdl"`, or overrides that
            contradict the method (taps for the baseline, pairs other than
            `"none"` for DS, `roots` / `root_probs` / `root_sampling` /
            `eval_roots` / `branch_keep_prob` / `branch_sampling` outside
            `"dhm"`).

    Example:
    ```python
    from keras_dks import methods
    print(methods.dks_kwargs("baseline"))          # {'taps': []}
    print(methods.dks_kwargs("ds"))                # {'pairs': 'none'}
    print(methods.dks_kwargs("dks", aux_weight=0.5))
    # {'pairs': 'bidirectional', 'aux_weight': 0.5}
    ```
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; use one of {METHODS}.")
    if method == "srdl":
        raise ValueError(
            "SRDL is a two-stage training procedure of a plain network, not a "
            "DKSModel configuration: use keras_dks.methods.SRDL(model_fn, epochs)."
        )
    roots = [k for k in _ROOT_ARGS if k in overrides]
    if roots and method != "dhm":
        raise ValueError(
            f"{roots} configure DHM's branches and roots; use method='dhm'."
        )
    if method == "baseline":
        if overrides.get("taps", []) != []:
            raise ValueError(
                "The baseline has no auxiliary heads; do not pass taps (use 'ds')."
            )
        kwargs = {"taps": []}
    elif method == "ds":
        if pairs not in (None, "none"):
            raise ValueError("DS has no synergy pairs; use method='dks'.")
        kwargs = {"pairs": "none"}
    else:  # "dks", "dhm"
        kwargs = {"pairs": pairs or "bidirectional"}
    kwargs.update(overrides)
    return kwargs


def build_model(method, backbone, num_classes=None, pairs=None, **overrides):
    """The model of a method: `DKSModel`, or `DHMModel` for `"dhm"`.

    Args:
        method: one of `MODEL_METHODS` (`METHODS` except `"srdl"`: use
            `SRDL`).
        backbone: the backbone, see `keras_dks.DKSModel`.
        num_classes: number of classes, see `keras_dks.DKSModel`.
            Defaults to `None`.
        pairs: see `dks_kwargs`. Defaults to `None`.
        **overrides: other constructor arguments, see `dks_kwargs`.

    Returns:
        A `keras_dks.methods.DHMModel` for `"dhm"`, else a
        `keras_dks.DKSModel`.

    Raises:
        ValueError: see `dks_kwargs`, and the constructor's own checks.

    Example:
    ```python
    import keras_dks
    backbone = keras_dks.backbones.wide_resnet(10, 1, num_classes=10)
    model = keras_dks.methods.build_model("dhm", backbone)
    model.compile(optimizer="sgd", metrics=["accuracy"])
    print(type(model).__name__, model.head_names)
    # DHMModel ['main', 'aux_group1', 'aux_group0']
    ```
    """
    kwargs = dks_kwargs(method, pairs=pairs, **overrides)
    cls = DHMModel if method == "dhm" else DKSModel
    return cls(backbone, num_classes=num_classes, **kwargs)


__all__ = [
    "METHODS",
    "MODEL_METHODS",
    "DHMModel",
    "RootResampler",
    "RootSelector",
    "SRDL",
    "SRDLModel",
    "build_model",
    "dks_kwargs",
    "frozen_teacher",
    "step_decay",
    "with_index",
]
