"""Knowledge distillation from a DKS-trained teacher with keras.distillation.

1. trains a small CNN with DKS (or DS / DHM / the baseline) as the teacher;
2. distils its inference network (backbone + main head) into a smaller
   student with Keras' own `keras.distillation.Distiller` and
   `LogitsDistillation` - keras_dks adds no distiller of its own;
3. trains the same student without a teacher for comparison.

`keras_dks.methods.frozen_teacher` gives the Distiller an independent copy
of the teacher: the Distiller freezes its teacher, and the plain
`inference_model()` shares its layers with the DKSModel.

This is a usage demo, not a result: on runs this short the distilled
student does not necessarily beat the student trained alone (measured on the
defaults: it does not; Keras' Distiller also halves the CE weight by
default, `--student-loss-weight`).

Runs offline in seconds with the defaults (synthetic data). Real data:
`--data fashion_mnist` reads the IDX files of the Debian package
`dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist`).

Needs, to run offline: nothing but the packages tensorflow (or
tensorflow-cpu) and keras-dks with the default synthetic data; with
`--data fashion_mnist` the four Fashion-MNIST IDX files in `--data-dir`
(`apt-get install dataset-fashion-mnist`). Progress: one line per epoch of
each of the three trainings (`--verbose`).

Example:
    python examples/kd_distiller.py                      # synthetic, ~20 s
    python examples/kd_distiller.py --data fashion_mnist --num-train 5000 \\
        --teacher-epochs 10 --student-epochs 10 --image-size 28
"""

import argparse
import gzip
import os
import time

import keras
import numpy as np
import tensorflow as tf

from keras_dks import methods


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Needs, to run offline"):__doc__.index("Example:")],
    )
    p.add_argument("--data", choices=["synthetic", "fashion_mnist"], default="synthetic")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--num-train", type=int, default=512)
    p.add_argument("--num-test", type=int, default=256)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--teacher-method", choices=["baseline", "ds", "dks", "dhm"], default="dks")
    p.add_argument("--teacher-width", type=int, default=16)
    p.add_argument("--student-width", type=int, default=4)
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--student-epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--temperature", type=float, default=3.0)
    p.add_argument(
        "--student-loss-weight", type=float, default=0.5,
        help="Distiller's weight on CE; (1 - w) goes to T^2 KL.",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, choices=[0, 1, 2], default=2,
                   help="0 silent, 1 Keras' progress bar, 2 one line per epoch.")
    args = p.parse_args(argv)
    if args.data == "fashion_mnist" and not os.path.isdir(args.data_dir):
        p.error(f"--data-dir {args.data_dir} is not a folder: pass the folder of the four "
                "Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist puts them in "
                "/usr/share/datasets/fashion-mnist).")
    return args


def progress(args, label):
    """`fit` keyword arguments for the progress display of `--verbose`."""
    if args.verbose != 2:
        return {"verbose": args.verbose}
    from keras_dks import recipes

    return {"verbose": 0, "callbacks": [recipes.EpochProgress(label=label)]}


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
def synthetic(n_train, n_test, size, classes=10, seed=0):
    """Noisy class templates: learnable, but not in one epoch."""
    rng = np.random.default_rng(seed)
    templates = rng.normal(size=(classes, size, size, 1)).astype("float32")

    def draw(n):
        y = rng.integers(0, classes, n)
        x = templates[y] + 1.5 * rng.normal(size=(n, size, size, 1)).astype("float32")
        return x.astype("float32"), y

    return draw(n_train), draw(n_test), classes


