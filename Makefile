# Two commands for a fresh clone, no download and no GPU needed:
#   make demo   render a synthetic scene, train a CPU-sized DeepVoxels on it, test it, print PSNR/SSIM
#   make test   run the test suite
# Both create .venv (python3 -m venv) the first time and install requirements.txt into it; `make test` also
# installs requirements-dev.txt (the test tools).

SHELL := /bin/bash
# -e: stop at the first failing command; pipefail: a failing program is not hidden by `| tee`.
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Written after a successful install; newer than the requirements file(s) means there is nothing to do.
INSTALLED := $(VENV)/.installed
INSTALLED_DEV := $(VENV)/.installed-dev

# The demo scene. The dataset generator's flags live here, not in configs/demo.yaml, because
# run_deepvoxels.py rejects flags it does not know.
DEMO_OBJECT := cube
DEMO_DATA := data/demo
DEMO_LOGS := logs/demo
DEMO_CONFIG := configs/demo.yaml
# 128 px: the smallest side the networks accept (64 * 2^k, k >= 1).
DEMO_RESOLUTION := 128
# The generator's default: enough viewpoints around the cube for the test spiral's novel views.
DEMO_NUM_TRAIN := 50
# Only rendered at the end of training; it does not change what is learned.
DEMO_NUM_VAL := 10
# Written when the whole dataset is on disk, so an interrupted render is redone rather than reused.
DEMO_STAMP := $(DEMO_DATA)/.complete
# Extra run_deepvoxels.py flags; they win over the config, e.g. make demo DEMO_FLAGS="--device cuda".
DEMO_FLAGS ?=

.PHONY: help install demo test clean

help:
	@echo "make demo    train and test DeepVoxels on a synthetic scene (CPU; time and score: docs/performance.md)"
	@echo "make test    run the test suite"
	@echo "make clean   remove $(DEMO_DATA) and $(DEMO_LOGS)"

$(PY):
	$(PYTHON) -m venv $(VENV)

# pip byte-compiles what it installs one file at a time; compileall does the same on every core. Like pip, it
# leaves alone the few files that are not this Python's syntax (a test helper in torch), so its status is ignored.
PIP_INSTALL := $(VENV)/bin/pip install --disable-pip-version-check --no-compile
COMPILE := $(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null 2>&1 || true

$(INSTALLED): requirements.txt | $(PY)
	$(PIP_INSTALL) -r requirements.txt
	$(COMPILE)
	touch $@

# requirements-dev.txt includes requirements.txt, so a change to either reinstalls.
$(INSTALLED_DEV): requirements-dev.txt requirements.txt | $(PY)
	$(PIP_INSTALL) -r requirements-dev.txt
	$(COMPILE)
	touch $@

install: $(INSTALLED)

$(DEMO_STAMP): $(INSTALLED)
	rm -rf $(DEMO_DATA)
	$(PY) -m tools.dataset synthetic --out $(DEMO_DATA) --object $(DEMO_OBJECT) --resolution $(DEMO_RESOLUTION) \
		--num_train $(DEMO_NUM_TRAIN) --num_val $(DEMO_NUM_VAL) --seed 0
	touch $@

# The closing lines of `make demo`: the test scores and where the renders are, from test mode's metrics.json.
DEMO_SUMMARY := import json, sys; m = json.load(open(sys.argv[1])); \
	print("\nPSNR %.2f dB  SSIM %.4f  over %d test views\nrenders: %s" % (m["psnr"], m["ssim"], m["num_views"], m["out_dir"]))

# Each run trains from scratch into a new timestamped folder; its path is taken from the line training
# prints last ("checkpoints and logs: DIR"), and the test renders' folder from test mode's "renders: DIR".
# Test mode renders the run's best.pth, the checkpoint that scored best on the validation views.
demo: $(DEMO_STAMP)
	mkdir -p $(DEMO_LOGS)
	$(PY) run_deepvoxels.py --config $(DEMO_CONFIG) --train_test train \
		--data_root $(DEMO_DATA)/train/$(DEMO_OBJECT) --logging_root $(DEMO_LOGS) $(DEMO_FLAGS) \
		| tee $(DEMO_LOGS)/train.out
	run_dir=$$(sed -n 's/^checkpoints and logs: //p' $(DEMO_LOGS)/train.out | tail -n 1); \
	checkpoint=$$($(PY) -c 'import sys, checkpoints; print(checkpoints.best_or_newest_in_run(sys.argv[1]))' "$$run_dir"); \
	echo "testing $$checkpoint"; \
	$(PY) run_deepvoxels.py --config $(DEMO_CONFIG) --train_test test \
		--data_root $(DEMO_DATA)/test/$(DEMO_OBJECT) --logging_root $(DEMO_LOGS) --checkpoint "$$checkpoint" \
		$(DEMO_FLAGS) | tee $(DEMO_LOGS)/test.out
	@renders=$$(sed -n 's/^renders: \([^ ]*\) .*/\1/p' $(DEMO_LOGS)/test.out | tail -n 1); \
	$(PY) -c '$(DEMO_SUMMARY)' "$$renders/metrics.json"

test: $(INSTALLED_DEV)
	$(PY) -m pytest -q

clean:
	rm -rf $(DEMO_DATA) $(DEMO_LOGS)
