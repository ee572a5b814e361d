# The two commands of the README. Each sets up .venv first (a no-op once done).
.PHONY: setup demo test
VENV ?= .venv

setup:
	@bash tools/setup_env.sh

demo: setup
	$(VENV)/bin/trinityx demo

test: setup
	$(VENV)/bin/python -m pytest -q -rs --durations=15 tests
