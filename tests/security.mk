# The security suite: fuzzing, escape tests and the policy (tests/security/README.md).
#   make security            # hypothesis fuzzing + policy (unit) and escape tests (root)
#   make fuzz                # atheris on the yamux session for FUZZ_SECONDS (optional tool)
FUZZ_SECONDS ?= 60
FUZZ_DIR ?= build/fuzz
SECURITY_TESTS := tests/unit/test_fuzz_yamux.py tests/unit/test_fuzz_rpc.py \
	tests/unit/test_policy.py $(wildcard tests/privileged/test_escape_*.py)

.PHONY: security fuzz

security: $(VENV)/.stamp
	$(VENV)/bin/pytest -q $(SECURITY_TESTS)

# atheris is not a project dependency: CI runs the hypothesis suites above instead.
fuzz: $(VENV)/.stamp
	@$(PY) -c 'import atheris' 2>/dev/null || { \
		echo "make fuzz needs atheris: $(VENV)/bin/pip install atheris"; exit 1; }
	mkdir -p $(FUZZ_DIR)/yamux-corpus $(FUZZ_DIR)/yamux-crashes
	$(PY) tests/security/fuzz_yamux.py --write-seeds $(FUZZ_DIR)/yamux-corpus
	$(PY) tests/security/fuzz_yamux.py -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
		-rss_limit_mb=2048 -max_len=65536 -artifact_prefix=$(FUZZ_DIR)/yamux-crashes/ \
		$(FUZZ_DIR)/yamux-corpus
