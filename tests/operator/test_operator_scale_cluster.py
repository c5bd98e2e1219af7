"""Issue 14's scale side on the real control plane: a stale cached FineTune cannot count a
restart twice, a hanging rank 0 delays no reconcile, and a partly created worker set (quota,
or an operator that died between two POSTs) is completed without counting a restart."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import random
import re
import socket
import threading
import time

import kubernetes
import pytest
import test_operator_cluster as oc
from test_operator_cluster import Cluster, Operator, cpu_finetune, wait_for

from finetune_operator import kube as kube_
from finetune_operator import reconcile, runtime

pytestmark = pytest.mark.cluster
# The fixtures of test_operator_cluster (the chart's RBAC, the operator as a subprocess).
cluster, operator, operator_kubeconfig = oc.cluster, oc.operator, oc.operator_kubeconfig


def observed(cluster: Cluster, name: str) -> tuple[dict, list[dict]]:
    """The FineTune and its pods as the operator's indexes hold them."""
    return (runtime.finetune_entry(cluster.finetune(name)),
            [runtime.pod_entry(p) for p in cluster.pods(name)])


def test_a_stale_copy_of_the_finetune_cannot_count_a_restart_twice(control_plane, operator_kubeconfig, cluster):
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(str(control_plane.kubeconfig), client_configuration=configuration)
    kube = kube_.Kube(configuration)
    cluster.apply(cpu_finetune("stale"))
    reconcile.reconcile(kube, *observed(cluster, "stale"), False)
    pods = cluster.wait_pods("stale", 2)
    cluster.set_all(pods, "Running")
    assert reconcile.reconcile(kube, *observed(cluster, "stale"), True).status["phase"] == "Running"
    control_plane.set_pod_status(cluster.ns, "stale-worker-1", "Failed", exit_code=137)
    before_restart, failed_pods = observed(cluster, "stale")
    restart = reconcile.reconcile(kube, before_restart, failed_pods, True)
    assert restart.status["restarts"] == 1 and "restarts" in restart.counters
    control_plane.reap_terminating_pods(cluster.ns)
    reconcile.reconcile(kube, *observed(cluster, "stale"), True)
    new_pods = cluster.wait_pods("stale", 2, attempt=1)
    cluster.set_all(new_pods, "Running")
    # The copy from before the restart (restarts 0, Running) meets the new attempt's pods, and
    # then the old attempt's failed pods: both plans are refused and made again from the real one.
    for pods_seen in ([runtime.pod_entry(p) for p in cluster.pods("stale")], failed_pods):
        again = reconcile.reconcile(kube, before_restart, pods_seen, True)
        assert "restarts" not in again.counters and again.status["restarts"] == 1
    assert cluster.status("stale")["restarts"] == 1
    assert [p["metadata"]["uid"] for p in cluster.live_pods("stale")] == [p["metadata"]["uid"] for p in new_pods]


class HangingEndpoint:
    """Rank 0's metrics port that accepts connections and never answers (until closed)."""

    def __init__(self, host: str, port: int = 9400):
        self.server = socket.create_server((host, port))
        self.connections: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(connection)

    def still_hanging(self) -> bool:
        """A scrape is connected and has not given up (the operator has not closed it)."""
        for connection in self.connections:
            connection.setblocking(False)
            try:
                if connection.recv(65536, socket.MSG_PEEK) == b"":
                    continue  # closed by the operator
            except BlockingIOError:
                pass
            return True
        return False

    def close(self) -> None:
        self.server.close()
        for connection in self.connections:
            connection.close()


def point_pod_at(cluster: Cluster, pod: str, ip: str) -> None:
    cluster.cp.kubectl("-n", cluster.ns, "patch", "pod", pod, "--subresource=status", "--type=merge",
                       "-p", json.dumps({"status": {"podIP": ip, "podIPs": [{"ip": ip}]}}))


def run_another_finetune_to_the_end(cluster: Cluster, name: str = "other") -> None:
    """A two-worker FineTune created, Running and Succeeded: its reconciles all went through."""
    cluster.apply(cpu_finetune(name, workers=2))
    pods = cluster.wait_pods(name, 2)
    cluster.set_all(pods, "Running")
    cluster.wait_phase(name, "Running")
    cluster.set_all(pods, "Succeeded")
    cluster.wait_phase(name, "Succeeded")


