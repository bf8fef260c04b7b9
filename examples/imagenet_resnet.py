r"""ImageNet ResNets with DKS: the DKS paper's ImageNet recipe (section 4.2).

Networks (`--arch`): `keras_dks.backbones.resnet18/34/50/101/152`,
torchvision's layout (ResNet-50/101/152 are "v1.5", stride on the 3x3 conv,
the model of the authors' released checkpoints: 25,557,032 parameters for
ResNet-50). Auxiliary heads after conv3_x and conv4_x, built from the
backbone's own blocks: from conv3_x a conv4_x-like + a conv5_x-like stage,
from conv4_x a double-width conv5_x-like stage, with the DHM code's block
counts (ResNet-18 [[1, 2], [2]]: 53,483,512 parameters in training;
ResNet-50 [[3, 2], [3]]); `--head_blocks copy` gives the conv4_x-like stage
the backbone's own count. `--arch keras_resnet50` uses
`keras.applications.ResNet50` instead: a v1 ResNet (stride on the first
1x1 conv, biased convs, 25,583,592 parameters), tapped at `conv3_block4_out`
and `conv4_block6_out` with the generic head rule of `keras_dks.heads`; it
is not the network the paper trained.

Recipe (paper): SGD momentum 0.9, batch 256, 100 epochs, lr 0.1 divided by
10 every 30 epochs, weight decay 1e-4 (coupled L2 on all trainable
variables). Training augmentation (`--augment auto`, per architecture as in
the paper): ResNet-18/50 (and 34) "simple": resize to 256x256, random
224x224 crop, random flip; ResNet-152 (and 101) the aggressive Inception-style
random-resized crop (8-100 % area, aspect 3/4-4/3) + flip. Evaluation
(`--eval_resize square`, the authors' released script): resize to 256x256
bicubic, central 224x224 crop. `--augment random_resized` and
`--eval_resize shorter_side` give torchvision's reference recipe (the DHM
code's). Paper top-1/top-5 error (Table 2): ResNet-18 baseline 31.06/11.13,
DS 30.46/10.80, DKS 28.68/9.55; ResNet-50 baseline 25.47/7.58, DKS
23.53/6.40; ResNet-152 baseline 22.45/5.94, DKS 20.98/5.28.

Data: TFDS `imagenet2012`, which cannot be downloaded automatically: put
`ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar` in --manual_dir (the
first run prepares the TFDS records under --data_dir), or point --data_dir
at already prepared data. Any other TFDS image classification dataset works
through --dataset (e.g. `imagenette/320px` with --eval_split validation).

Needs, to run offline: `imagenet2012` prepared by TFDS under --data_dir,
or its two archives in --manual_dir (nothing is downloaded; another
--dataset is downloaded by TFDS unless prepared, and without network that
stops within seconds saying so); the packages tensorflow (or
tensorflow-cpu), tensorflow-datasets and keras-dks, matplotlib for the
curves, keras-cv for `--crop keras_cv`. Progress: one line per epoch
(`--verbose 1`: Keras' progress bar).

Outputs as in `cifar100_wrn.py`: checkpoints (re-run to resume),
TensorBoard, history JSON, per-head error curves PNG, model.keras, a
SavedModel with --export_dir, and a one-line summary.

Example:
    python examples/imagenet_resnet.py --arch resnet18 --data_dir /data/tfds \
        --manual_dir /data/imagenet --strategy mirrored --mixed_precision \
        --model_dir runs/r18_dks
    python examples/imagenet_resnet.py --arch resnet50 --method baseline ...
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402

FLAGS = flags.FLAGS
# Network.
ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "keras_resnet50"]
flags.DEFINE_enum("arch", "resnet18", ARCHS,
                  "Backbone: keras_dks.backbones.resnet<depth> (torchvision layout, v1.5 bottlenecks), "
                  "or keras_resnet50 = keras.applications.ResNet50 (v1, not the paper's network).")
flags.DEFINE_enum("head_blocks", "dhm", ["dhm", "copy"],
                  "Auxiliary head block counts: the DHM code's (dhm) or the backbone's own (copy).")
flags.DEFINE_enum("method", "dks", ["baseline", "ds", "dks", "dhm"],
                  "baseline: main head only; ds: auxiliary heads, no synergy; dks: heads + synergy; "
                  "dhm: DHMModel, by default the released DHM code (the DKS loss).")
flags.DEFINE_enum("pairs", "bidirectional", ["bidirectional", "top_down", "bottom_up"],
                  "Synergy pair strategy of dks/dhm.")
flags.DEFINE_bool("sync_batchnorm", False, "Synchronized BatchNorm across replicas (keras_dks backbones and heads).")
# Recipe.
flags.DEFINE_integer("epochs", 100, "Training epochs.")
flags.DEFINE_integer("batch_size", 256, "Global batch size.")
flags.DEFINE_float("lr", 0.1, "Initial learning rate.")
flags.DEFINE_float("lr_decay", 0.1, "Learning-rate multiplier at each boundary.")
flags.DEFINE_list("lr_boundaries", ["30", "60", "90"], "Epochs at which the learning rate decays.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum (no Nesterov).")
flags.DEFINE_float("weight_decay", 1e-4, "Coupled L2 on all trainable variables (PyTorch SGD weight_decay).")
flags.DEFINE_integer("seed", 0, "Random seed.")
# Data.
flags.DEFINE_string("dataset", "imagenet2012", "TFDS image classification dataset.")
flags.DEFINE_string("data_dir", None, "TFDS data folder (prepared data, or where to prepare it).")
flags.DEFINE_string("manual_dir", None, "Folder with the manually downloaded ImageNet tar files.")
flags.DEFINE_bool("download", True, "Let TFDS prepare the dataset if needed.")
flags.DEFINE_string("train_split", "train", "TFDS training split.")
flags.DEFINE_string("eval_split", "validation", "TFDS test split.")
flags.DEFINE_integer("train_examples", 0, "Use only the first N training examples (0: all).")
flags.DEFINE_integer("image_size", 224, "Training crop / test crop size (resize before cropping: size * 256 / 224).")
flags.DEFINE_enum("augment", "auto", ["auto", "simple", "random_resized"],
                  "Training augmentation: simple (256x256 resize, random crop, flip: the paper's "
                  "ResNet-18/50), random_resized (Inception-style crop + flip: the paper's ResNet-152), "
                  "or auto (the paper's choice for --arch).")
flags.DEFINE_enum("crop", "auto", ["auto", "keras_cv", "inception"],
                  "Implementation of the random-resized crop: keras_cv.layers.RandomCropAndResize, the "
                  "tf.image Inception crop (decodes only the crop window of JPEGs), or auto (keras-cv "
                  "when installed). Unused with --augment simple.")
flags.DEFINE_enum("eval_resize", "square", ["square", "shorter_side"],
                  "Test resize before the central crop: square (256x256 bicubic, the authors' script) "
                  "or shorter_side (shorter side 256, bilinear: torchvision's reference).")
flags.DEFINE_integer("shuffle_buffer", 10000, "Shuffle buffer (examples).")
# Execution.
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"], "tf.distribute strategy.")
flags.DEFINE_bool("mixed_precision", False, "mixed_float16 on GPU, mixed_bfloat16 on CPU.")
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
flags.DEFINE_string("model_dir", "runs/imagenet_resnet", "Checkpoints, TensorBoard, history, curves, model.keras.")
flags.DEFINE_string("export_dir", None, "If set, TF Serving SavedModel of the inference network (versioned).")
flags.DEFINE_integer("steps_per_epoch", 0, "Steps per epoch (0: one pass over the training data).")
flags.DEFINE_integer("eval_steps", 0, "Test batches per evaluation (0: the whole split).")
flags.DEFINE_integer("validation_freq", 1, "Evaluate every N epochs.")
flags.DEFINE_integer("benchmark_steps", 50, "Batches to time the input pipeline alone (0: skip).")
flags.DEFINE_bool("save_model", True, "Save the trained model as model_dir/model.keras.")
flags.DEFINE_integer("verbose", 2, "Progress: 0 none, 1 Keras' progress bar, 2 one line per epoch.")


def arch_depth(arch):
    """Depth of `--arch` (keras_resnet50: 50)."""
    return int(arch.replace("keras_", "").replace("resnet", ""))


def training_augmentation(arch, augment="auto"):
    """`--augment`, with "auto" resolved to the paper's choice for `arch`."""
    from keras_dks.data import imagenet

    return imagenet.paper_augmentation(arch_depth(arch)) if augment == "auto" else augment


