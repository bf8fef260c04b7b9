# Set-up and the two entry points of the README: `make demo`, `make test`.
PYTHON ?= python
TF_PACKAGE ?= tensorflow-cpu==2.21.0

.PHONY: install data demo test

install:
	# TensorFlow first, so setup.py requires the flavour that is installed.
	$(PYTHON) -c "import tensorflow" 2>/dev/null || $(PYTHON) -m pip install -q "$(TF_PACKAGE)"
	# test: pytest & co; export: the ONNX / LiteRT / OpenVINO converters and runtimes.
	$(PYTHON) -m pip install -q -e ".[test,export]"
	# keras-hub backbones are tested too. keras-hub's tensorflow-text
	# dependency (text models only) pins the full `tensorflow` wheel, so
	# install keras-hub without it.
	$(PYTHON) -m pip install -q --no-deps "keras-hub==0.32.0"
	$(PYTHON) -m pip install -q regex rich packaging kagglehub "kagglesdk==0.1.28" tokenizers sentencepiece
	# keras-cv: the Inception-style random-resized crop of the ImageNet pipeline.
	$(PYTHON) -m pip install -q "keras-cv==0.9.0"

data:
	# Real Fashion-MNIST, offline: Debian's dataset-fashion-mnist (IDX files).
	@if dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else echo "dataset-fashion-mnist not installed: the demo falls back to keras.datasets"; fi

demo: install data
	$(PYTHON) examples/fashion_mnist.py

test: install data
	$(PYTHON) -m pytest -q tests
