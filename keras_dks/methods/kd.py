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

    Args:
        model: a trained `DKSModel` (its `inference_model()`: backbone +
            main head, logits) or any `keras.Model` with logits output.
        name: name of the copy (default `<name>_teacher`).

    Returns:
        A non-trainable functional `keras.Model` with the same weights;
        freezing or training it leaves `model` untouched.

    Example:
    ```python
    teacher = keras_dks.methods.frozen_teacher(dks_model)
    distiller = keras.distillation.Distiller(
        teacher=teacher, student=student,
        distillation_losses=keras.distillation.LogitsDistillation(temperature=3.0),
        student_loss_weight=0.5)
    distiller.compile(optimizer="adam",
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    distiller.fit(x, y, epochs=1)
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