def test_a_hanging_rank_0_delays_no_reconcile(operator_kubeconfig, cluster, namespace, tmp_path):
    # One scrape thread and a scrape that could wait a minute: everything else must go on anyway.
    op = Operator(operator_kubeconfig, namespace, tmp_path / "operator.log",
                  env={"FINETUNE_OPERATOR_SCRAPE_TIMEOUT": "60", "FINETUNE_OPERATOR_SCRAPE_WORKERS": "1"})
    # A loopback address of its own (127/8 is all loopback): the fixed metrics port may be
    # taken on 127.0.0.1 or 127.0.0.2 by another test run on this machine.
    address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    endpoint = HangingEndpoint(address)
    op.start()
    try:
        cluster.apply(cpu_finetune("hang", workers=1))
        (pod,) = cluster.wait_pods("hang", 1)
        cluster.set_all([pod], "Running")
        point_pod_at(cluster, "hang-worker-0", address)
        cluster.wait_phase("hang", "Running")
        wait_for(endpoint.still_hanging, "the operator's scrape to hang on rank 0")
        # Another FineTune goes through its whole life, and the hanging one's own pod events are
        # handled, while that scrape still hangs.
        run_another_finetune_to_the_end(cluster)
        cluster.set_all([pod], "Succeeded")
        cluster.wait_phase("hang", "Succeeded")
        assert endpoint.still_hanging()
    finally:
        endpoint.close()
        op.stop()
        print(f"--- operator log ---\n{op.log_tail()}")


def test_a_quota_refusal_waits_and_retries_without_a_restart(cluster, operator):
    cluster.cp.apply({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "pods"},
                      "spec": {"hard": {"pods": "1"}}}, namespace=cluster.ns)
    wait_for(lambda: cluster.cp.get_json("resourcequota", "pods", namespace=cluster.ns).get("status", {}).get("hard"),
             "the quota to be counted")
    cluster.apply(cpu_finetune("quota", workers=2, backoffLimit=0))
    condition = wait_for(lambda: (c := cluster.condition("quota", "QuotaExceeded")).get("status") == "True" and c,
                         "QuotaExceeded")
    assert "exceeded quota" in condition["message"] and "quota-worker-1" in condition["message"]
    (pod0,) = cluster.live_pods("quota")
    cluster.set_all([pod0], "Running")
    time.sleep(3)  # several retries (RECONCILE_INTERVAL=1): still waiting, nothing counted
    status = cluster.status("quota")
    assert status["phase"] == "Pending" and status["restarts"] == 0, status
    assert "QuotaExceeded" in cluster.events("quota")
    cluster.cp.kubectl("-n", cluster.ns, "patch", "resourcequota", "pods", "--type=merge",
                       "-p", '{"spec":{"hard":{"pods":"2"}}}')
    pods = cluster.wait_pods("quota", 2)
    assert pods[0]["metadata"]["uid"] == pod0["metadata"]["uid"]
    wait_for(lambda: cluster.condition("quota", "QuotaExceeded").get("status") == "False", "the condition to clear")
    cluster.set_all(pods[1:], "Running")
    assert cluster.wait_phase("quota", "Running")["restarts"] == 0


def test_an_operator_that_died_between_two_posts_completes_the_set(operator_kubeconfig, cluster, namespace, tmp_path):
    """Pod 0 exists and runs, pod 1 was never created: as if the operator had died in between."""
    cluster.apply(cpu_finetune("half", workers=2, backoffLimit=0))
    finetune = cluster.finetune("half")
    start = reconcile.plan(finetune, [], False, dt.datetime.now(dt.timezone.utc), lambda: [])
    name = "half"
    cluster.cp.kubectl("-n", namespace, "patch", "ft", name, "--subresource=status", "--type=merge",
                       "-p", json.dumps({"status": {k: v for k, v in start.status.items() if v is not None}}))
    cluster.apply(start.create_service)
    cluster.apply(start.create_pods[0])
    cluster.cp.set_pod_status(namespace, "half-worker-0", "Running")
    op = Operator(operator_kubeconfig, namespace, tmp_path / "operator.log")
    op.start()
    try:
        pods = cluster.wait_pods("half", 2)
        cluster.set_all(pods[1:], "Running")
        status = cluster.wait_phase("half", "Running")
        assert status["restarts"] == 0 and "Restarting" not in cluster.events("half")
    finally:
        op.stop()
        print(f"--- operator log ---\n{op.log_tail()}")


