# The two commands of the README: `make demo` and `make test`. Both set up everything first.
PY := .venv/bin/python
export WANDB_SILENT := true

.PHONY: setup demo test clean-demo

setup:
	@bash .ci/setup

demo: setup
	$(PY) -m fastssl.demo

test: setup
	$(PY) -m pytest tests

clean-demo:
	rm -rf data/demo runs/demo
