# Benchmarks: printed tables and bench/results/latest.json, never assertions.
# `make bench` keeps the last run as bench/results/previous.json, runs every bench, then
# prints every figure with its goal, its ratio to peers measured in the same run, and its
# change against the previous run. A single bench-* target merges into latest.json.
.PHONY: bench bench-agent bench-yamux bench-yamux-table bench-oci bench-image bench-show
BENCH_IMAGE_ARCH ?= x86_64
bench: $(VENV)/.stamp
	$(PY) bench/report.py begin
	$(PY) bench/yamux_figures.py
	$(PY) bench/agent_bench.py
	$(PY) bench/oci_bench.py
	$(PY) bench/image_bench.py --arch $(BENCH_IMAGE_ARCH)
	$(PY) bench/report.py show
bench-agent: $(VENV)/.stamp
	$(PY) bench/agent_bench.py
bench-yamux: $(VENV)/.stamp
	$(PY) bench/yamux_figures.py
bench-yamux-table: $(VENV)/.stamp
	$(PY) bench/yamux_bench.py
bench-oci: $(VENV)/.stamp
	$(PY) bench/oci_bench.py
bench-image: $(VENV)/.stamp
	$(PY) bench/image_bench.py --arch $(BENCH_IMAGE_ARCH)
bench-show:
	$(PY) bench/report.py show
