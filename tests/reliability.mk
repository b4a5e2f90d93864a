# The reliability suite: soak, faults, no output lost (tests/privileged/test_reliability_*.py, root).
#   make reliability   # the CI budget (100 cycles, 50 runs of 1 MiB, a 30 s flood)
#   make soak          # the full budget (1,000 cycles, 1,000 runs); override the variables below
SOAK_CYCLES ?= 1000
SOAK_OUTPUT_RUNS ?= 1000
SOAK_FLOOD_SECONDS ?= 30
SOAK_TIMEOUT ?= 7200
RELIABILITY_TESTS := $(wildcard tests/privileged/test_reliability_*.py)

.PHONY: reliability soak

reliability: $(VENV)/.stamp
	$(VENV)/bin/pytest -q $(RELIABILITY_TESTS)

soak: $(VENV)/.stamp
	KATA_SOAK_CYCLES=$(SOAK_CYCLES) KATA_OUTPUT_RUNS=$(SOAK_OUTPUT_RUNS) \
	KATA_FLOOD_SECONDS=$(SOAK_FLOOD_SECONDS) \
	$(VENV)/bin/pytest -q -o timeout=$(SOAK_TIMEOUT) $(RELIABILITY_TESTS)
