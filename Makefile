# Two commands do all the set-up on a fresh machine:
#   make book   - builds the book into _build/html (executing every chapter, warnings are errors)
#   make test   - runs the unit tests and executes every chapter (nbmake) in the quick profile
# Both create .venv on first use. TORCH picks the torch build to install: the default is the
# CPU wheel these machines carry; on a CUDA machine use `make TORCH=torch book`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
NBMAKE_ARGS ?=
export LDM_TEACH_PROFILE ?= quick
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test book student book-from-outputs clean rehearse

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest tests --nbmake chapters --nbmake-timeout=1200 --durations=12 $(NBMAKE_ARGS)

book: setup
	$(PY) tools/build_book.py

# The student edition: the same book with every solution left out (into _build/student).
student: setup
	$(PY) tools/build_book.py --student

# CI: build from the outputs that `make test NBMAKE_ARGS=--overwrite` wrote, without running the chapters twice.
book-from-outputs: setup
	$(PY) tools/build_book.py --from-outputs

clean:
	rm -rf _build

# The full profile's code paths on the CPU, offline, with the quick budgets and random stand-in weights in the
# layout the full profile downloads (tools/rehearse_full_profile.py). Run it before a change to a full-profile
# branch lands.
rehearse: setup
	$(PY) tools/rehearse_full_profile.py
