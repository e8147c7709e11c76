# make test          the whole suite (real tmux, stand-in agents), in a local virtualenv
# make test-pythons  the command-line tests once per Python interpreter found (3.6+)
# make e2e           end-to-end tests against the real Claude Code CLI (installed locally)
# make bench         timings at 10, 100 and 300 stand-in agents against the floor

PYTHON ?= python3
VENV := .venv
CLAUDE_CODE_VERSION := 2.1.197
E2E_DIR := .e2e
CLAUDE_BIN := $(E2E_DIR)/node_modules/@anthropic-ai/claude-code/bin/claude.exe

.PHONY: test test-pythons e2e bench clean

$(VENV)/bin/pytest:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet pytest

test: $(VENV)/bin/pytest
	$(VENV)/bin/pytest -q -k "not test_e2e_" test_orch.py

test-pythons: $(VENV)/bin/pytest
	@seen=""; for py in $$(ls -d $$(pyenv root 2>/dev/null)/versions/3.*/bin/python3 2>/dev/null) \
	    $$(command -v python3 python3.6 python3.7 python3.8 python3.9 python3.10 python3.11 python3.12 python3.13 2>/dev/null); do \
	  v=$$($$py -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || continue; \
	  case " $$seen " in *" $$v "*) continue;; esac; seen="$$seen $$v"; \
	  echo "== command-line tests with Python $$v ($$py)"; \
	  ORCH_TEST_PYTHON=$$py $(VENV)/bin/pytest -q -k test_cli_ test_orch.py || exit 1; \
	done; echo "tested with Python:$$seen"; [ -n "$$seen" ]

$(CLAUDE_BIN):
	@command -v npm >/dev/null || { echo "make e2e: npm is needed to install Claude Code"; exit 1; }
	npm install --silent --no-audit --no-fund --prefix $(E2E_DIR) @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION) \
	  || { echo "make e2e: could not install @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)"; exit 1; }
	@test -x $(CLAUDE_BIN) || { echo "make e2e: $(CLAUDE_BIN) missing after install"; exit 1; }

e2e: $(VENV)/bin/pytest $(CLAUDE_BIN)
	ORCH_E2E_CLAUDE=$(abspath $(CLAUDE_BIN)) $(VENV)/bin/pytest -q -k test_e2e_ test_orch.py

bench: $(VENV)/bin/pytest
	$(VENV)/bin/python test_orch.py bench

clean:
	rm -rf $(VENV) $(E2E_DIR) .pytest_cache __pycache__
