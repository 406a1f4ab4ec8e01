# Two commands a user needs (README): `make demo` and `make test`. Both set up the same
# environment: .venv in the repository, the pinned llama.cpp fetched into vendor/, one native
# build of it (ggq._native, its libraries, llama.cpp's tools) and llama-cpp-python bound to it.
#
# Back end: CPU by default; `GGQ_CUDA=ON make ...` builds llama.cpp with CUDA,
# Metal is on by default on macOS.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
LOCK := native/llama_cpp.lock.json
SDIST := vendor/$(shell $(PYTHON) -c "import json; print(json.load(open('$(LOCK)'))['filename'])")
VENDOR_STAMP := vendor/llama.cpp/.ggq-vendor.json
# the editable install maps the package files it saw: reinstall (seconds) when files are added
NATIVE_SOURCES := $(shell find native -type f) pyproject.toml $(shell find ggq -name "*.py")
GGQ_CUDA ?= OFF
export GGQ_CUDA

.PHONY: demo test install lint clean distclean FORCE

demo: install
	$(PY) tools/demo.py

test: install lint
	$(PY) -m pytest -q --durations=15

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy ggq

install: $(VENV)/.native $(VENV)/.llama-cpp-python

# Always checked (sha256 of the sdist and of every unpacked file, about a second); the stamp
# is rewritten, and the native build redone, only when the tree had to be unpacked again.
$(VENDOR_STAMP): FORCE
	$(PYTHON) tools/vendor_llama_cpp.py check-tools
	$(PYTHON) tools/vendor_llama_cpp.py fetch

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned. `==2.13.0` also matches a local `2.13.0+cpu` wheel and pip prefers it
# (a local version sorts higher): the CPU build where one lies beside PyPI (these machines).
# With GGQ_CUDA=ON `===2.13.0` takes exactly 2.13.0, PyPI's wheel, which on Linux x86-64 is the
# CUDA 13 build (it requires nvidia-*-cu13), and the check after says if torch still has no CUDA.
TORCH := torch$(if $(filter ON,$(GGQ_CUDA)),===,==)2.13.0

$(VENV)/.torch-$(GGQ_CUDA): $(VENV)/bin/python Makefile
	$(PIP) install -q "$(TORCH)"
	$(PY) -c "import sys, torch; sys.exit('$(GGQ_CUDA)' == 'ON' and not torch.version.cuda and \
		f'GGQ_CUDA=ON: torch {torch.__version__} is built without CUDA')"
	rm -f $(VENV)/.torch-* && touch $@

$(VENV)/.deps: $(VENV)/bin/python $(VENV)/.torch-$(GGQ_CUDA) pyproject.toml Makefile $(VENDOR_STAMP)
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja
	$(PIP) install -q ./vendor/llama.cpp/gguf-py
	$(PIP) install -q "numpy>=1.26" "transformers>=4.51" "safetensors>=0.4" "tokenizers>=0.21" \
		"huggingface_hub>=0.24" "jinja2>=3.1" "click>=8.1" "rich>=13" \
		"pytest>=8" "ruff>=0.6" "mypy>=1.10" diskcache typing-extensions "matplotlib>=3.8" \
		sentencepiece  # llama.cpp's convert_hf_to_gguf.py imports it (a test compares with it)
	touch $@

$(VENV)/.native: $(VENV)/.deps $(VENDOR_STAMP) $(NATIVE_SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e . -Cbuild.verbose=false
	touch $@

# llama-cpp-python's Python layer only (LLAMA_BUILD=OFF), its lib/ a link to ggq's libllama:
# a plain `import llama_cpp` in this environment loads the one build.
$(VENV)/.llama-cpp-python: $(VENV)/.deps $(VENDOR_STAMP) $(VENV)/.native
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PIP) install -q --no-build-isolation --no-deps $(SDIST)
	$(PY) -c "from ggq import native; print('llama-cpp-python uses', native.bind_llama_cpp().resolve())"
	touch $@

clean:
	rm -rf build

distclean: clean
	rm -rf $(VENV) vendor/llama.cpp
