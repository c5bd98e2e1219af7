"""The test control plane is a real Kubernetes v1.20.2: API, CRDs, GC, scheduler, RBAC."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.cluster


def wait_for(fn, timeout=30.0, interval=0.2, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def pod(name, **spec):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "main", "image": "busybox:1.36",
                                     "command": ["true"]}],
                     "restartPolicy": "Never", **spec}}


def test_version_is_v1_20_2(control_plane, kubectl):
    out = json.loads(kubectl("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"] == "v1.20.2"
    assert out["serverVersion"]["major"] == "1" and out["serverVersion"]["minor"] == "20"
    assert control_plane.startup_seconds is not None


CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.test.finetune.dev
spec:
  group: test.finetune.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, minimum: 1}
              labels: {type: object, additionalProperties: {type: string}}
          status:
            type: object
            x-kubernetes-preserve-unknown-fields: true
"""


def test_crd_and_custom_resource(control_plane, kubectl, namespace):
    kubectl("apply", "-f", "-", input=CRD)
    kubectl("wait", "--for=condition=Established", "crd/widgets.test.finetune.dev", "--timeout=30s")
    cr = {"apiVersion": "test.finetune.dev/v1", "kind": "Widget", "metadata": {"name": "w1"},
          "spec": {"size": 3, "labels": {"a": "b", "c": "d"}}}
    # The first custom-resource write is where vendored reflect2 crashed Go 1.19 builds.
    wait_for(lambda: kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(cr),
                             check=False).returncode == 0, what="CR create")
    got = control_plane.get_json("widget", "w1", namespace=namespace)
    assert got["spec"] == {"size": 3, "labels": {"a": "b", "c": "d"}}
    # structural schema validation is enforced
    bad = {**cr, "metadata": {"name": "w2"}, "spec": {"size": 0}}
    res = kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(bad), check=False)
    assert res.returncode != 0 and "spec.size" in res.stderr
    # status subresource
    kubectl("-n", namespace, "patch", "widget", "w1", "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"phase": "Ready"}}))
    assert control_plane.get_json("widget", "w1", namespace=namespace)["status"] == {"phase": "Ready"}
    kubectl("-n", namespace, "delete", "widget", "w1")


def test_garbage_collection_of_owned_pod(control_plane, kubectl, namespace):
    kubectl("-n", namespace, "create", "configmap", "owner", "--from-literal=k=v")
    owner = control_plane.get_json("configmap", "owner", namespace=namespace)
    p = pod("owned")
    p["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                                         "uid": owner["metadata"]["uid"]}]
    control_plane.apply(p, namespace=namespace)
    kubectl("-n", namespace, "delete", "configmap", "owner")

    def gone():
        r = kubectl("-n", namespace, "get", "pod", "owned", check=False)
        return r.returncode != 0 and "NotFound" in r.stderr
    wait_for(gone, timeout=60, what="garbage collection of pod 'owned'")


def test_scheduler_binds_pod_to_registered_node(control_plane, kubectl, namespace):
    node = control_plane.register_node(f"{namespace}-gpu", cpu=8, memory="32Gi", gpus=2)
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "2"
    assert not [t for t in node["spec"].get("taints") or [] if "not-ready" in t["key"]]
    p = pod("trainer", nodeSelector={"kubernetes.io/hostname": f"{namespace}-gpu"})
    p["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    control_plane.apply(p, namespace=namespace)
    bound = wait_for(lambda: control_plane.get_json("pod", "trainer", namespace=namespace)
                     ["spec"].get("nodeName"), what="pod binding")
    assert bound == f"{namespace}-gpu"
    # more GPUs than any node has: stays unschedulable
    big = pod("too-big")
    big["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "64"}}
    control_plane.apply(big, namespace=namespace)

    def unschedulable():
        conds = control_plane.get_json("pod", "too-big", namespace=namespace)["status"].get("conditions") or []
        return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conds)
    wait_for(unschedulable, what="Unschedulable condition")
    kubectl("delete", "node", f"{namespace}-gpu")


def test_serviceaccount_token_and_rbac(control_plane, kubectl, namespace):
    kubectl("-n", namespace, "create", "serviceaccount", "op")
    kubectl("-n", namespace, "create", "role", "pod-reader", "--verb=get,list,watch", "--resource=pods")
    kubectl("-n", namespace, "create", "rolebinding", "op-reads", "--role=pod-reader",
            f"--serviceaccount={namespace}:op")
    token = control_plane.create_token(namespace, "op")
    assert token.count(".") == 2  # a JWT
    kc = control_plane.kubeconfig_for_token(token)
    who = lambda *a: kubectl("auth", "can-i", *a, "-n", namespace, kubeconfig=kc, check=False)  # noqa: E731
    assert who("list", "pods").stdout.strip() == "yes"
    assert who("create", "pods").stdout.strip() == "no"
    assert who("list", "secrets").stdout.strip() == "no"
    assert kubectl("-n", namespace, "get", "pods", kubeconfig=kc, check=False).returncode == 0
    denied = kubectl("-n", namespace, "get", "secrets", kubeconfig=kc, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    assert f"system:serviceaccount:{namespace}:op" in denied.stderr
    bad = control_plane.kubeconfig_for_token("not-a-token")
    unauth = kubectl("get", "ns", kubeconfig=bad, check=False)
    assert unauth.returncode != 0 and "Unauthorized" in unauth.stderr


@pytest.mark.parametrize("phase,code", [("Succeeded", 0), ("Failed", 137)])
def test_set_pod_status(control_plane, kubectl, namespace, phase, code):
    control_plane.apply(pod("worker-0"), namespace=namespace)
    running = control_plane.set_pod_status(namespace, "worker-0", "Running")
    assert running["status"]["phase"] == "Running"
    assert "running" in running["status"]["containerStatuses"][0]["state"]
    assert running["status"]["podIP"]
    control_plane.set_pod_status(namespace, "worker-0", phase, exit_code=code,
                                 reason=None if code == 0 else "OOMKilled")
    got = control_plane.get_json("pod", "worker-0", namespace=namespace)
    assert got["status"]["phase"] == phase
    term = got["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == code
    assert term["reason"] == ("Completed" if code == 0 else "OOMKilled")
    ready = {c["type"]: c["status"] for c in got["status"]["conditions"]}
    assert ready["Ready"] == "False"
    jsonpath = "{.status.containerStatuses[0].state.terminated.exitCode}"
    assert kubectl("-n", namespace, "get", "pod", "worker-0", "-o", f"jsonpath={jsonpath}").stdout == str(code)


def test_persistent_volume_binding(control_plane, kubectl, namespace):
    pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{namespace}-pv"},
          "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                   "storageClassName": "manual", "hostPath": {"path": "/tmp/finetune-pv"},
                   "persistentVolumeReclaimPolicy": "Retain"}}
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
           "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "manual",
                    "resources": {"requests": {"storage": "1Gi"}}}}
    control_plane.apply(pv)
    control_plane.apply(pvc, namespace=namespace)
    wait_for(lambda: control_plane.get_json("pvc", "data", namespace=namespace)["status"].get("phase")
             == "Bound", timeout=60, what="PVC binding")
    assert control_plane.get_json("pvc", "data", namespace=namespace)["spec"]["volumeName"] == f"{namespace}-pv"
    kubectl("-n", namespace, "delete", "pvc", "data")
    kubectl("delete", "pv", f"{namespace}-pv", "--wait=false")


def test_deleting_a_bound_pod_needs_the_fake_kubelet(control_plane, kubectl, namespace):
    control_plane.register_node(f"{namespace}-n")
    control_plane.apply(pod("bound", nodeName=f"{namespace}-n"), namespace=namespace)
    control_plane.set_pod_status(namespace, "bound", "Running")
    kubectl("-n", namespace, "delete", "pod", "bound", "--wait=false")
    assert control_plane.get_json("pod", "bound", namespace=namespace)["metadata"]["deletionTimestamp"]
    assert control_plane.reap_terminating_pods(namespace) == [f"{namespace}/bound"]
    wait_for(lambda: kubectl("-n", namespace, "get", "pod", "bound", check=False).returncode != 0,
             what="pod removal")
    kubectl("delete", "node", f"{namespace}-n")
