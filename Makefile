# `make demo`: set up, then train on the built-in digits (about 2 minutes on 2 CPU cores, once set up).
# `make test`: set up, lint with ruff, then run the test suite (a few minutes on 2 CPU cores).
# `make lint`: ruff over the sources, tests and scripts.
# `make test-fast`: the tests that start no process and train for at most about a second
#   (under a minute on 2 CPU cores; the loop while developing).
.PHONY: setup demo lint test test-fast

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/deepcluster train

lint: setup
	.venv/bin/ruff check src tests bench tools

test: lint
	.venv/bin/python -m pytest -q

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"
