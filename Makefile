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

.PHONY: lab test bench frontier paper-models
lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab $(ALLOW_ROOT) notebooks/

test: $(VENV)/.installed
	$(PY) -m pytest --nbval-lax -p no:cacheprovider tests notebooks

bench: $(VENV)/.installed
	$(PY) bench/train_overhead.py

# results/frontier.json and .png: every task pruned with two seeds on the shipped small pair and
# the paper-shaped models (default PruneConfig; hours on 2 cores, minutes on a GPU), then merged
DEVICE ?= $(shell $(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
JOBS ?= 2
frontier: $(VENV)/.installed paper-models
	$(VENV)/bin/cspkit sweep --models data/models/small-sparse data/models/small-dense --tasks all --seeds 0 1 \
		--jobs $(JOBS) --out results/sparse_vs_dense.json --controls single_double_quote,var_if
	$(VENV)/bin/cspkit sweep --models data/models/paper-e1-sparse data/models/paper-e1-dense \
		data/models/paper-e1-sparser data/models/paper-e2-sparse --tasks all --seeds 0 1 --jobs $(JOBS) \
		--device $(DEVICE) --out results/sweep_paper_scaled.json
	$(VENV)/bin/cspkit sweep-merge results/sparse_vs_dense.json results/sweep_paper_scaled.json \
		--out results/frontier.json --plot results/frontier.png

# The paper-shaped models' weights (47 MB) are not in the checkout, to keep data/ under 40 MB;
# their configs, logs and node means are. This restores the exact weights every committed
# result on them was measured with, from the commit that added them (needs the git history).
PAPER_WEIGHTS_REV := 85faa93921bad5215e8410e69e766967478897c5
PAPER_MODELS := paper-e1-sparse paper-e1-dense paper-e1-sparser paper-e2-sparse
paper-models:
	@git cat-file -e $(PAPER_WEIGHTS_REV)^{commit} 2>/dev/null || { echo "paper-models: commit \
	$(PAPER_WEIGHTS_REV) is not in this clone; fetch the full history (git fetch --unshallow)"; exit 1; }
	@for m in $(PAPER_MODELS); do f=data/models/$$m/model.safetensors; [ -f $$f ] && continue; \
		git show $(PAPER_WEIGHTS_REV):$$f > $$f.tmp && mv $$f.tmp $$f && echo "restored $$f" || exit 1; done
