# make test          the whole suite (real tmux, stand-in agents), in a local virtualenv
# make test-pythons  the command-line tests once per Python interpreter found (3.6+)
# make e2e           end-to-end tests against every Claude Code, Codex CLI, Gemini CLI,
#                    OpenCode and Copilot CLI version of the matrix
#                    (make e2e CLAUDE_CODE_VERSIONS=x.y.z tests another one)
# make bench         timings at 10, 100 and 300 stand-in agents (--cmd and claude-path) against the floor,
#                    over ssh against `ssh HOST true`, and resume --all after a reboot against
#                    a loop of resume NAME, and how soon spawn returns at each CLI's first-run
#                    screen (`python3 test_orch.py bench first` alone; the real CLIs with
#                    ORCH_E2E_CLAUDE, ORCH_E2E_CODEX, ORCH_E2E_GEMINI), and what notifications
#                    cost a hook and how soon they arrive (`bench notify`)

PYTHON ?= python3
VENV := .venv
# The Claude Code versions orch is tested against: the oldest supported, the one
# whose changes orch was adapted to, and the newest.
CLAUDE_CODE_VERSIONS ?= 2.1.197 2.1.330 2.1.332
E2E_DIR := .e2e
claude_bin = $(E2E_DIR)/$(1)/node_modules/@anthropic-ai/claude-code/bin/claude.exe
CLAUDE_BINS := $(foreach v,$(CLAUDE_CODE_VERSIONS),$(call claude_bin,$(v)))
# The Codex CLI versions orch is tested against.
CODEX_VERSIONS ?= 0.169.0 0.171.0
codex_bin = $(E2E_DIR)/codex-$(1)/node_modules/.bin/codex
CODEX_BINS := $(foreach v,$(CODEX_VERSIONS),$(call codex_bin,$(v)))
# The Gemini CLI versions orch is tested against.
GEMINI_VERSIONS ?= 0.61.0
gemini_bin = $(E2E_DIR)/gemini-$(1)/node_modules/.bin/gemini
GEMINI_BINS := $(foreach v,$(GEMINI_VERSIONS),$(call gemini_bin,$(v)))
# The OpenCode versions orch is tested against.
OPENCODE_VERSIONS ?= 1.18.33
opencode_bin = $(E2E_DIR)/opencode-$(1)/node_modules/.bin/opencode
OPENCODE_BINS := $(foreach v,$(OPENCODE_VERSIONS),$(call opencode_bin,$(v)))
# The Copilot CLI versions orch is tested against.
COPILOT_VERSIONS ?= 1.0.102
copilot_bin = $(E2E_DIR)/copilot-$(1)/node_modules/.bin/copilot
COPILOT_BINS := $(foreach v,$(COPILOT_VERSIONS),$(call copilot_bin,$(v)))

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

# Each version in its own folder: .e2e/<version>/node_modules/...
$(E2E_DIR)/%/node_modules/@anthropic-ai/claude-code/bin/claude.exe:
	@command -v npm >/dev/null || { echo "make e2e: npm is needed to install Claude Code"; exit 1; }
	npm install --silent --no-audit --no-fund --prefix $(E2E_DIR)/$* @anthropic-ai/claude-code@$* \
	  || { echo "make e2e: could not install @anthropic-ai/claude-code@$*"; exit 1; }
	@test -x $@ || { echo "make e2e: $@ missing after install"; exit 1; }

$(E2E_DIR)/codex-%/node_modules/.bin/codex:
	@command -v npm >/dev/null || { echo "make e2e: npm is needed to install the Codex CLI"; exit 1; }
	npm install --silent --no-audit --no-fund --prefix $(E2E_DIR)/codex-$* @openai/codex@$* \
	  || { echo "make e2e: could not install @openai/codex@$*"; exit 1; }
	@test -x $@ || { echo "make e2e: $@ missing after install"; exit 1; }

$(E2E_DIR)/gemini-%/node_modules/.bin/gemini:
	@command -v npm >/dev/null || { echo "make e2e: npm is needed to install the Gemini CLI"; exit 1; }
	npm install --silent --no-audit --no-fund --prefix $(E2E_DIR)/gemini-$* @google/gemini-cli@$* \
	  || { echo "make e2e: could not install @google/gemini-cli@$*"; exit 1; }
	@test -x $@ || { echo "make e2e: $@ missing after install"; exit 1; }

