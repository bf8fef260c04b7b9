"""Knowledge distillation (Hinton et al.) with Keras' own `Distiller`.

keras_dks does not ship another distiller: `keras.distillation.Distiller`
with `LogitsDistillation` (Keras 3.12 and later) is the teacher-to-student
KD the DKS paper compares against (Table 6). This module only holds the
glue a DKS teacher needs:

`Distiller` freezes its teacher by setting `teacher.trainable = False`. A
`DKSModel.inference_model()` *shares* its layers with the DKSModel, so
passing it directly would also freeze the DKSModel's backbone and main
head (`tests/test_methods.py` shows it).
`frozen_teacher` hands the Distiller an independent copy instead.

Keras' Distiller weighs the terms as
`student_loss_weight * CE + (1 - student_loss_weight) * T^2 KL`
(default 0.5 / 0.5), not Hinton's `CE + T^2 KL`; pick
`student_loss_weight` accordingly.
"""

import keras

from keras_dks.model import DKSModel


def frozen_teacher(model, name=None):
    """An independent, frozen copy of a trained model's inference network.

    The copy is made with `keras.models.clone_model` (new layers from the
    same configs) and the weights copied over.

    Args:
        model: a trained `DKSModel` (its `inference_model()`: backbone +
            main head, logits, is copied) or any functional / Sequential
            `keras.Model` with logits output (copied as is).
        name: name of the copy. Defaults to `None`, meaning
            `"<name>_teacher"` where `<name>` is the copied network's name
            (for a `DKSModel`: `"<backbone name>_inference_teacher"`).

    Returns:
        A non-trainable functional `keras.Model` with the same weights;
        freezing or training it leaves `model` untouched.

    Example:
    ```python
    import numpy as np, keras, keras_dks
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="s1")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="s2")(x)
    dks_model = keras_dks.DKSModel(keras.Model(inputs, x), num_classes=5,
                                   taps=["s1"])            # trained before
    student = keras.Sequential([keras.Input((16, 16, 3)),
                                keras.layers.Flatten(), keras.layers.Dense(5)])
    teacher = keras_dks.methods.frozen_teacher(dks_model)
    distiller = keras.distillation.Distiller(
        teacher=teacher, student=student,
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=3.0),
        student_loss_weight=0.5)
    distiller.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.rand(8, 16, 16, 3).astype("float32")
    y = np.random.randint(0, 5, 8)
    distiller.fit(x, y, epochs=1, verbose=0)
    print(dks_model.trainable)  # True: only the copy is frozen
    ```
    """
    net = model.inference_model() if isinstance(model, DKSModel) else model
    # New layers from the same configs: the copy owns its variables.
    teacher = keras.models.clone_model(net)
    teacher.set_weights(net.get_weights())
    teacher = keras.Model(
        teacher.inputs, teacher.outputs, name=name or f"{net.name}_teacher"
    )
    teacher.trainable = False
    return teacher
