# Two commands do all set-up on a fresh machine:
#   make lab    JupyterLab on the notebooks, with the shipped models
#   make test   the whole test suite, notebooks included
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	# the CPU build first: a plain torch requirement would pull several GB of CUDA packages
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# JupyterLab refuses to run as root unless told; containers often run as root
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: lab test test-gpu student bench frontier lambda-penalties paper-models small-results small-model-results small-bridge-results \
	bridged-results
lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab $(ALLOW_ROOT) notebooks/

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest --nbval-lax -p no:cacheprovider --durations=25 tests notebooks

# the series at full size (CSPKIT_PROFILE=full) on a CUDA machine; notebooks/README.md records its times
test-gpu: $(VENV)/.installed
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu needs a CUDA GPU: torch.cuda.is_available() is False here')"
	CSPKIT_PROFILE=full $(PY) -m pytest --nbval-lax -p no:cacheprovider --durations=0 notebooks

# the notebooks without their exercises' solutions, for a course (notebooks/README.md)
student: $(VENV)/.installed
	$(CS) student --src notebooks --out student

# the shipped pair and where results go; the variables measure another pair into other folders
CS := $(VENV)/bin/cspkit
SMALL ?= data/models/small-sparse
DENSE ?= data/models/small-dense
RESULTS ?= results
BRIDGE ?= data/models/small-bridge
# the bridged pair: a 2-layer dense partner, and a sparse model trained from scratch with its bridges
BRIDGED_DENSE ?= data/models/bridged-dense
BRIDGED ?= data/models/bridged-small
CIRCUITS = $(RESULTS)/circuits/small-sparse
DENSE_CIRCUITS = $(RESULTS)/circuits/small-dense
# the pruner before the penalty multiplier and the CSR products, which prune_speed.txt is timed against
PRUNE_BASELINE := bb63d53
VALID = $(RESULTS)/validation/small-sparse
# edge circuits (cspkit prune --edges) in a folder of their own: the explorer keys circuits by task and target
EDGES = $(RESULTS)/circuits/small-sparse-edges
VALID_EDGES = $(RESULTS)/validation/small-sparse-edges

# stdout to a file, written only when the command succeeds
save = > $(1).tmp && mv $(1).tmp $(1)

# on idle cores: the step-time ratio (and what the attention sink adds), as text and JSON from one run
bench: $(VENV)/.installed
	$(PY) bench/train_overhead.py --variant sink=true --out results/train_overhead.json $(call save,results/train_overhead.txt)

