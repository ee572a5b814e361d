# The two commands of the README. Each sets up .venv first (a no-op once done).
.PHONY: setup demo test
VENV ?= .venv

setup:
	@bash tools/setup_env.sh

demo: setup
	$(VENV)/bin/trinityx demo

# The Slurm tests stand up a real two-node cluster (Debian's slurm packages, installed here when
# running as root; elsewhere they skip with the reason).
test: setup
	@bash tools/slurm_lab/install.sh
	$(VENV)/bin/python -m pytest -q -rs --durations=15 tests
