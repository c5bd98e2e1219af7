"""The node agent's image mode: pods run under runc from the built trainer image, with their
securityContext as the OCI spec; a pod whose image is not in the local store stays Pending
with ErrImageNeverPull instead of running from the virtualenv."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from support import load_module, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


na = load_module("finetune_tests_node_agent", REPO / "tests" / "cluster" / "node_agent.py")

# What the container sees of itself: user, groups, capabilities, no_new_privs, seccomp mode,
# and whether the root filesystem (the user's home in it) and /tmp are writable.
PROBE = """
import os, json
status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines() if ':' in line)
def writable(path):
    try:
        open(os.path.join(path, '.probe'), 'w').close(); return True
    except OSError:
        return False
print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'groups': sorted(os.getgroups()),
                  'CapEff': status['CapEff'].strip(), 'CapBnd': status['CapBnd'].strip(),
                  'NoNewPrivs': status['NoNewPrivs'].strip(), 'Seccomp': status['Seccomp'].strip(),
                  'root_writable': writable('/home/trainer'), 'tmp_writable': writable('/tmp'),
                  'home': os.environ.get('HOME'), 'hostname': os.uname().nodename,
                  'finetune': __import__('finetune').__file__}))
"""


@pytest.fixture(scope="module")
def image_agent(control_plane):
    agent = na.NodeAgent(control_plane, [na.NodeSpec("image-node-a")], namespaces=[], image_mode=True)
    agent.start()
    yield agent
    agent.stop()
    print("agent errors:", agent.errors)


def get_pod(cp, ns, name):
    return json.loads(cp.kubectl("-n", ns, "get", "pod", name, "-o", "json").stdout)


def pod(name: str, image: str, command: list[str], pod_sc: dict, container_sc: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "nodeName": "image-node-a", "terminationGracePeriodSeconds": 5,
                     "securityContext": pod_sc,
                     "containers": [{"name": "main", "image": image, "command": command,
                                     "securityContext": container_sc}]}}


def test_pod_runs_from_the_image_with_its_security_context(control_plane, namespace, image_agent, trainer_image):
    image_agent.serve(namespace)
    # The operator's trainer pods' securityContext (manifests.py), plus a read-only root.
    control_plane.apply(pod("locked", trainer_image, ["python", "-c", PROBE],
                            {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                             "supplementalGroups": [4242], "seccompProfile": {"type": "RuntimeDefault"}},
                            {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                             "readOnlyRootFilesystem": True}), namespace=namespace)
    done = wait_for(lambda: (p := get_pod(control_plane, namespace, "locked"))["status"].get("phase")
                    in ("Succeeded", "Failed") and p, "pod locked to finish", timeout=60)
    log = image_agent.log(namespace, "locked")
    assert done["status"]["phase"] == "Succeeded", log
    state = done["status"]["containerStatuses"][0]
    assert state["containerID"].startswith("runc://") and state["imageID"]
    seen = json.loads(log.strip().splitlines()[-1])
    assert (seen["uid"], seen["gid"]) == (1000, 1000) and {1000, 4242} <= set(seen["groups"])
    assert seen["CapEff"] == seen["CapBnd"] == "0000000000000000"
    assert seen["NoNewPrivs"] == "1" and seen["Seccomp"] == "2"  # 2: filter mode
    assert not seen["root_writable"] and seen["tmp_writable"]
    assert seen["home"] == "/home/trainer"  # the image's passwd entry for uid 1000
    assert seen["hostname"] == "locked"
    # The image's own package, not this checkout's.
    assert seen["finetune"].startswith("/opt/venv/"), seen["finetune"]


def test_default_security_context_keeps_the_runtime_defaults(control_plane, namespace, image_agent, trainer_image):
    image_agent.serve(namespace)
    control_plane.apply(pod("plain", trainer_image, ["python", "-c", PROBE], {}, {}), namespace=namespace)
    done = wait_for(lambda: (p := get_pod(control_plane, namespace, "plain"))["status"].get("phase")
                    in ("Succeeded", "Failed") and p, "pod plain to finish", timeout=60)
    log = image_agent.log(namespace, "plain")
    assert done["status"]["phase"] == "Succeeded", log
    seen = json.loads(log.strip().splitlines()[-1])
    # No runAsUser: the image's USER 1000:1000. Unconfined seccomp, privilege escalation
    # allowed and the runtime's default capability set (bounding; a non-root user's
    # effective set is empty), writable root: Kubernetes' defaults.
    assert (seen["uid"], seen["gid"]) == (1000, 1000)
    assert seen["Seccomp"] == "0" and seen["NoNewPrivs"] == "0"
    assert seen["CapBnd"] != "0000000000000000" and seen["root_writable"]


def test_missing_image_is_err_image_never_pull(control_plane, namespace, image_agent, trainer_image):
    image_agent.serve(namespace)
    missing = "localhost/finetune-trainer:no-such-tag"
    control_plane.apply(pod("missing", missing, ["python", "-c", "print('ran')"], {}, {}), namespace=namespace)

    def waiting():
        state = get_pod(control_plane, namespace, "missing")["status"].get("containerStatuses", [{}])[0]
        return (state.get("state") or {}).get("waiting", {}).get("reason") == "ErrImageNeverPull" and state
    state = wait_for(waiting, "ErrImageNeverPull", timeout=60)
    assert missing in state["state"]["waiting"]["message"]
    time.sleep(2)  # several agent syncs: it must stay Pending, never start from the venv
    got = get_pod(control_plane, namespace, "missing")
    assert got["status"]["phase"] == "Pending"
    assert image_agent.log(namespace, "missing") == ""
