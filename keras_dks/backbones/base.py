"""`DKSBackbone`: the DKS head protocol, declared once for every backbone.

`keras_dks.DKSModel` (through `keras_dks.adapt` and `keras_dks.taps`) reads
four members from a backbone when it has them (any functional `keras.Model`
may define them; without them the heads are inferred from the graph):

- `dks_taps`: the layers to attach the auxiliary heads to, deepest first.
- `dks_head_stages(tap_name)`: that tap's head, a list of
  `keras_dks.heads.HeadStage(filters, blocks, stride)`.
- `dks_block_kind`: the `keras_dks.blocks` block kind of the heads.
- `dks_block_config()`: a new `keras_dks.blocks.BlockConfig` for them.
"""

import keras

from keras_dks import adapt
from keras_dks import blocks


class DKSBackbone(keras.Model):
    """A functional backbone that says where and how DKS attaches its heads.

    Subclasses build their graph, call `super().__init__(inputs=...,
    outputs=..., name=...)`, then `declare_heads(...)` and
    `declare_config(...)`. Config and deserialization follow keras-hub's
    backbones: `get_config()` returns the constructor arguments,
    `from_config` calls the constructor.

    `DKSBackbone` takes the arguments of a functional `keras.Model`
    (`inputs`, `outputs`, `name`, ...); a subclass's own constructor
    arguments are whatever it records with `declare_config`.

    Example:
    ```python
    import keras
    from keras_dks import blocks, heads
    from keras_dks.backbones.base import DKSBackbone

    class Tiny(DKSBackbone):
        def __init__(self, num_classes=10, **kwargs):
            config = blocks.BlockConfig()
            inputs = keras.Input((32, 32, 3))
            x = blocks.conv(inputs, 16, 3, 1, "stem", config)
            x = blocks.residual_stage(x, 16, 1, 2, "basic", "s1", config)
            x = blocks.residual_stage(x, 32, 1, 2, "basic", "s2", config)
            x = keras.layers.GlobalAveragePooling2D()(x)
            super().__init__(inputs=inputs,
                             outputs=keras.layers.Dense(num_classes)(x), **kwargs)
            self.declare_heads(
                {"s1_block0_out": [heads.HeadStage(32, 1, 2)]}, "basic")
            self.declare_config(num_classes=num_classes)

        def dks_block_config(self):
            return blocks.BlockConfig()

    print(Tiny().dks_head_stages("s1_block0_out"))
    # [HeadStage(filters=32, blocks=1, stride=2)]
    ```
    """

    def declare_heads(self, head_stages, block_kind):
        """Declare the auxiliary heads.

        Args:
            head_stages: dict `{tap layer name: [HeadStage, ...]}`, deepest
                tap first (its order is `dks_taps`).
            block_kind: one of `keras_dks.blocks.BLOCK_KINDS`.

        Raises:
            ValueError: `block_kind` is not a block kind.
        """
        if block_kind not in blocks.BLOCK_KINDS:
            raise ValueError(
                f"block_kind must be one of {list(blocks.BLOCK_KINDS)}; got "
                f"{block_kind!r}."
            )
        self._dks_head_stages = {tap: list(s) for tap, s in head_stages.items()}
        self._dks_block_kind = block_kind

    def declare_config(self, **arguments):
        """Record the constructor arguments `get_config` returns.

        Each also becomes an attribute (`self.depth`, ...); one that
        `keras.Model` already defines gets a trailing underscore
        (`self.input_shape_`).

        Args:
            **arguments: the constructor arguments, by name.
        """
        self._dks_arguments = dict(arguments)
        for key, value in arguments.items():
            taken = isinstance(getattr(type(self), key, None), property)
            setattr(self, key + "_" if taken else key, value)

    @property
    def dks_taps(self):
        """Tap layer names of the auxiliary heads, deepest first."""
        return list(self._dks_head_stages)

    @property
    def dks_block_kind(self):
        """Block kind of the backbone, hence of its heads."""
        return self._dks_block_kind

    def dks_block_config(self):
        """A new `blocks.BlockConfig` with the backbone's settings."""
        raise NotImplementedError(
            f"{type(self).__name__} must define dks_block_config()."
        )

    def dks_head_stages(self, tap_name):
        """The auxiliary head for `tap_name`, as a list of `HeadStage`s.

        Args:
            tap_name: one of `dks_taps`.

        Returns:
            A new list of `keras_dks.heads.HeadStage`, shallowest first.

        Raises:
            ValueError: `tap_name` is not one of `dks_taps`.
        """
        if tap_name not in self._dks_head_stages:
            raise ValueError(
                f"{type(self).__name__} defines auxiliary heads for the taps "
                f"{self.dks_taps} only; got {tap_name!r}."
            )
        return list(self._dks_head_stages[tap_name])

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, **self._dks_arguments}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def check_num_classes(num_classes, include_top):
    """The classifier width: `keras_dks.adapt.check_num_classes` (an integer
    >= 2), required when `include_top=True`, optional otherwise.

    Args:
        num_classes: the classifier width, or None.
        include_top: whether the backbone ends in a classifier.

    Returns:
        `num_classes` as checked by `keras_dks.adapt.check_num_classes`
        (None stays None).

    Raises:
        ValueError: `num_classes` is None with `include_top=True`, or is not
            an integer >= 2.

    Example:
    ```python
    from keras_dks.backbones.base import check_num_classes
    print(check_num_classes(10, include_top=True))     # 10
    print(check_num_classes(None, include_top=False))  # None
    ```
    """
    if include_top and num_classes is None:
        raise ValueError(
            "num_classes is required when include_top=True (the width of the "
            "classifier); pass include_top=False for a feature extractor."
        )
    return adapt.check_num_classes(num_classes)


