# Benchmarks: printed tables and bench/results/latest.json, never assertions.
.PHONY: bench bench-agent bench-yamux
bench: bench-yamux bench-agent
bench-agent: $(VENV)/.stamp
	$(PY) bench/agent_bench.py
bench-yamux: $(VENV)/.stamp
	$(PY) bench/yamux_bench.py
