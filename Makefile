# Two commands set up and exercise a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Real MNIST, LeNet, SMA with several learners on every local device.
demo: $(STAMP)
	$(PY) -m crossbow_jax.demo

# The whole suite on 8 simulated CPU devices, 2 workers (tests/conftest.py sets both up).
test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n 2 --dist loadgroup

clean:
	rm -rf $(VENV) *.egg-info
