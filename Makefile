# One-word entry points: `make run` (set up, fetch models, run the demo) and `make test` (set up everything, run all tests).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# torch and torchvision that import together (see README: training needs torchvision's ResNet50)
TORCH   := torch==2.14.1 torchvision==0.29.1
APT_PKGS := gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
            gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-tools python3-gi ffmpeg \
            prometheus chromium chromium-driver systemd libseccomp2 mosquitto mosquitto-clients redis-server redis-tools
PYTEST_ARGS ?=

.PHONY: run test test-fast setup setup-test models system-deps bench clean

run: setup models
	$(BIN)/agecam run --config config/demo.yaml

test: setup-test models
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup-test models
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

setup: $(VENV)/.runtime-ok

# The daemon's environment: onnxruntime-gpu (runs on CPU too) and headless OpenCV; what `pip install .` gives a service.
$(VENV)/.runtime-ok: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -c "import onnxruntime, cv2; assert 'CPUExecutionProvider' in onnxruntime.get_available_providers()"
	touch $@

setup-test: system-deps setup $(VENV)/.test-ok

# Tests also compare against insightface's own SCRFD code: installed with --no-deps, because its requirements would
# replace onnxruntime-gpu with CPU onnxruntime and headless OpenCV with the GUI build (its real needs are in the extras).
$(VENV)/.test-ok: pyproject.toml $(VENV)/.runtime-ok
	$(BIN)/python -m pip install -q $(TORCH) -e ".[train,test]"
	$(BIN)/python -m pip install -q --no-deps insightface==2.1
	$(BIN)/python -c "import torch, torchvision, onnxruntime; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'ort', onnxruntime.__version__)"
	touch $@

# Debian packages the end-to-end tests use: RTSP server (GStreamer), ffmpeg, Prometheus, Chromium, systemd-analyze.
system-deps:
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	fi

models: setup
	$(BIN)/agecam models fetch

bench: setup-test models
	$(BIN)/python bench/bench_peer.py --megamind

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