def test_hostile_rank_0_endpoints_harm_neither_the_operator_nor_other_finetunes(operator_kubeconfig, cluster,
                                                                                 namespace, tmp_path):
    """The operator as the chart runs it, four FineTunes whose rank 0 answers with an endless
    body, a byte every 20 ms, a redirect and NaN/Inf values: its memory stays bounded, the
    redirect is not followed, no hostile value reaches a status, and another FineTune goes
    through its whole life meanwhile."""
    import test_scrape_hostile as hostile

    nan_body = hostile.OK_HEAD + (b"finetune_map50{finetune=\"nan\",rank=\"0\"} NaN\n"
                                  b"finetune_map50_95{finetune=\"nan\",rank=\"0\"} +Inf\n"
                                  b"finetune_recall{finetune=\"nan\",rank=\"0\"} 0.5\n"
                                  b"finetune_epochs_total{finetune=\"nan\",rank=\"0\"} 10\n")
    base = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}"
    addresses = {name: f"{base}.{i}" for i, name in enumerate(("endless", "drip", "redirect", "target", "nan"), 2)}
    with contextlib.ExitStack() as stack:
        def serve(name, handle):
            return stack.enter_context(hostile.server(handle, (addresses[name], 9400)))
        _, target = serve("target", lambda conn, stats: hostile.send(conn, stats, hostile.OK_HEAD + hostile.GOOD))
        redirect = (b"HTTP/1.0 302 Found\r\nLocation: http://" + addresses["target"].encode()
                    + b":9400/metrics\r\n\r\n")
        stats = {"endless": serve("endless", hostile.endless_body)[1], "drip": serve("drip", hostile.drip)[1],
                 "redirect": serve("redirect", lambda conn, s: hostile.send(conn, s, redirect))[1],
                 "nan": serve("nan", lambda conn, s: hostile.send(conn, s, nan_body))[1]}
        op = Operator(operator_kubeconfig, namespace, tmp_path / "operator.log",
                      env={"FINETUNE_OPERATOR_RECONCILE_INTERVAL": "1"})
        op.start()
        stack.callback(lambda: print(f"--- scrapes {stats}, redirect target {target}\n--- operator log ---\n"
                                     f"{op.log_tail()}"))
        stack.callback(op.stop)
        for name in stats:
            cluster.apply(cpu_finetune(name, workers=1))
        for name in stats:
            (pod,) = cluster.wait_pods(name, 1)
            cluster.set_all([pod], "Running")
            point_pod_at(cluster, f"{name}-worker-0", addresses[name])
        for name in stats:
            cluster.wait_phase(name, "Running")
        # Each is polled again and again (every second here), a failed scrape or not. (This once
        # caught a Running FineTune left without its clock: see test_runtime's kopf-ordering test.)
        wait_for(lambda: all(s["connections"] >= 3 for s in stats.values()), "three scrapes of each", timeout=120)

        # Meanwhile another FineTune goes through its whole life.
        run_another_finetune_to_the_end(cluster)

        rss_mib = int(re.search(r"VmHWM:\s+(\d+) kB", open(f"/proc/{op.proc.pid}/status").read()).group(1)) / 1024
        assert rss_mib < 300, f"the operator's peak RSS reached {rss_mib:.0f} MiB"
        assert stats["endless"]["closed_by_client"], "the operator kept reading an endless body"
        assert stats["endless"]["sent"] < stats["endless"]["connections"] * (8 << 20), stats["endless"]
        assert target["connections"] == 0, "the operator followed a redirect"
        for name in ("endless", "drip", "redirect"):
            assert not (cluster.status(name).get("metrics") or {}), (name, cluster.status(name))
        metrics = cluster.status("nan").get("metrics") or {}
        assert metrics.get("recall") == 0.5 and "map50" not in metrics and "map50_95" not in metrics, metrics
        assert "map50=nan" in (tmp_path / "operator.log").read_text()