# results/frontier.json and .png: every task pruned with two seeds on the shipped small pair and
# the paper-shaped models (default PruneConfig; hours on 2 cores, minutes on a GPU), then merged
DEVICE ?= $(shell $(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
JOBS ?= 2
frontier: $(VENV)/.installed paper-models $(RESULTS)/sparse_vs_dense.json $(RESULTS)/sweep_paper.json
	$(CS) sweep --models data/models/paper-e1-sparser data/models/paper-e2-sparse --tasks all --seeds 0 1 \
		--jobs $(JOBS) --device $(DEVICE) --out $(RESULTS)/sweep_paper.json
	$(CS) sweep-merge $(RESULTS)/sparse_vs_dense.json results/sweep_paper.json \
		--out $(RESULTS)/frontier.json --plot $(RESULTS)/frontier.png

# The small pair's sweep with the default PruneConfig alone (no per-task search), with the
# controls of two tasks' circuits; and the hour model's. A sweep writes its file after every run
# and resumes from it, so a stopped sweep leaves a file that is there but not complete: these
# targets always run the sweep, which does nothing (and leaves the file as it is) once complete.
FORCE:
.PHONY: FORCE
$(RESULTS)/sparse_vs_dense.json: FORCE | $(VENV)/.installed
	$(CS) sweep --models $(SMALL) $(DENSE) --tasks all --seeds 0 1 --jobs $(JOBS) \
		--out $(RESULTS)/sparse_vs_dense.json --controls single_double_quote
$(RESULTS)/sweep_small_hour.json: FORCE | $(VENV)/.installed
	$(CS) sweep --models data/models/small-hour --tasks all --seeds 0 1 --jobs $(JOBS) --out $@
# the paper-e1 pair (about 50 minutes on 2 cores); `make frontier` adds the other paper-shaped models
$(RESULTS)/sweep_paper.json: FORCE paper-models | $(VENV)/.installed
	$(CS) sweep --models data/models/paper-e1-sparse data/models/paper-e1-dense --tasks all --seeds 0 1 \
		--jobs $(JOBS) --device $(DEVICE) --out $@
# paper-e1-sparse's lambda_func, whose circuits under the default are several times the fixed
# penalty's: the task under other penalty schedules, and the default's and the fixed penalty's
# masks step by step (docs/results.md, "Sparse against dense"); on the CPU, as committed: the CSR
# products there round differently from a GPU's, and this model's AbsTopK feels it (docs/results.md, "Speed")
LAMBDA := $(RESULTS)/lambda_func_penalties
# every schedule but the default's (retry) is measured alone, without the retry after an overshoot
ONE_RUN := --set retry_penalty=null
FIXED := $(ONE_RUN) --set penalty_start=1 --set penalty_rate=0 --set steps=100 --set extra_steps=0
lambda_sets_fixed := $(FIXED) --set calibrate_masks=false
lambda_sets_fixed_calibrated := $(FIXED)
lambda_sets_raw := $(ONE_RUN) --set calibrate_masks=false
lambda_sets_ceiling1 := $(ONE_RUN) --set penalty_max=1
lambda_sets_steps140 := $(ONE_RUN) --set steps=140 --set extra_steps=0
lambda_sets_retry := --set retry_penalty=1
LAMBDA_RUNS := fixed fixed_calibrated raw ceiling1 steps140 retry
lambda-penalties: $(LAMBDA_RUNS:%=$(LAMBDA)/%.json) $(LAMBDA)/masks.txt
$(LAMBDA)/%.json: FORCE paper-models | $(VENV)/.installed
	@mkdir -p $(LAMBDA)
	$(CS) sweep --models data/models/paper-e1-sparse --tasks lambda_func --seeds 0 1 --jobs $(JOBS) \
		--device cpu $(lambda_sets_$*) --out $@
$(LAMBDA)/masks.txt: paper-models | $(VENV)/.installed
	@mkdir -p $(LAMBDA)
	( $(PY) bench/mask_diagnosis.py --model data/models/paper-e1-sparse --task lambda_func --every 5 && \
	  $(PY) bench/mask_diagnosis.py --model data/models/paper-e1-sparse --task lambda_func --every 10 \
		$(lambda_sets_fixed) ) $(call save,$@)
# how far pruning's CSR products move each sparse model's outputs from the dense products
$(RESULTS)/csr_agreement.txt: paper-models | $(VENV)/.installed
	$(PY) bench/csr_agreement.py --models $(SMALL) data/models/small-hour data/models/paper-e1-sparse \
		data/models/paper-e1-sparser data/models/paper-e2-sparse $(call save,$@)
# the masks against the circuits, and the loss along the ranking (docs/method.md, "Penalty")
$(RESULTS)/prune_ranking.txt: | $(VENV)/.installed
	$(PY) bench/prune_ranking.py --models $(SMALL) $(DENSE) --seeds 0 $(call save,$@)

# Everything in results/ measured on the shipped small pair: task scores, circuits and their
# validation, the pruning bench, the bridge and its steering, and the sparse-vs-dense sweep
# (on 2 CPU cores the sweep's 80 prunings and its controls take about 50 minutes; the bridge 5).
# Each result is a file target, so make builds only what is missing:
# a run stopped part-way carries on with the same command (the sweep from its
# results file, the bridge from its checkpoint). The variables at the top measure another
# pair into other folders, as the shipped pair was measured beside the first one before it
# replaced it. After replacing a model, delete what was built on it first: circuit, bridge and
# sweep files name the weights they belong to.
# what needs only the two models, and then the bridge between them and its steering
small-results: small-model-results small-bridge-results
small-model-results: $(RESULTS)/task_scores.txt $(RESULTS)/task_scores.json \
	$(VALID)_single_double_quote.txt $(VALID)_bracket_counting.txt $(VALID)_indent_for.txt \
	$(RESULTS)/prune_speed.txt $(RESULTS)/prune_ranking.txt $(RESULTS)/sparse_vs_dense.json \
	$(RESULTS)/sweep_small_hour.json $(EDGES)/single_double_quote.json $(EDGES)/bracket_counting.json \
	$(VALID_EDGES)_single_double_quote.txt $(VALID_EDGES)_bracket_counting.txt $(RESULTS)/edge_elimination.txt \
	$(DENSE_CIRCUITS)/single_double_quote.json
small-bridge-results: $(RESULTS)/bridge_quality.txt $(RESULTS)/intervene_quote.txt $(RESULTS)/intervene_quote_site.txt

$(RESULTS)/task_scores.txt $(RESULTS)/task_scores.json: | $(VENV)/.installed
	@mkdir -p $(@D)
	$(CS) eval --model $(SMALL) --model $(DENSE) --task all $(if $(filter %.json,$@),--json) $(call save,$@)
# a circuit is a result, not an intermediate file to delete once its validation is made
.PRECIOUS: $(CIRCUITS)/%.json
$(CIRCUITS)/%.json: | $(VENV)/.installed
	$(CS) prune --model $(SMALL) --task $* --out $@
$(VALID)_single_double_quote.txt $(VALID)_bracket_counting.txt: $(VALID)_%.txt: $(CIRCUITS)/%.json
	@mkdir -p $(@D)
	$(CS) validate --circuit $< --out $(@:.txt=.json) $(call save,$@)
# the dense model's quote circuit, which the explorer (notebook 05) draws beside the sparse one's
.PRECIOUS: $(DENSE_CIRCUITS)/%.json
$(DENSE_CIRCUITS)/%.json: | $(VENV)/.installed
	$(CS) prune --model $(DENSE) --task $* --out $@
.PRECIOUS: $(EDGES)/%.json
$(EDGES)/%.json: | $(VENV)/.installed
	$(CS) prune --model $(SMALL) --task $* --edges --out $@
# how far measured greedy removal gets the edge circuits, against the masks (docs/results.md, "Edge circuits")
$(RESULTS)/edge_elimination.txt: $(EDGES)/single_double_quote.json $(EDGES)/bracket_counting.json
	$(PY) bench/edge_elimination.py $^ $(call save,$@)
$(VALID_EDGES)_%.txt: $(EDGES)/%.json
	@mkdir -p $(@D)
	$(CS) validate --circuit $< --no-prune-controls --out $(@:.txt=.json) $(call save,$@)
$(VALID)_indent_for.txt: $(CIRCUITS)/indent_for.json
	@mkdir -p $(@D)
	$(CS) validate --circuit $< --no-prune-controls --out $(@:.txt=.json) $(call save,$@)
$(RESULTS)/prune_speed.txt: | $(VENV)/.installed
	$(PY) bench/prune_speed.py --model $(SMALL) --baseline $(PRUNE_BASELINE) --repeats 2 $(call save,$@)
$(RESULTS)/bridge_quality.txt: | $(VENV)/.installed
	$(CS) bridge --dense $(DENSE) --sparse $(SMALL) --out $(BRIDGE) --profile small
	$(CS) bridge-report --bridge $(BRIDGE) --out $@
# the bridged pair (docs/models.md): hours on 2 CPU cores; `BRIDGE_DEVICE=cuda` on a GPU. Both resume.
BRIDGE_DEVICE ?= auto
$(BRIDGED_DENSE)/model.safetensors: | $(VENV)/.installed
	$(CS) train --profile small-hour --dense --out $(BRIDGED_DENSE) d_model=256 d_mlp=1024 n_head=16 \
		stop_at_val_loss=2.663 device=$(BRIDGE_DEVICE)
$(BRIDGED)/bridge.safetensors: $(BRIDGED_DENSE)/model.safetensors
	$(CS) bridge --dense $(BRIDGED_DENSE) --out $(BRIDGED) --profile bridged-small train.device=$(BRIDGE_DEVICE)
# the bridged pair's quality per site, its sparse model's circuits, and steering through them
# (strength 0 to 1 the paper's range, 2 and 4 extrapolation)
BRIDGED_CIRCUITS = $(RESULTS)/circuits/bridged-small
STRENGTHS = 0.25 0.5 0.75 1 2 4
bridged-results: $(RESULTS)/bridged_quality.txt $(RESULTS)/bridged_task_scores.txt \
	$(RESULTS)/intervene_bridged_quote.txt $(RESULTS)/intervene_bridged_while.txt \
	$(RESULTS)/intervene_bridged_quote_site.txt $(RESULTS)/intervene_bridged_while_site.txt \
	$(RESULTS)/intervene_bridged_quote_layer1.txt
$(RESULTS)/bridged_task_scores.txt: $(BRIDGED)/bridge.safetensors
	$(CS) eval --model $(BRIDGED)/sparse --model $(BRIDGED_DENSE) --task all $(call save,$@)
$(RESULTS)/bridged_quality.txt: $(BRIDGED)/bridge.safetensors
	$(CS) bridge-report --bridge $(BRIDGED) --out $@
$(BRIDGED_CIRCUITS)/%.json: $(BRIDGED)/bridge.safetensors
	$(CS) prune --model $(BRIDGED)/sparse --task $* --out $@
$(RESULTS)/intervene_bridged_quote.txt: $(BRIDGED_CIRCUITS)/single_double_quote.json
	$(CS) intervene --bridge $(BRIDGED) --node auto --task single_double_quote --circuit $< \
		--strength $(STRENGTHS) --out $(@:.txt=.json) $(call save,$@)
$(RESULTS)/intervene_bridged_while.txt: $(BRIDGED_CIRCUITS)/while_return_true.json
	$(CS) intervene --bridge $(BRIDGED) --node auto --task while_return_true --circuit $< \
		--strength $(STRENGTHS) --out $(@:.txt=.json) $(call save,$@)
# all of the circuit's reads at the auto channel's site together, each by its own class difference
BRIDGED_TASK_quote := single_double_quote
BRIDGED_TASK_while := while_return_true
$(RESULTS)/intervene_bridged_%_site.txt: $(RESULTS)/intervene_bridged_%.txt
	$(CS) intervene --bridge $(BRIDGED) --node auto --site-channels --task $(BRIDGED_TASK_$*) \
		--circuit $(BRIDGED_CIRCUITS)/$(BRIDGED_TASK_$*).json \
		--strength $(STRENGTHS) --out $(@:.txt=.json) $(call save,$@)
# at the last attention layer's input, where the paper steers: the channels of 1.attn.in that best
# separate the classes at the opening quote and at the last token (bridges.pick_channel over all 384)
$(RESULTS)/intervene_bridged_quote_layer1.txt: $(BRIDGED)/bridge.safetensors
	( $(CS) intervene --bridge $(BRIDGED) --node '1.attn.in[308]' --at diff --task single_double_quote \
		--strength $(STRENGTHS) && \
	  $(CS) intervene --bridge $(BRIDGED) --node '1.attn.in[164]' --at last --task single_double_quote \
		--strength $(STRENGTHS) ) $(call save,$@)
# the bridge's steering was measured on the quote circuit found with the fixed penalty
STEER_CIRCUIT = results/history/fixed_penalty/circuits/small-sparse/single_double_quote.json
$(RESULTS)/intervene_quote.txt: $(RESULTS)/bridge_quality.txt $(STEER_CIRCUIT)
	$(CS) intervene --bridge $(BRIDGE) --node auto --task single_double_quote \
		--circuit $(STEER_CIRCUIT) --out $(@:.txt=.json) $(call save,$@)
$(RESULTS)/intervene_quote_site.txt: $(RESULTS)/bridge_quality.txt $(STEER_CIRCUIT)
	$(CS) intervene --bridge $(BRIDGE) --node auto --task single_double_quote --site-channels \
		--strength 0.25 0.5 1 2 4 --circuit $(STEER_CIRCUIT) --out $(@:.txt=.json) \
		$(call save,$@)

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
