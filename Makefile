# Two commands do all set-up on a fresh machine:
#   make lab    JupyterLab on the notebooks, with the shipped models
#   make test   the whole test suite, notebooks included
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# the CPU build first: a plain torch requirement would pull several GB of CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# JupyterLab refuses to run as root unless told; containers often run as root
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: lab test bench
lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab $(ALLOW_ROOT) notebooks/

test: $(VENV)/.installed
	$(PY) -m pytest --nbval-lax -p no:cacheprovider tests notebooks

bench: $(VENV)/.installed
	$(PY) bench/train_overhead.py