def blocks_per_stage(depth, extra_layers, model_name, examples):
    """n, the blocks per stage of a three-stage CIFAR network of depth
    `6n + extra_layers` (2 for the CIFAR ResNets, 4 for Wide ResNets).

    Args:
        depth: the network depth (an int).
        extra_layers: layers outside the blocks (2 or 4, see above).
        model_name: the network's name, for the error message.
        examples: valid depths, a string for the error message.

    Returns:
        n, an int >= 1.

    Raises:
        ValueError: `depth` is not an integer `6n + extra_layers` with
            n >= 1 (the message names `examples`).

    Example:
    ```python
    from keras_dks.backbones.base import blocks_per_stage
    print(blocks_per_stage(28, 4, "WideResNet", "16, 22, 28"))  # 4
    print(blocks_per_stage(32, 2, "CIFAR ResNet", "20, 32"))    # 5
    ```
    """
    if (
        not isinstance(depth, int)
        or isinstance(depth, bool)
        or depth < 6 + extra_layers
        or (depth - extra_layers) % 6
    ):
        raise ValueError(
            f"{model_name} depth must be an integer 6n + {extra_layers} with "
            f"n >= 1 (e.g. {examples}); got depth={depth!r}."
        )
    return (depth - extra_layers) // 6


def check_input_shape(input_shape):
    """`input_shape` as a `(height, width, channels)` tuple.

    Args:
        input_shape: any sequence of 3 entries.

    Returns:
        A tuple of 3 entries.

    Raises:
        ValueError: `input_shape` does not have 3 entries.

    Example:
    ```python
    from keras_dks.backbones.base import check_input_shape
    print(check_input_shape([32, 32, 3]))  # (32, 32, 3)
    ```
    """
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            f"input_shape must be (height, width, channels); got {input_shape!r}."
        )
    return input_shape


def residual_stages(x, stages, kind, config):
    """Residual stages, each ending in a named, weightless layer.

    Args:
        x: input tensor.
        stages: `(name, filters, blocks, stride)` per stage; the stage's
            output is the `keras.layers.Identity` layer `name`, the stable
            tap point `dks_taps` refers to, whatever the blocks' names are.
        kind: `keras_dks.blocks` block kind.
        config: `keras_dks.blocks.BlockConfig`.

    Returns:
        The output of the last stage's `Identity` layer.

    Raises:
        ValueError: `kind` is not a block kind.

    Example:
    ```python
    import keras
    from keras_dks import blocks
    from keras_dks.backbones.base import residual_stages
    inputs = keras.Input((32, 32, 16))
    x = residual_stages(inputs, [("group0", 16, 1, 1), ("group1", 32, 1, 2)],
                        "preact_basic", blocks.BlockConfig())
    print(keras.Model(inputs, x).get_layer("group1").output.shape)
    # (None, 16, 16, 32)
    ```
    """
    for name, filters, count, stride in stages:
        x = blocks.residual_stage(x, filters, count, stride, kind, name, config)
        x = keras.layers.Identity(name=name)(x)
    return x