def load_data():
    """(train_ds, test_ds, steps_per_epoch, num_classes)."""
    from keras_dks.data import imagenet, pipelines

    augment = training_augmentation(FLAGS.arch, FLAGS.augment)
    crop = "auto"
    if augment == "random_resized":
        crop = FLAGS.crop
        if crop == "auto":
            crop = "keras_cv" if imagenet.keras_cv_crop(FLAGS.image_size) is not None else "inception"
    split = FLAGS.train_split + (f"[:{FLAGS.train_examples}]" if FLAGS.train_examples else "")
    with _cli.user_errors(RuntimeError, FileNotFoundError):  # no data, no network
        raw_train, info = pipelines.load_tfds(
            FLAGS.dataset, split, FLAGS.data_dir, manual_dir=FLAGS.manual_dir, shuffle_files=True,
            seed=FLAGS.seed, download=FLAGS.download,
            # The tf.image crop decodes only its window of each JPEG.
            decode_images=crop == "keras_cv",
        )
        raw_test, _ = pipelines.load_tfds(
            FLAGS.dataset, FLAGS.eval_split, FLAGS.data_dir, decode_images=False, download=False
        )
    _, num_classes = pipelines.image_spec(info)
    n_train = pipelines.num_examples(info, split, raw_train)
    steps = FLAGS.steps_per_epoch or pipelines.steps_per_epoch(n_train, FLAGS.batch_size)
    train_ds = imagenet.make_dataset(
        raw_train, training=True, batch_size=FLAGS.batch_size, image_size=FLAGS.image_size,
        augment=augment, crop=crop, shuffle_buffer=FLAGS.shuffle_buffer, seed=FLAGS.seed,
        repeat=bool(FLAGS.steps_per_epoch),
    )
    if FLAGS.eval_steps:
        raw_test = raw_test.take(FLAGS.eval_steps * FLAGS.batch_size)
    test_ds = imagenet.make_dataset(
        raw_test, training=False, batch_size=FLAGS.batch_size, image_size=FLAGS.image_size,
        eval_resize=FLAGS.eval_resize,
    )
    crop_name = augment + (f", {crop}" if augment == "random_resized" else "")
    print(f"{FLAGS.dataset}: {n_train} training images, {num_classes} classes, "
          f"{FLAGS.image_size}px crops ({crop_name}), test resize {FLAGS.eval_resize}, "
          f"{steps} steps/epoch")
    return train_ds, test_ds, steps, num_classes


