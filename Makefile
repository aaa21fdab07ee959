# One command each: lint, test, format, golden. `scripts/install.sh` sets up .venv.
VENV ?= .venv
PY := $(VENV)/bin

.PHONY: install demo test test-unit lint format golden manifests

install:
	./scripts/install.sh

demo: install
	$(PY)/steer demo

# The whole suite: unit, golden, privileged (real kernel) and e2e (real Envoy). Needs root.
test: install
	$(PY)/pytest -q tests

test-unit:
	$(PY)/pytest -q tests/unit tests/golden

lint:
	$(PY)/ruff check steer tests
	$(PY)/ruff format --check steer tests
	$(PY)/mypy --strict steer

format:
	$(PY)/ruff format steer tests
	$(PY)/ruff check --fix steer tests

golden:
	STEER_REGEN_GOLDEN=1 $(PY)/pytest -q tests/golden

# The CRD is generated from the policy model; tests/golden/test_crd.py fails when stale.
manifests:
	$(PY)/steer render crd > manifests/crd/httppolicies.steer.dev.yaml
