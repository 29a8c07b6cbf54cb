# Two commands set up everything on a fresh machine:
#   make demo   installs into .venv, then trains a small MobileNet on a generated dataset and exports it
#   make test   installs into .venv (with test tools), then runs lint and the whole test suite (what CI runs)
#   make test-fast   the same without the `slow` tests (end-to-end runs, DDP, benches): the development loop
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CUDA build of torch that clusters use also runs on CPU; these versions are on this machine's disk.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# Test modules run in parallel, one worker per core up to 4 (much of a test is single-threaded Python: torch.export,
# ExecuTorch lowering, Hydra); each module stays in one worker, so its fixtures are built once.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: install demo test test-fast lint clean timm-train

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev,int8,litert]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python -m train experiment=demo

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

test-fast: install lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope -m "not slow" $(PYTEST_ARGS)

# timm's own train.py, the peer of bench.train_step and bench.gpu_check (it is not in timm's wheel or sdist): from a
# checkout (TIMM_SRC=path/to/pytorch-image-models), else the file of the installed timm's release tag on GitHub.
TIMM_SRC ?=
timm-train: install
	mkdir -p .cache/timm
	if [ -n "$(TIMM_SRC)" ]; then cp "$(TIMM_SRC)/train.py" .cache/timm/train.py; else \
	  v=$$($(BIN)/python -c "import timm; print(timm.__version__)"); \
	  curl -fsSL "https://raw.githubusercontent.com/huggingface/pytorch-image-models/v$$v/train.py" \
	    -o .cache/timm/train.py; fi
	@echo "timm's train.py: .cache/timm/train.py"

clean:
	rm -rf runs .cache .pytest_cache
