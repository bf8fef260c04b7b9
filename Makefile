# Set-up and the two entry points of the README: `make demo`, `make test`.
# keras-dks requires no Keras backend (pyproject.toml): these targets install
# the CPU TensorFlow wheel, and JAX and PyTorch for the backend tests.
PYTHON ?= python
TF_PACKAGE ?= tensorflow-cpu==2.21.0
# PyTorch CPU wheel for the backend tests; PyPI's default torch wheel is the
# CUDA build, so the CPU wheel comes from local disk or PyTorch's CPU index.
TORCH_WHEEL ?= $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl))

.PHONY: install install-demo data demo test

# What the demo needs: TensorFlow (+ TensorBoard), this package and matplotlib.
install-demo:
	# A TensorFlow already installed (e.g. the GPU wheel `tensorflow`) is kept.
	$(PYTHON) -c "import tensorflow" 2>/dev/null || $(PYTHON) -m pip install -q "$(TF_PACKAGE)"
	$(PYTHON) -m pip install -q -e ".[plots,data]" "tensorboard>=2.19"

# Everything the tests exercise.
install: install-demo
	# test: pytest & co; export: the ONNX / LiteRT / OpenVINO converters and runtimes.
	$(PYTHON) -m pip install -q -e ".[test,export,data]"
	# keras-hub backbones are tested too. keras-hub's tensorflow-text
	# dependency (text models only) pins the full `tensorflow` wheel, so
	# install keras-hub without it.
	$(PYTHON) -m pip install -q --no-deps "keras-hub==0.32.0"
	$(PYTHON) -m pip install -q regex rich packaging kagglehub "kagglesdk==0.1.28" tokenizers sentencepiece
	# keras-hub's own test case (run_serialization_test, run_model_saving_test)
	# imports grain.
	$(PYTHON) -m pip install -q "grain==0.2.18"
	# keras-cv: the Inception-style random-resized crop of the ImageNet pipeline.
	$(PYTHON) -m pip install -q "keras-cv==0.9.0"
	# JAX and PyTorch on CPU: tests/test_backends.py trains DKSModel on both.
	$(PYTHON) -c "import jax" 2>/dev/null || $(PYTHON) -m pip install -q "jax==0.10.2" "jaxlib==0.10.2"
	@$(PYTHON) -c "import torch" 2>/dev/null || { \
	  if [ -n "$(TORCH_WHEEL)" ]; then $(PYTHON) -m pip install -q "$(TORCH_WHEEL)"; \
	  else $(PYTHON) -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
	    || { echo "No CPU torch wheel: pass TORCH_WHEEL=/path/to/torch-2.13.0+cpu-...whl"; exit 1; }; fi; }

# Real Fashion-MNIST, offline: Debian's dataset-fashion-mnist (IDX files). The
# demo trains on it and tests read it: without it this target fails.
data:
	@if dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else echo "make data: Debian's dataset-fashion-mnist package (real Fashion-MNIST, read by the demo and the tests) is not installed, and this user cannot install it. Fix: sudo apt-get install dataset-fashion-mnist"; exit 1; fi
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { echo "make data: installing dataset-fashion-mnist failed; run: sudo apt-get install dataset-fashion-mnist"; exit 1; }

demo: install-demo data
	$(PYTHON) examples/fashion_mnist.py

# Two pytest workers (pytest-xdist): 8-10 min of tests on 2 cores (see README).
test: install data
	$(PYTHON) -m pytest -q -n 2 tests