def _idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(data_dir, n_train, n_test, size, seed=0):
    files = {
        "xtr": "train-images-idx3-ubyte.gz", "ytr": "train-labels-idx1-ubyte.gz",
        "xte": "t10k-images-idx3-ubyte.gz", "yte": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [f for f in files.values() if not os.path.exists(os.path.join(data_dir, f))]
    if missing:
        raise SystemExit(
            f"Fashion-MNIST not found in {data_dir} (missing {missing}); install "
            "the Debian package dataset-fashion-mnist or pass --data-dir."
        )
    d = {k: _idx(os.path.join(data_dir, f)) for k, f in files.items()}
    rng = np.random.default_rng(seed)
    tr = rng.permutation(len(d["ytr"]))[:n_train]

    def prep(x):
        x = x[..., None].astype("float32") / 255.0
        x = (x - 0.286) / 0.353  # Fashion-MNIST mean / std
        if size != 28:
            x = tf.image.resize(x, (size, size)).numpy()
        return x

    return (
        (prep(d["xtr"][tr]), d["ytr"][tr].astype("int64")),
        (prep(d["xte"][:n_test]), d["yte"][:n_test].astype("int64")),
        10,
    )


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------
def cnn(size, channels, width, classes=None, name="cnn"):
    """Three conv-BN-ReLU stages (stride 2 from the second): ends s1, s2, s3."""
    inp = keras.Input((size, size, channels))
    x = inp
    for k, (w, stride) in enumerate([(width, 1), (2 * width, 2), (4 * width, 2)], 1):
        x = keras.layers.Conv2D(w, 3, strides=stride, padding="same", use_bias=False,
                                name=f"s{k}_conv")(x)
        # momentum 0.9 (PyTorch 0.1, as in the DKS code): short runs need
        # moving statistics that catch up within a few hundred steps.
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"s{k}_bn")(x)
        x = keras.layers.ReLU(name=f"s{k}")(x)
    if classes is not None:  # a plain classifier (the student)
        x = keras.layers.GlobalAveragePooling2D()(x)
        x = keras.layers.Dense(classes, name="logits")(x)
    return keras.Model(inp, x, name=name)


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    if args.data == "synthetic":
        (x, y), (xt, yt), classes = synthetic(
            args.num_train, args.num_test, args.image_size, seed=args.seed)
    else:
        (x, y), (xt, yt), classes = fashion_mnist(
            args.data_dir, args.num_train, args.num_test, args.image_size, args.seed)
    size, channels = x.shape[1], x.shape[-1]
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    # 1. The teacher, trained with a method of the family (one switch).
    t0 = time.time()
    dks = methods.build_model(
        args.teacher_method,
        cnn(size, channels, args.teacher_width, name="teacher_backbone"),
        num_classes=classes,
        **({} if args.teacher_method == "baseline" else {"taps": ["s1", "s2"]}),
    )
    dks.compile(optimizer=keras.optimizers.Adam(args.lr), metrics=["accuracy"])
    dks.fit(x, y, batch_size=args.batch_size, epochs=args.teacher_epochs,
            **progress(args, "teacher"))
    teacher = methods.frozen_teacher(dks)
    print(f"teacher ({args.teacher_method}, heads {dks.head_names}): "
          f"test acc {accuracy(teacher, xt, yt):.4f}  [{time.time() - t0:.1f}s]")

    # 2. KD into a small student with Keras' own Distiller.
    t0 = time.time()
    student = cnn(size, channels, args.student_width, classes, name="student")
    distiller = keras.distillation.Distiller(
        teacher=teacher,
        student=student,
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=args.temperature),
        student_loss_weight=args.student_loss_weight,
    )
    distiller.compile(optimizer=keras.optimizers.Adam(args.lr), loss=ce,
                      metrics=["accuracy"])
    hist = distiller.fit(x, y, batch_size=args.batch_size, epochs=args.student_epochs,
                         **progress(args, "student+KD"))
    losses = hist.history["total_loss"]
    print(f"student + KD: test acc {accuracy(distiller.student, xt, yt):.4f}  "
          f"total_loss {losses[0]:.3f} -> {losses[-1]:.3f}  [{time.time() - t0:.1f}s]")

    # 3. The same student without a teacher.
    t0 = time.time()
    alone = cnn(size, channels, args.student_width, classes, name="student_alone")
    alone.compile(optimizer=keras.optimizers.Adam(args.lr), loss=ce, metrics=["accuracy"])
    alone.fit(x, y, batch_size=args.batch_size, epochs=args.student_epochs,
              **progress(args, "student"))
    print(f"student alone: test acc {accuracy(alone, xt, yt):.4f}  "
          f"[{time.time() - t0:.1f}s]")
    return distiller


if __name__ == "__main__":
    main()