$(E2E_DIR)/opencode-%/node_modules/.bin/opencode:
	@command -v npm >/dev/null || { echo "make e2e: npm is needed to install OpenCode"; exit 1; }
	npm install --silent --no-audit --no-fund --prefix $(E2E_DIR)/opencode-$* opencode-ai@$* \
	  || { echo "make e2e: could not install opencode-ai@$*"; exit 1; }
	@test -x $@ || { echo "make e2e: $@ missing after install"; exit 1; }

$(E2E_DIR)/copilot-%/node_modules/.bin/copilot:
	@command -v npm >/dev/null || { echo "make e2e: npm is needed to install the Copilot CLI"; exit 1; }
	npm install --silent --no-audit --no-fund --prefix $(E2E_DIR)/copilot-$* @github/copilot@$* \
	  || { echo "make e2e: could not install @github/copilot@$*"; exit 1; }
	@test -x $@ || { echo "make e2e: $@ missing after install"; exit 1; }

e2e: $(VENV)/bin/pytest $(CLAUDE_BINS) $(CODEX_BINS) $(GEMINI_BINS) $(OPENCODE_BINS) $(COPILOT_BINS)
	@failed=""; for v in $(COPILOT_VERSIONS); do \
	  echo "== end-to-end tests with Copilot CLI $$v"; \
	  ORCH_E2E_COPILOT=$(abspath $(call copilot_bin,$$v)) \
	    $(VENV)/bin/pytest -q -k test_e2e_copilot_ test_orch.py || failed="$$failed copilot-$$v"; \
	done; \
	for v in $(OPENCODE_VERSIONS); do \
	  echo "== end-to-end tests with OpenCode $$v"; \
	  ORCH_E2E_OPENCODE=$(abspath $(call opencode_bin,$$v)) \
	    $(VENV)/bin/pytest -q -k test_e2e_opencode_ test_orch.py || failed="$$failed opencode-$$v"; \
	done; \
	for v in $(CODEX_VERSIONS); do \
	  echo "== end-to-end tests with Codex CLI $$v"; \
	  ORCH_E2E_CODEX=$(abspath $(call codex_bin,$$v)) \
	    $(VENV)/bin/pytest -q -k test_e2e_codex_ test_orch.py || failed="$$failed codex-$$v"; \
	done; \
	for v in $(GEMINI_VERSIONS); do \
	  echo "== end-to-end tests with Gemini CLI $$v"; \
	  ORCH_E2E_GEMINI=$(abspath $(call gemini_bin,$$v)) \
	    $(VENV)/bin/pytest -q -k test_e2e_gemini_ test_orch.py || failed="$$failed gemini-$$v"; \
	done; \
	for v in $(CLAUDE_CODE_VERSIONS); do \
	  echo "== end-to-end tests with Claude Code $$v"; \
	  ORCH_E2E_CLAUDE=$(abspath $(call claude_bin,$$v)) \
	  ORCH_E2E_CLAUDE_OLDEST=$(abspath $(call claude_bin,$(firstword $(CLAUDE_CODE_VERSIONS)))) \
	    $(VENV)/bin/pytest -q -k "test_e2e_ and not test_e2e_codex_ and not test_e2e_gemini_ and not test_e2e_opencode_ \
	      and not test_e2e_copilot_" \
	    test_orch.py \
	    || failed="$$failed $$v"; \
	done; \
	if [ -n "$$failed" ]; then echo "make e2e: failed with$$failed"; exit 1; fi; \
	echo "make e2e: passed with Copilot CLI $(COPILOT_VERSIONS), OpenCode $(OPENCODE_VERSIONS)," \
	  "Codex CLI $(CODEX_VERSIONS)," \
	  "Gemini CLI $(GEMINI_VERSIONS)," \
	  "Claude Code $(CLAUDE_CODE_VERSIONS)"

bench: $(VENV)/bin/pytest
	$(VENV)/bin/python test_orch.py bench

clean:
	rm -rf $(VENV) $(E2E_DIR) .pytest_cache __pycache__
