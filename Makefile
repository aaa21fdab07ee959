# One command each: lint, test, format, golden. `scripts/install.sh` sets up .venv.
VENV ?= .venv
PY := $(VENV)/bin

.PHONY: install demo test test-unit lint format golden kube-apiserver kube-node manifests steer-image test-cluster

install:
	./scripts/install.sh

demo: install
	$(PY)/steer demo

# The whole suite: unit, golden, privileged (real kernel), e2e (real Envoy) and cluster (a
# real Kubernetes node, scripts/kube-node.sh). Needs root.
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

# A real kube-apiserver (v1.20.2) for tests/k8s, built from Debian's packages into
# /var/cache/steer/kube (STEER_KUBE_CACHE); 5 to 12 minutes once, instant after that.
kube-apiserver:
	./scripts/kube-apiserver.sh build

# A real one-node cluster (kubelet, containerd, CNI, kube-proxy) for tests/cluster: builds and
# caches its binaries, runtime and images next to kube-apiserver; 10 to 20 minutes once,
# instant after. `scripts/kube-node.sh up` / `down` start and remove the node.
kube-node:
	./scripts/kube-node.sh build

# steer's image without a Docker daemon (mmdebstrap + pip + tar), as a `docker save` archive
# in /var/cache/steer/image; a few minutes once, seconds after a code change.
steer-image:
	./scripts/steer-image.sh build

# Only the real-node tests (tests/cluster): the node and the image are built if needed.
test-cluster: install
	$(PY)/pytest -q tests/cluster

# Every scenario, then docs/benchmarks.md from the results (docs/bench/). Takes a while.
benchmarks: install
	$(PY)/steer bench all
