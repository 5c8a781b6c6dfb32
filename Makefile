# sparse-pretrain: the commands of the README.
PY ?= .venv/bin/python
TORCH_SPEC ?= torch==2.13.0
METHOD ?= dense
CONFIG ?= configs/gpt2.toml
SHARED ?= ../shared/data

.PHONY: setup demo test test-gpu test-all lint format bench bench-wholerun bench-cpu plot reproduce-small report clean

setup:  ## virtualenv + pinned requirements (TORCH_SPEC=torch==2.11.0 for a CUDA machine, say)
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt

tokens/stdlib-byte/meta.json:
	$(PY) -m data.prepare stdlib --out tokens/stdlib-byte --tokenizer byte --val-fraction 0.02

demo: tokens/stdlib-byte/meta.json  ## the built-in default: a small GPT on the stdlib's source, CPU, offline, < 3 min
	$(PY) train.py --config configs/demo.toml --method $(METHOD) --out-dir out/demo-$(METHOD) --overwrite

	$(PY) -m tools.plot out/demo-$(METHOD)
	$(PY) sample.py --ckpt out/demo-$(METHOD) --prompt "def " --max-new-tokens 120

test:  ## CPU test suite (GPU tests are skipped without CUDA)
	$(PY) -m pytest

test-gpu:  ## only the GPU tests (kernels vs references on CUDA)
	$(PY) -m pytest -m gpu

lint:
	$(PY) -m ruff check .

format:
	$(PY) -m ruff format .

bench:  ## every method against dense on the GPU, plus kernel micro-benchmarks -> results/
	$(PY) bench.py --config $(CONFIG) --methods dense,mst,rigl,static,2of4,sat --set train.batch_size=16 \
		--set train.grad_accum=1 --kernels all

# 98M tokens of GPT-2 124M either way; ACCUM=1 STEPS=6000 is the earlier runs' shape (an optimizer step per 16k tokens)
ACCUM ?= 8
STEPS ?= 750
bench-wholerun:  ## block MST's whole schedule against dense, every step timed, compile included (~7 min on an H200)
	$(PY) bench.py --config configs/gpt2.toml --methods dense,mst --whole-run --set mst.granularity=block \
		--set train.compile_mode=reduce-overhead --set train.batch_size=16 --set train.grad_accum=$(ACCUM) \
		--set train.steps=$(STEPS)

bench-cpu:  ## the same code on a tiny CPU config (no speed claims)
	$(PY) bench.py --methods dense,mst,2of4,sat --steps 3 --warmup 1 --set model.preset=tiny \
		--set model.block_size=64 --set model.vocab_size=256 --set train.batch_size=4 --set train.device=cpu \
		--out out/bench-cpu

clean:
	rm -rf out

# --- reproduce-small (tools/reproduce.py): the papers' GPT-2 experiments scaled to ~25 min of one GPU ----------
# ENWIKI: the pretraining corpus (a data.prepare source); EVAL_DATA: eval.py's --data-dir (wikitext/, ptb/,
# lambada/, tiktoken/); ONLY: a subset of configs/small/*.toml, e.g. ONLY=dense,mst.
ENWIKI ?= $(SHARED)/pretrain/enwiki_pages
EVAL_DATA ?= $(SHARED)
SMALL_TOKENS ?= tokens/enwiki-30m
ONLY ?=
.PHONY: reproduce-small-cpu

$(SMALL_TOKENS)/meta.json:
	TIKTOKEN_CACHE_DIR=$${TIKTOKEN_CACHE_DIR:-$(EVAL_DATA)/tiktoken} $(PY) -m data.prepare $(ENWIKI) \
		--out $(SMALL_TOKENS) --max-tokens 30000000

reproduce-small: $(SMALL_TOKENS)/meta.json  ## every configs/small run (finished ones skipped), then the report
	$(PY) -m tools.reproduce run --data-dir $(SMALL_TOKENS) --eval-data $(EVAL_DATA) $(if $(ONLY),--only $(ONLY))
	$(PY) -m tools.reproduce report

reproduce-small-cpu: tokens/stdlib-byte/meta.json  ## the same pipeline, micro scale on the CPU (1-2 min)
	$(PY) -m tools.reproduce run --micro --scale 0.01 --device cpu --only dense,mst,2of4,sat \
		--data-dir tokens/stdlib-byte --eval-data $(EVAL_DATA) --eval-limit 20 --out-root out/reproduce-small-cpu
	$(PY) -m tools.reproduce report --out-root out/reproduce-small-cpu --dest out/reproduce-small-cpu/report

report:  ## regenerate results/reproduce-small/REPORT.md and its PNGs from out/reproduce-small
	$(PY) -m tools.reproduce report