def build_backbone(arch, num_classes, image_size, sync_batchnorm=False, head_blocks="dhm"):
    """The backbone of `--arch`: a keras_dks ResNet (with the DHM code's
    head layout, or `head_blocks="copy"`) or keras.applications.ResNet50
    (v1) without its top."""
    import keras
    from keras_dks import backbones

    shape = (image_size, image_size, 3)
    if arch == "keras_resnet50":
        return keras.applications.ResNet50(weights=None, include_top=False, input_shape=shape)
    return backbones.ResNet(
        arch_depth(arch), num_classes, input_shape=shape, sync_batchnorm=sync_batchnorm,
        head_blocks=head_blocks,
    )


def main(argv):
    del argv
    import keras
    from keras_dks import distribute, methods, recipes
    from keras_dks.data import imagenet, pipelines

    strategy = distribute.get_strategy(FLAGS.strategy)  # first, before other TF work
    policy = recipes.set_precision(FLAGS.mixed_precision)
    keras.utils.set_random_seed(FLAGS.seed)
    train_ds, test_ds, steps, num_classes = load_data()

    with strategy.scope():
        backbone = build_backbone(FLAGS.arch, num_classes, FLAGS.image_size, FLAGS.sync_batchnorm,
                                  FLAGS.head_blocks)
        model = methods.build_model(
            FLAGS.method, backbone, num_classes=num_classes,
            pairs=FLAGS.pairs if FLAGS.method in ("dks", "dhm") else None,
            weight_decay=FLAGS.weight_decay, sync_batchnorm=FLAGS.sync_batchnorm, seed=FLAGS.seed,
        )
        schedule = recipes.step_schedule(
            FLAGS.lr, steps, [float(b) for b in FLAGS.lr_boundaries], FLAGS.lr_decay
        )
        model.compile(
            optimizer=recipes.sgd(schedule, FLAGS.momentum),
            metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5")],
            jit_compile=FLAGS.jit_compile,
        )
    name = f"{FLAGS.dataset} {FLAGS.arch} {FLAGS.method}"
    print(f"{name}: heads {model.head_names}, {model.count_params():,} parameters in training, "
          f"{model.inference_model().count_params():,} at inference; {strategy.num_replicas_in_sync} "
          f"replica(s), policy {policy}")

    model_dir = recipes.worker_dir(FLAGS.model_dir)
    result = recipes.train(
        model, train_ds, test_ds, epochs=FLAGS.epochs,
        steps_per_epoch=FLAGS.steps_per_epoch or None, model_dir=model_dir,
        batch_size=FLAGS.batch_size, validation_freq=FLAGS.validation_freq,
        verbose=FLAGS.verbose, title=name, save_model=FLAGS.save_model,
    )
    pipeline = None
    if FLAGS.benchmark_steps:
        pipeline = pipelines.measure_throughput(train_ds, steps=FLAGS.benchmark_steps)
    print(recipes.steps_summary(result["train_steps_per_second"], pipeline))
    if result["eval"]:
        print(f"top-5 error of the main head: {100 * (1 - result['eval']['top5']):.2f}%")
    if FLAGS.export_dir:
        export_dir = FLAGS.export_dir if recipes.is_chief() else os.path.join(model_dir, "export")
        print("SavedModel:", recipes.export_inference_model(model, export_dir, imagenet.MEAN, imagenet.STD))
    for key, path in result["paths"].items():
        print(f"{key}: {path}")
    print(recipes.summary_line(
        name, result["head_errors"], result["wall_seconds"], result["train_images_per_second"],
        pipeline["images_per_second"] if pipeline else None,
    ))


if __name__ == "__main__":
    _cli.run(main)
