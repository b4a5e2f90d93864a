# Top-level build. Areas add their own targets in */*.mk (included below).
SHELL := /bin/bash
ARCH ?= $(shell uname -m)
VENV ?= .venv
PY := $(VENV)/bin/python
PROTO_DIR := agent/kata_agent/protocol
PROTOS := $(wildcard $(PROTO_DIR)/*.proto)

.PHONY: help venv protos protos-check test test-unit lint

help:
	@echo "make venv | protos | test | test-unit | lint | kernel | image | demo | bench  (ARCH=$(ARCH))"

$(VENV)/.stamp: requirements.txt requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.stamp

# Generated modules live beside the .proto files; `make protos` is the only way to make them.
protos: $(VENV)/.stamp
	$(PY) -m grpc_tools.protoc -I agent --python_out=agent --pyi_out=agent --grpc_python_out=agent \
		$(patsubst agent/%,%,$(PROTOS))

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check agent tests bench image-build
	$(VENV)/bin/mypy

test: $(VENV)/.stamp
	$(VENV)/bin/pytest tests

test-unit: $(VENV)/.stamp
	$(VENV)/bin/pytest tests/unit

-include $(sort $(wildcard kernel-config/*.mk image-build/*.mk rootfs/*.mk bench/*.mk tests/*.mk))
