"""keras-dks: Deeply-supervised Knowledge Synergy for Keras 3 / TensorFlow."""

import importlib.metadata
import os
import re

from setuptools import find_packages
from setuptools import setup


def _tensorflow_requirement():
    # TensorFlow ships as `tensorflow` (CPU+GPU) and `tensorflow-cpu`; both
    # provide the same module. Require whichever is installed so pip never
    # pulls the second one in beside the first. KERAS_DKS_TF overrides.
    name = os.environ.get("KERAS_DKS_TF")
    if not name:
        name = "tensorflow"
        for candidate in ("tensorflow-cpu", "tensorflow"):
            try:
                importlib.metadata.version(candidate)
                name = candidate
                break
            except importlib.metadata.PackageNotFoundError:
                pass
    return f"{name}>=2.16"


def _version():
    with open(os.path.join("keras_dks", "__init__.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="keras-dks",
    version=_version(),
    description=(
        "Deeply-supervised Knowledge Synergy (CVPR 2019) and its family "
        "for Keras 3 / TensorFlow."
    ),
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["keras_dks", "keras_dks.*"]),
    python_requires=">=3.9",
    install_requires=[
        _tensorflow_requirement(),
        "keras>=3.8",
        "absl-py",
        "tensorflow-datasets",
        # TensorFlow >= 2.21 no longer pulls TensorBoard in; the training
        # recipe's TensorBoard logs need it.
        "tensorboard>=2.16",
        # tensorflow-datasets 4.9.10 imports it when preparing a dataset but
        # declares it for Python < 3.9 only (tensorflow/datasets#11212).
        "importlib_resources",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3.6", "matplotlib", "numpy", "scipy"],
        "benchmarks": ["matplotlib", "scipy"],
        "plots": ["matplotlib"],
        "cv": ["keras-cv>=0.9"],
        "hub": ["keras-hub>=0.20"],
        # DKSModel.export formats other than tf_saved_model: the converters
        # Keras 3.15 calls (tf2onnx + onnx for ONNX, openvino for OpenVINO;
        # LiteRT files are written by TensorFlow's own converter) and the
        # runtimes that load the artifacts. Pinned: these versions install
        # beside tensorflow 2.21 / numpy 2 / protobuf 7 without changing them.
        "export": [
            "tf2onnx==1.17.0",
            "onnx==1.23.2",
            "onnxruntime==1.32.0",
            "ai-edge-litert==2.3.0",
            "openvino==2026.4.1",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "License :: OSI Approved :: Apache Software License",
    ],
)
