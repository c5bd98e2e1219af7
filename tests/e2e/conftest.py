"""Fixtures for the end-to-end tests: control plane + node agent + operator + Prometheus.

* ``node_agent`` (session): a :class:`NodeAgent` (tests/cluster/node_agent.py) with two Nodes
  ``e2e-node-0``/``e2e-node-1`` in image mode: it runs the pods of the namespaces it is told
  to ``serve()`` under runc from their ``image:`` in the local image store (the trainer image
  built from this checkout, ``trainer_image``; a pod naming any other image stays Pending
  with ErrImageNeverPull), so other tests, which play the kubelet with ``set_pod_status``,
  keep their pods to themselves.
* ``operator_kubeconfig`` (session): the CRD, the chart's ServiceAccount and RBAC (rendered
  with helm_python), and a kubeconfig with that ServiceAccount's token - as in tests/operator.
* ``prometheus_installed``/``prometheus_sd``/``prometheus_server``: tests/e2e/prometheus.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from support import load_module

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from prometheus import prometheus_installed, prometheus_sd, prometheus_server  # noqa: E402,F401


node_agent_module = load_module("finetune_tests_node_agent", REPO / "tests" / "cluster" / "node_agent.py")
# The operator helpers (Operator, Cluster, wait_for, constants) of tests/operator, reused as they are.
operator_helpers = load_module("finetune_tests_operator_cluster", REPO / "tests" / "operator" / "test_operator_cluster.py")


@pytest.fixture(scope="session")
def node_agent(control_plane, trainer_image):
    na = node_agent_module
    agent = na.NodeAgent(control_plane, [na.NodeSpec("e2e-node-0", cpu="4", memory="8Gi"),
                                         na.NodeSpec("e2e-node-1", cpu="4", memory="8Gi")], namespaces=[],
                         image_mode=True)
    try:
        agent.start()
    except na.NodeAgentError as e:
        pytest.fail(f"could not start the node agent: {e}", pytrace=False)
    yield agent
    agent.stop()
    if agent.errors:
        print("node agent errors:\n" + "\n".join(agent.errors), file=sys.stderr)


@pytest.fixture(scope="session")
def operator_kubeconfig(control_plane) -> Path:
    """Same set-up as tests/operator's fixture of that name (session-scoped here)."""
    return operator_helpers.install_crd_and_chart_rbac(control_plane)
