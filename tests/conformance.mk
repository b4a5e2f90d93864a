# OCI runtime-tools validation suite (tests/conformance/README.md).
#   make conformance                    # against kata-oci, enforcing kata-oci-passing.txt
#   make conformance RUNTIME=runc       # any runc-compatible runtime; PROGRAMS="create kill" for a subset
#   make conformance-baseline           # rewrite tests/conformance/runc-baseline.json from runc
#   make conformance-fixture RUNTIME=.. # the harness's own two-program suite
CONFORMANCE_DIR := tests/conformance
RUNTIME ?= kata-oci
PROGRAMS ?=
CONFORMANCE_TIMEOUT ?= 60
CONFORMANCE_BUDGET ?= 600
CONFORMANCE_ARGS = --timeout $(CONFORMANCE_TIMEOUT) --budget $(CONFORMANCE_BUDGET) \
	$(if $(filter kata-oci,$(RUNTIME)),--require $(CONFORMANCE_DIR)/kata-oci-passing.txt) \
	$(if $(wildcard $(CONFORMANCE_DIR)/runc-baseline.json),--compare $(CONFORMANCE_DIR)/runc-baseline.json)

.PHONY: conformance conformance-baseline conformance-fixture

conformance: $(VENV)/.stamp
	$(CONFORMANCE_DIR)/run-validation.sh $(CONFORMANCE_ARGS) $(RUNTIME) $(PROGRAMS)

conformance-baseline:
	$(CONFORMANCE_DIR)/run-validation.sh --timeout $(CONFORMANCE_TIMEOUT) --budget 1800 \
		--json $(CONFORMANCE_DIR)/runc-baseline.json runc

conformance-fixture: $(VENV)/.stamp
	$(CONFORMANCE_DIR)/run-validation.sh --fixture $(CONFORMANCE_ARGS) $(RUNTIME)
