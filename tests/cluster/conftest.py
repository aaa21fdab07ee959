"""A real one-node cluster for the session, with steer installed from its manifests.

The node (scripts/kube-node.sh) and steer's image (scripts/steer-image.sh) are built once
per machine and cached; the first run on a fresh machine takes 15 to 25 minutes for that.
`up` then takes about 30 s, and the installation about a minute. The node always goes
down at the end of the session, whatever happened.

Every test module here sets `pytestmark = pytest.mark.privileged` (tests/conftest.py):
skipped when not root, and only then.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.kube import Cluster, kube_node


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with kube_node() as kubeconfig:
        yield Cluster(kubeconfig, tmp_path_factory.mktemp("steer-kube"))


@pytest.fixture
def cluster(node: Cluster) -> Iterator[Cluster]:
    """The node with steer installed (again, after the uninstall test); each test's
    namespaces are deleted after it."""
    if not node.installed:
        node.install()
    yield node
    node.delete_namespaces()
