"""The test node agent (tests/cluster/node_agent.py) plays the kubelet for real processes.

Pods bound to its Nodes run as local processes in their own network, UTS and mount
namespaces; these tests check what the e2e tests rely on: exit codes and phases, env
resolution, volumes (PVC -> PV -> hostPath), pod-to-pod DNS names and connections, the
security context's user, deletion/deadline kills, and that nothing is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support import load_module, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

HERE = Path(__file__).resolve().parent


na = load_module("finetune_tests_node_agent", HERE / "node_agent.py")




@pytest.fixture(scope="module")
def agent(control_plane):
    a = na.NodeAgent(control_plane, [na.NodeSpec("agent-test-a"), na.NodeSpec("agent-test-b", cpu="2", memory="4Gi")],
                     namespaces=[])
    a.start()
    yield a
    a.stop()
    print("agent errors:", a.errors)


@pytest.fixture
def ns(agent, namespace):
    agent.serve(namespace)
    return namespace


def pod(name: str, script: str, **spec: Any) -> dict:
    container = {"name": "main", "image": "busybox", "command": ["sh", "-c", script],
                 "terminationMessagePolicy": "FallbackToLogsOnError"}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5, "containers": [container], **spec}}


def get_pod(cp, ns: str, name: str) -> dict | None:
    proc = cp.kubectl("-n", ns, "get", "pod", name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def wait_phase(cp, ns: str, name: str, phases=("Succeeded", "Failed"), timeout: float = 60) -> dict:
    return wait_for(lambda: (p := get_pod(cp, ns, name)) and (p.get("status") or {}).get("phase") in phases and p,
                    f"pod {name} in {phases}", timeout=timeout)


def terminated(p: dict) -> dict:
    return p["status"]["containerStatuses"][0]["state"]["terminated"]


def test_exit_codes_become_phases_with_the_log_tail(control_plane, agent, ns):
    control_plane.apply([pod("ok", "echo hello from $(hostname); exit 0"),
                         pod("bad", "echo first line; echo 'error: it broke' >&2; exit 3")], namespace=ns)
    ok = wait_phase(control_plane, ns, "ok")
    bad = wait_phase(control_plane, ns, "bad")
    assert ok["status"]["phase"] == "Succeeded" and terminated(ok)["exitCode"] == 0
    assert terminated(ok)["reason"] == "Completed" and "message" not in terminated(ok)
    assert bad["status"]["phase"] == "Failed" and terminated(bad)["exitCode"] == 3
    assert terminated(bad)["reason"] == "Error"
    assert terminated(bad)["message"].splitlines()[-1] == "error: it broke"
    assert agent.log(ns, "ok").strip() == "hello from ok"
    assert ok["spec"]["nodeName"] in {"agent-test-a", "agent-test-b"}
    assert ok["status"]["podIP"].startswith(f"10.{agent.subnet_octet}.") and ok["status"]["hostIP"] == agent.bridge_ip


def test_env_field_and_resource_refs(control_plane, agent, ns):
    env = [
        {"name": "PLAIN", "value": "plain-value"},
        {"name": "EXPANDED", "value": "x-$(PLAIN)-y"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
        {"name": "CPU_REQ", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}},
        {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "color"}}},
    ]
    control_plane.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
                         "data": {"color": "blue"}}, namespace=ns)
    body = pod("envy", "env | sort; echo ARG=$0 $1; ip -4 -o addr show eth0 | tr -s ' ' | cut -d' ' -f4",
               container={"env": env, "args": ["$(POD_NAME)", "$$(POD_NAME)"], "workingDir": "/usr",
                          "resources": {"requests": {"cpu": "250m"}, "limits": {"memory": "300Mi"}}})
    body["spec"]["containers"][0]["command"] = ["sh", "-c", body["spec"]["containers"][0]["command"][2] + "; pwd"]
    control_plane.apply(body, namespace=ns)
    p = wait_phase(control_plane, ns, "envy")
    assert p["status"]["phase"] == "Succeeded", agent.log(ns, "envy")
    out = agent.log(ns, "envy").splitlines()
    ip = p["status"]["podIP"]
    for line in ("PLAIN=plain-value", "EXPANDED=x-plain-value-y", "POD_NAME=envy", f"POD_NS={ns}", f"POD_IP={ip}",
                 f"NODE={p['spec']['nodeName']}", "MEM_MI=300", "CPU_REQ=250", "FROM_CM=blue",
                 "ARG=envy $(POD_NAME)", f"{ip}/16", "/usr", "HOSTNAME=envy"):
        assert line in out, (line, out)
    assert any(line.startswith(f"PATH={na.REPO / '.venv' / 'bin'}:") for line in out)


def test_volumes_pvc_emptydir_configmap_as_uid_1000(control_plane, agent, ns, tmp_path):
    data_dir, out_dir = tmp_path / "pv-data", tmp_path / "pv-out"
    data_dir.mkdir()
    (data_dir / "data.yaml").write_text("nc: 1\n")
    out_dir.mkdir()
    tmp_path.chmod(0o755)
    pvs = []
    for key, path in (("data", data_dir), ("out", out_dir)):
        pvs.append({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{ns}-{key}"},
                    "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                             "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(path)},
                             "claimRef": {"namespace": ns, "name": key}}})
        pvs.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": key, "namespace": ns},
                    "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": f"{ns}-{key}",
                             "resources": {"requests": {"storage": "1Gi"}}}})
    control_plane.apply(pvs)
    control_plane.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "model"},
                         "data": {"model.yaml": "depth: 0.33\n"}}, namespace=ns)
    script = ("id -u; id -g; id -G; cat /data/data.yaml; cat /config/model.yaml; "
              "touch /data/nope 2>/dev/null && echo data-writable || echo data-readonly; "
              "mkdir -p /output/run && echo result > /output/run/out.txt && echo output-ok; "
              "echo x > /scratch/f && echo scratch-ok; echo y > /dev/shm/f && echo shm-ok; "
              "echo z > /tmp/f && echo tmp-ok")
    body = pod("vols", script,
               securityContext={"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000, "runAsNonRoot": True},
               volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "data", "readOnly": True}},
                        {"name": "out", "persistentVolumeClaim": {"claimName": "out"}},
                        {"name": "cfg", "configMap": {"name": "model"}},
                        {"name": "scratch", "emptyDir": {}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
               container={"volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True},
                                           {"name": "out", "mountPath": "/output"},
                                           {"name": "cfg", "mountPath": "/config", "readOnly": True},
                                           {"name": "scratch", "mountPath": "/scratch"},
                                           {"name": "dshm", "mountPath": "/dev/shm"}]})
    control_plane.apply(body, namespace=ns)
    p = wait_phase(control_plane, ns, "vols")
    out = agent.log(ns, "vols").splitlines()
    assert p["status"]["phase"] == "Succeeded", out
    assert out[:3] == ["1000", "1000", "1000 2000"], out
    assert out[3:] == ["nc: 1", "depth: 0.33", "data-readonly", "output-ok", "scratch-ok", "shm-ok", "tmp-ok"]
    written = out_dir / "run" / "out.txt"
    assert written.read_text() == "result\n" and written.stat().st_uid == 1000
    assert not (data_dir / "nope").exists()
    # the pod's /tmp and /dev/shm were private: nothing landed on the host's
    assert not Path("/tmp/f").exists() and not Path("/dev/shm/f").exists()


def test_the_project_environment_runs_in_a_pod_with_a_private_tmp(control_plane, agent, ns):
    # The pods run the checkout's venv; a checkout cloned under /tmp must stay visible
    # behind the pod's private /tmp (CI may clone there).
    script = ("command -v finetune-launch >/dev/null && echo launch-found; "
              "python -c 'import finetune; print(\"import-ok\")'; echo z > /tmp/private-probe && echo tmp-ok")
    control_plane.apply(pod("venv", script, securityContext={"runAsUser": 1000, "runAsGroup": 1000}), namespace=ns)
    p = wait_phase(control_plane, ns, "venv")
    out = agent.log(ns, "venv").splitlines()
    assert p["status"]["phase"] == "Succeeded" and out == ["launch-found", "import-ok", "tmp-ok"], out
    assert not Path("/tmp/private-probe").exists()


def test_paths_under_tmp_keeps_the_outermost():
    paths = [Path("/tmp/ci"), Path("/tmp/ci/.venv"), Path("/work/main/.venv"), Path("/tmp"), Path("/tmp/other/x")]
    assert na.paths_under_tmp(paths) == [Path("/tmp/ci"), Path("/tmp/other/x")]


def test_pods_reach_each_other_by_hostname_and_subdomain(control_plane, agent, ns):
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "grp"},
               "spec": {"clusterIP": "None", "selector": {"grp": "yes"}, "ports": [{"port": 8080}]}}
    server = pod("server", "cd /tmp && echo served-by-$(hostname) > index.html && "
                           "exec python3 -m http.server 8080",
                 hostname="srv", subdomain="grp", securityContext={"runAsUser": 1000, "runAsGroup": 1000})
    server["metadata"]["labels"]["grp"] = "yes"
    client_code = ("import socket, time, urllib.request\n"
                   "print(socket.gethostname(), socket.gethostbyname(socket.gethostname()))\n"
                   "for url in ('http://srv.grp:8080/', 'http://srv.grp.%s.svc.cluster.local:8080/'):\n"
                   "    for i in range(100):\n"
                   "        try:\n"
                   "            print(urllib.request.urlopen(url, timeout=2).read().decode().strip()); break\n"
                   "        except OSError as e:\n"
                   "            time.sleep(0.2)\n"
                   "    else:\n"
                   "        raise SystemExit('no answer from ' + url)\n") % ns
    client = pod("client", "", hostname="cli", subdomain="grp")
    client["spec"]["containers"][0]["command"] = ["python3", "-c", client_code]
    control_plane.apply([service, server, client], namespace=ns)
    srv = wait_phase(control_plane, ns, "server", phases=("Running",))
    # the root namespace (operator, Prometheus) reaches pod IPs too
    body = wait_for(lambda: _fetch(f"http://{srv['status']['podIP']}:8080/"), "the server from the root namespace")
    assert body.strip() == "served-by-srv"
    cli = wait_phase(control_plane, ns, "client")
    out = agent.log(ns, "client").splitlines()
    assert cli["status"]["phase"] == "Succeeded", out
    assert out == [f"cli {cli['status']['podIP']}", "served-by-srv", "served-by-srv"]
    hosts = Path(f"/etc/netns/{agent.pod_run(ns, 'server').netns}/hosts").read_text()
    assert f"{srv['status']['podIP']}\tsrv srv.grp srv.grp.{ns}.svc srv.grp.{ns}.svc.cluster.local" in hosts


def _fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


def test_deletion_sigterms_then_removes_the_pod(control_plane, agent, ns):
    graceful = pod("graceful", "trap 'echo got-TERM; exit 0' TERM; echo started; while true; do sleep 0.1; done")
    stubborn = pod("stubborn", "trap 'echo ignoring-TERM' TERM; echo started; while true; do sleep 0.1; done",
                   terminationGracePeriodSeconds=2)
    control_plane.apply([graceful, stubborn], namespace=ns)
    for name in ("graceful", "stubborn"):
        wait_phase(control_plane, ns, name, phases=("Running",))
        wait_for(lambda: "started" in agent.log(ns, name), f"{name} to start")
    runs = {name: agent.pod_run(ns, name) for name in ("graceful", "stubborn")}
    control_plane.kubectl("-n", ns, "delete", "pod", "graceful", "stubborn", "--wait=false")
    wait_for(lambda: get_pod(control_plane, ns, "graceful") is None, "graceful pod removed")
    wait_for(lambda: get_pod(control_plane, ns, "stubborn") is None, "stubborn pod removed (SIGKILL after 2s)")
    assert "got-TERM" in agent.log(ns, "graceful")
    assert "ignoring-TERM" in agent.log(ns, "stubborn")
    for name, run in runs.items():
        assert run.proc.poll() is not None, name
        assert f"{ns}/{name}" not in agent.processes()
        assert run.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_active_deadline_and_kill_pod_process(control_plane, agent, ns):
    control_plane.apply([pod("deadline", "while true; do sleep 0.1; done", activeDeadlineSeconds=2),
                         pod("killed", "echo up; while true; do sleep 0.1; done")], namespace=ns)
    wait_phase(control_plane, ns, "killed", phases=("Running",))
    wait_for(lambda: "up" in agent.log(ns, "killed"), "killed to start")
    agent.kill_pod_process(ns, "killed", signal.SIGKILL, which="main")
    killed = wait_phase(control_plane, ns, "killed")
    assert killed["status"]["phase"] == "Failed" and terminated(killed)["exitCode"] == 137
    late = wait_phase(control_plane, ns, "deadline", timeout=30)
    assert late["status"]["phase"] == "Failed" and late["status"]["reason"] == "DeadlineExceeded"
    assert terminated(late)["exitCode"] == 143  # SIGTERM, like a container runtime's stop


def test_stop_cleans_up_everything(control_plane, namespace):
    other = na.NodeAgent(control_plane, [na.NodeSpec("agent-cleanup")], namespaces=[namespace])
    other.start()
    try:
        control_plane.apply(pod("lingering", "while true; do sleep 0.1; done",
                                nodeSelector={"kubernetes.io/hostname": "agent-cleanup"}), namespace=namespace)
        wait_phase(control_plane, namespace, "lingering", phases=("Running",))
        run = other.pod_run(namespace, "lingering")
        pid = run.proc.pid
        assert run.netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    finally:
        other.stop()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert other.id not in links, links
    assert other.id not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not os.path.exists(f"/proc/{pid}") or Path(f"/proc/{pid}/status").read_text().find("zombie") >= 0
    assert not other.dir.exists() and not other.state_dir.exists()
    assert not list(Path("/etc/netns").glob(f"{na.NETNS_PREFIX}{other.id}-*")) if Path("/etc/netns").exists() else True


def test_a_killed_agent_is_swept_by_the_next_start(control_plane, namespace, tmp_path):
    """SIGKILL an agent process mid-pod: the next agent's start-up removes its netns/veth/bridge."""
    code = f"""
import sys, time, json
sys.path.insert(0, {str(HERE)!r})
import control_plane as cpm, node_agent as na
cp = cpm.ControlPlane.__new__(cpm.ControlPlane)
cp.kubeconfig = {str(control_plane.kubeconfig)!r}
cp.kubectl = lambda *a, **k: cpm.ControlPlane.kubectl(cp, *a, **k)
cp.get_json = lambda *a, **k: cpm.ControlPlane.get_json(cp, *a, **k)
cp._fake_ip = cpm.ControlPlane._fake_ip
agent = na.NodeAgent(cp, [na.NodeSpec("agent-doomed")], namespaces=[{namespace!r}]).start()
print(agent.id, flush=True)
time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        agent_id = proc.stdout.readline().strip()
        assert len(agent_id) == 4, agent_id
        control_plane.apply(pod("orphan", "while true; do sleep 0.1; done",
                                nodeSelector={"kubernetes.io/hostname": "agent-doomed"}), namespace=namespace)
        wait_phase(control_plane, namespace, "orphan", phases=("Running",))
    finally:
        proc.kill()
        proc.wait()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{na.NETNS_PREFIX}{agent_id}-" in netns  # left behind by the SIGKILL
    removed = na.sweep_leftovers()
    assert any(agent_id in r for r in removed), removed
    assert agent_id not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert agent_id not in subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    control_plane.kubectl("delete", "node", "agent-doomed", "--wait=false", check=False)
