# `make demo`: set up, then train on the built-in digits (about 2 minutes on 2 CPU cores, once set up).
# `make test`: set up, then run the test suite (a few minutes on 2 CPU cores).
.PHONY: setup demo test

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/deepcluster train

test: setup
	.venv/bin/python -m pytest -q
