"""How the FineTune operator scales, against a minimal kopf operator, on a real control plane.

    .venv/bin/python bench/operator_scale.py [--finetunes 200] [--rounds 5] [--idle 1000]
                                             [--idle-seconds 60] [--label "what the code is"]

One run, on one fresh control plane (tests/cluster, v1.20, no kubelet, no Node: every pod
stays Pending), with the apiserver's audit log on for the operators' ServiceAccount. Two
operators, both running as the chart's ServiceAccount with its RBAC (plus, for the baseline
only, patch on FineTunes: kopf's create handlers record their progress):

- the minimal operator (bench/minimal_operator.py: one create handler that creates the same
  headless Service and worker pods), and
- the FineTune operator, started with the chart's args and env (rendered from
  charts/finetune-operator).

``--rounds`` rounds, each a burst of ``--finetunes`` FineTunes (2 workers each, created by 8
threads) for each operator, freshly started and alone on the control plane, in a namespace of
its own that is deleted after; which operator goes first alternates between rounds. The latency
of a FineTune is from the benchmark's own watch seeing it ADDED to its watch seeing the last of
its pods ADDED; a round's ratio is the FineTune operator's p99 over the minimal's, and the
target is judged on the median of the rounds' ratios (one burst's p99 spreads by a third
between runs on a 2-core machine). Then a fresh FineTune operator gets ``--idle`` FineTunes
(Pending, no node) in bursts of ``--finetunes`` and, once its work queue has drained, is left
alone for ``--idle-seconds``: the requests it makes then (audit log; watches excluded), and its
peak RSS; and the same again for an operator restarted over those FineTunes (kopf lists them
all at once, the largest burst it sees).

Writes bench/results/operator-scale.{json,md} and appends a row to bench/results/README.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes
import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CHART = REPO / "charts" / "finetune-operator"
OPERATOR_GROUP = "system:serviceaccounts:finetune-system"
WORKERS = 2
P99_TARGET_RATIO = 1.5
IDLE_REQUESTS_PER_SECOND_TARGET = 1.0
IDLE_RSS_TARGET_MIB = 150
# What the minimal kopf operator needs beyond the chart's RBAC (kopf's progress annotations).
BASELINE_EXTRA_RBAC = {"apiVersion": "v1", "kind": "List", "items": [
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
     "metadata": {"name": "scale-baseline-extra"},
     "rules": [{"apiGroups": ["finetune.dev"], "resources": ["finetunes"], "verbs": ["patch"]}]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
     "metadata": {"name": "scale-baseline-extra"},
     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "scale-baseline-extra"},
     "subjects": [{"kind": "Group", "name": OPERATOR_GROUP, "apiGroup": "rbac.authorization.k8s.io"}]},
]}


sys.path.insert(0, str(REPO / "tests"))
from support import load_module  # noqa: E402

cpm = load_module("finetune_tests_control_plane", REPO / "tests" / "cluster" / "control_plane.py")
oh = load_module("finetune_tests_operator_cluster", REPO / "tests" / "operator" / "test_operator_cluster.py")


def say(message: str) -> None:
    print(f"[operator-scale {time.strftime('%H:%M:%S')}] {message}", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def chart_operator_command() -> tuple[list[str], dict[str, str]]:
    """The operator container's args and literal env from the chart's rendered Deployment."""
    import helm_python as helm
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render({}, name=oh.RELEASE, namespace=oh.OPERATOR_NAMESPACE, is_install=True)
    deployment = next(doc for path, text in rendered.items() if not path.endswith("NOTES.txt")
                      for doc in yaml.safe_load_all(text)
                      if doc and doc.get("kind") == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}
    # The fieldRef values the kubelet would fill in.
    env.update(POD_ID="finetune-operator-bench", POD_NAMESPACE=oh.OPERATOR_NAMESPACE)
    return list(container.get("args") or []), env


def finetune_body(name: str) -> dict[str, Any]:
    body = oh.cpu_finetune(name, workers=WORKERS)
    body["apiVersion"], body["kind"] = "finetune.dev/v1alpha1", "FineTune"
    return body


class Process:
    """An operator subprocess with its RSS sampled every 0.5 s."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, liveness_port: int, metrics_port: int):
        self.log = log
        self.liveness = f"http://127.0.0.1:{liveness_port}/healthz"
        self.metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        self.rss_samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            try:
                text = Path(f"/proc/{self.proc.pid}/status").read_text()
            except OSError:
                return
            kib = next(int(line.split()[1]) for line in text.splitlines() if line.startswith("VmRSS:"))
            self.rss_samples.append((time.time(), kib * 1024))

    def peak_rss_mib(self, since: float = 0.0) -> float:
        return max((rss for t, rss in self.rss_samples if t >= since), default=0) / 2**20

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.liveness, timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the operator did not become live: {self.log.read_text()[-3000:]}")

    def _metrics(self) -> list[str]:
        try:
            with urllib.request.urlopen(self.metrics, timeout=5) as response:
                return response.read().decode().splitlines()
        except OSError:
            return []

    def queue_depth(self) -> float | None:
        """The FineTune operator's work queue (None: no such metric, e.g. the minimal operator)."""
        return next((float(line.split()[-1]) for line in self._metrics()
                     if line.startswith("finetune_operator_work_queue_depth ")), None)

    def reconciles(self, *handlers: str) -> float:
        """How many reconciles the FineTune operator ran, asked for by any of ``handlers`` (e.g. finetune-event)."""
        return sum(float(line.split()[-1]) for line in self._metrics()
                   if line.startswith("finetune_operator_reconcile_duration_seconds_count")
                   and any(f'handler="{handler}"' in line for handler in handlers))

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Watch:
    """The benchmark's own view: when each FineTune and each pod was first seen (ADDED)."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str):
        self.namespace = namespace
        self.finetune_seen: dict[str, float] = {}
        self.pods_seen: dict[str, dict[str, float]] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, daemon=True, args=(
                kubernetes.client.CustomObjectsApi(api).list_namespaced_custom_object,
                ("finetune.dev", "v1alpha1", namespace, "finetunes"), self._on_finetune)),
            threading.Thread(target=self._run, daemon=True, args=(
                kubernetes.client.CoreV1Api(api).list_namespaced_pod, (namespace,), self._on_pod)),
        ]
        for thread in self._threads:
            thread.start()
        time.sleep(1)  # both watches open before anything is created (an empty namespace)

    def _run(self, method, args, on_event) -> None:
        watch = kubernetes.watch.Watch()
        while not self._stop.is_set():
            for event in watch.stream(method, *args, timeout_seconds=30, _request_timeout=60):
                on_event(event["type"], event["object"], time.time())
                if self._stop.is_set():
                    break

    def _on_finetune(self, type_: str, obj: Any, now: float) -> None:
        with self.lock:
            if type_ == "ADDED":
                self.finetune_seen.setdefault(obj["metadata"]["name"], now)

    def _on_pod(self, type_: str, obj: Any, now: float) -> None:
        if type_ != "ADDED":
            return
        owner = (obj.metadata.labels or {}).get("finetune.dev/name")
        if owner:
            with self.lock:
                self.pods_seen.setdefault(owner, {}).setdefault(obj.metadata.name, now)

    def complete(self, names: list[str]) -> int:
        with self.lock:
            return sum(len(self.pods_seen.get(n, {})) >= WORKERS for n in names)

    def latencies(self, names: list[str]) -> list[float]:
        with self.lock:
            return [max(self.pods_seen[n].values()) - self.finetune_seen[n] for n in names
                    if n in self.finetune_seen and len(self.pods_seen.get(n, {})) >= WORKERS]

    def stop(self) -> None:
        self._stop.set()


def create_finetunes(api: kubernetes.client.ApiClient, namespace: str, names: list[str]) -> None:
    custom = kubernetes.client.CustomObjectsApi(api)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: custom.create_namespaced_custom_object(
            "finetune.dev", "v1alpha1", namespace, "finetunes", finetune_body(n)), names))


def wait_until(condition, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def audit_requests(events: list[dict[str, Any]], start: float, end: float) -> dict[str, int]:
    """Requests by the operator's ServiceAccount received in [start, end), by verb (watches
    apart), from the audit log's ``events`` (ControlPlane.audit_events)."""
    counts: dict[str, int] = {}
    for event in events:
        if not event["user"]["username"].startswith("system:serviceaccount:finetune-system:"):
            continue
        received = dt.datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
        if start <= received < end:
            ref = event.get("objectRef") or {}
            key = f"{event['verb']} {ref.get('resource', event.get('requestURI', ''))}"
            if ref.get("subresource"):
                key += "/" + ref["subresource"]
            code = (event.get("responseStatus") or {}).get("code", 0)
            if code >= 400:  # refused requests apart: a 409 is a write planned from a stale copy
                key += f" ({code})"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def non_watch(counts: dict[str, int]) -> int:
    return sum(n for key, n in counts.items() if not key.startswith("watch "))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def burst(cp, api, process: Process, namespace: str, count: int, timeout: float) -> dict[str, Any]:
    cp.kubectl("create", "namespace", namespace)
    watch = Watch(api, namespace)
    names = [f"ft-{i:04d}" for i in range(count)]
    # CPU seconds of the operator and of each control-plane process during the burst: on a
    # small machine they share the cores, so what one spends the others wait for.
    pids = {"operator": process.proc.pid, **{name: proc.pid for name, proc in cp.procs.items()}}
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.time()
    create_finetunes(api, namespace, names)
    created = time.time()
    done = wait_until(lambda: watch.complete(names) == count, timeout)
    finished = time.time()
    cpu_at_last_pods = {name: round(cpu_seconds(pid) - cpu_before[name], 2) for name, pid in pids.items()}
    time.sleep(10)  # what the operator still does right after (status, events)
    latencies = watch.latencies(names)
    watch.stop()
    requests = audit_requests(cp.audit_events(), started, time.time())
    result = {
        "namespace": namespace,
        "finetunes": count, "complete": len(latencies), "all_complete": done,
        "create_seconds": round(created - started, 2),
        "last_pods_after_seconds": round(finished - started, 2),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p99_s": round(percentile(latencies, 99), 3) if latencies else None,
        "latency_max_s": round(max(latencies), 3) if latencies else None,
        "api_requests": non_watch(requests),
        "api_requests_by_verb": requests,
        "cpu_seconds_to_last_pods": cpu_at_last_pods,
        "peak_rss_mib": round(process.peak_rss_mib(started), 1),
    }
    say(f"  {namespace}: p50 {result['latency_p50_s']}s p99 {result['latency_p99_s']}s, "
        f"{result['api_requests']} requests, peak RSS {result['peak_rss_mib']} MiB, CPU s {cpu_at_last_pods}")
    return result


def delete_namespace(cp, api: kubernetes.client.ApiClient, namespace: str) -> None:
    # The FineTunes and pods in one request each, then the namespace (and its Services); kubectl
    # deleting the objects one by one and waiting for each took minutes.
    started = time.monotonic()
    kubernetes.client.CustomObjectsApi(api).delete_collection_namespaced_custom_object(
        "finetune.dev", "v1alpha1", namespace, "finetunes")
    kubernetes.client.CoreV1Api(api).delete_collection_namespaced_pod(namespace)
    cp.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=300s", timeout=320)
    say(f"  deleted namespace {namespace} in {time.monotonic() - started:.0f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--finetunes", type=int, default=200, help="FineTunes in each burst (default 200)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="bursts of each operator, alternating which goes first (default 5)")
    ap.add_argument("--idle", type=int, default=1000, help="idle FineTunes for the idle phase (default 1000; 0: none)")
    ap.add_argument("--idle-seconds", type=float, default=60, help="how long the idle phase is measured")
    ap.add_argument("--timeout", type=float, default=300, help="longest wait for a burst's pods")
    ap.add_argument("--label", default="", help="what code this run measures (goes into README's table)")
    ap.add_argument("--out", type=Path, default=RESULTS / "operator-scale")
    ap.add_argument("--no-readme", action="store_true", help="do not append to bench/results/README.md")
    args = ap.parse_args(argv)

    cp = cpm.ControlPlane(audit_groups=(OPERATOR_GROUP,))
    cp.start()
    say(f"control plane up in {cp.startup_seconds:.1f}s")
    processes: list[Process] = []
    try:
        kubeconfig = oh.install_crd_and_chart_rbac(cp, namespace_flag=False)  # the chart's --all-namespaces
        cp.kubectl("apply", "-f", str(CHART / "crds" / "kopf.dev_peerings.yaml"))  # as Helm installs crds/
        api = kubernetes.config.new_client_from_config(str(cp.kubeconfig))
        api.configuration.connection_pool_maxsize = 16
        chart_args, chart_env = chart_operator_command()
        results: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                   "label": args.label, "chart_args": chart_args, "chart_env": chart_env,
                                   "finetunes": args.finetunes, "workers": WORKERS, "rounds": [],
                                   "idle_finetunes": args.idle,
                                   # The machine is shared: how busy it was (1/5/15 min) bears on every figure.
                                   "load_average_start": [round(x, 2) for x in os.getloadavg()]}
        work = Path(cp.dir)

        def start(name: str, argv: list[str], env: dict[str, str]) -> Process:
            metrics, liveness = oh.free_port(), oh.free_port()
            full_env = {**os.environ, **env, "KUBECONFIG": str(kubeconfig),
                        "FINETUNE_OPERATOR_METRICS_PORT": str(metrics)}
            process = Process([*argv, f"--liveness=http://127.0.0.1:{liveness}/healthz"], full_env,
                              work / f"{name}.log", liveness, metrics)
            processes.append(process)
            process.wait_ready()
            return process

        def start_operator(name: str) -> Process:
            return start(name, [sys.executable, "-m", "finetune_operator.main", *chart_args], chart_env)

        def burst_of(which: str, round_: int) -> dict[str, Any]:
            """One burst on a freshly started operator, alone on the control plane (each operator
            watches every namespace, so the other one is stopped), its namespace deleted after."""
            namespace = f"scale-{which}-{round_}"
            if which == "minimal":
                # kopf's create handler records its progress in annotations: the baseline needs
                # patch on FineTunes, which the FineTune operator does not have. Granted for the
                # baseline's bursts only.
                cp.kubectl("apply", "-f", "-", input=json.dumps(BASELINE_EXTRA_RBAC))
                process = start(namespace, [sys.executable, "-m", "kopf", "run", "--all-namespaces", "--standalone",
                                            str(REPO / "bench" / "minimal_operator.py")], {})
            else:
                process = start_operator(namespace)
            result = burst(cp, api, process, namespace, args.finetunes, args.timeout)
            process.stop()
            if which == "minimal":
                cp.kubectl("delete", "-f", "-", input=json.dumps(BASELINE_EXTRA_RBAC))
            delete_namespace(cp, api, namespace)
            return result

        # Rounds, each a burst of both, the order alternating: whichever goes first has a fresher
        # control plane, and one burst's p99 spreads by a third between runs on this machine.
        for round_ in range(1, args.rounds + 1):
            order = ("minimal", "operator") if round_ % 2 else ("operator", "minimal")
            say(f"round {round_} of {args.rounds}: bursts of {args.finetunes}, {order[0]} first")
            bursts = {which: burst_of(which, round_) for which in order}
            p99_min, p99_op = bursts["minimal"]["latency_p99_s"], bursts["operator"]["latency_p99_s"]
            bursts["p99_ratio"] = round(p99_op / p99_min, 2) if p99_min and p99_op else None
            bursts["first"] = order[0]
            results["rounds"].append(bursts)
            say(f"  round {round_}: p99 ratio {bursts['p99_ratio']}")

        if args.idle:
            say(f"idle: {args.idle} FineTunes, arriving in bursts of {args.finetunes}, on a fresh FineTune operator")
            operator = start_operator("operator-idle")
            create_idle_finetunes(cp, api, args)
            results["idle"] = idle_phase(cp, operator, args)
            operator.stop()
            say(f"idle: the operator restarted over the {args.idle} FineTunes")
            operator = start_operator("operator-restarted")
            results["idle_after_restart"] = idle_phase(cp, operator, args)
            operator.stop()
        results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        summarise(results)
    finally:
        for process in processes:
            if process.proc.poll() is None:
                process.stop()
        cp.stop()
    write_results(args, results)
    return 0


def create_idle_finetunes(cp, api, args: argparse.Namespace) -> None:
    """``args.idle`` FineTunes (Pending: no node), created in bursts of ``args.finetunes`` as
    runs arrive in a queue, each burst once the one before has its pods."""
    cp.kubectl("create", "namespace", "scale-idle")
    watch = Watch(api, "scale-idle")
    names = [f"idle-{i:04d}" for i in range(args.idle)]
    for start in range(0, args.idle, args.finetunes):
        create_finetunes(api, "scale-idle", names[start:start + args.finetunes])
        created = names[:start + args.finetunes]
        if not wait_until(lambda: watch.complete(created) == len(created), args.timeout):
            say(f"  only {watch.complete(names)} of {args.idle} got their pods within {args.timeout}s")
    watch.stop()


def idle_phase(cp, operator: Process, args: argparse.Namespace) -> dict[str, Any]:
    """The operator left alone for ``args.idle_seconds`` with the idle FineTunes: the requests it
    makes (watches excluded) and its peak RSS."""
    # Let the aftermath of the creation (or of a restart's first look at every FineTune) pass:
    # the operator's work queue empty for 15 s in a row (at most 5 minutes; after a burst the
    # operator frees memory 10 s after its queue drained, see runtime.FreeMemory), then measure.
    drained_from, waited_from = None, time.monotonic()
    # (After a restart the queue is empty until kopf has listed and indexed everything: first
    # wait until the operator has looked at every FineTune: one reconcile each, queued by the
    # FineTune's own event or by one of its pods', whichever kopf delivered first.)
    wait_until(lambda: operator.reconciles("finetune-event", "pod-event") >= args.idle, 300, 1)
    while time.monotonic() - waited_from < 300:
        depth = operator.queue_depth()
        drained_from = (drained_from or time.monotonic()) if depth == 0 else None
        if drained_from and time.monotonic() - drained_from >= 15:
            break
        time.sleep(1)
    wait_seconds = round(time.monotonic() - waited_from, 1)
    quiet_start = time.time()
    time.sleep(args.idle_seconds)
    quiet_end = time.time()
    time.sleep(2)  # audit events are written when the response completes
    events = cp.audit_events()
    requests = audit_requests(events, quiet_start, quiet_end)
    # Requests per 10 s of the window: a steady rate, or the tail of the creation's work?
    per_10s = [non_watch(audit_requests(events, t, min(t + 10, quiet_end)))
               for t in [quiet_start + 10 * i for i in range(int((quiet_end - quiet_start + 9.999) // 10))]]
    phases: dict[str, int] = {}
    for item in cp.get_json("finetunes", namespace="scale-idle")["items"]:
        phase = (item.get("status") or {}).get("phase", "none")
        phases[phase] = phases.get(phase, 0) + 1
    idle = {
        "finetunes": args.idle, "seconds": round(quiet_end - quiet_start, 1), "phases": phases,
        "wait_seconds": wait_seconds,
        "api_requests": non_watch(requests), "api_requests_by_verb": requests,
        "requests_per_second": round(non_watch(requests) / (quiet_end - quiet_start), 2),
        "requests_per_10s": per_10s,
        "peak_rss_mib": round(operator.peak_rss_mib(quiet_start), 1),
        "peak_rss_whole_run_mib": round(operator.peak_rss_mib(), 1),
    }
    say(f"  idle: {idle['requests_per_second']} requests/s, peak RSS {idle['peak_rss_mib']} MiB, phases {phases}")
    return idle


def summarise(r: dict[str, Any]) -> None:
    """The figures the targets are judged on: the median of the rounds' p99 ratios (and, beside
    it, the ratio of the median p99s and the worst round)."""
    ratios = [b["p99_ratio"] for b in r["rounds"] if b["p99_ratio"] is not None]
    p99 = {which: [b[which]["latency_p99_s"] for b in r["rounds"] if b[which]["latency_p99_s"] is not None]
           for which in ("minimal", "operator")}
    r["p99_ratio_median"] = round(statistics.median(ratios), 2) if ratios else None
    r["p99_ratio_worst"] = max(ratios, default=None)
    r["p99_median_s"] = {which: round(statistics.median(v), 3) if v else None for which, v in p99.items()}
    r["p99_ratio_of_medians"] = (round(r["p99_median_s"]["operator"] / r["p99_median_s"]["minimal"], 2)
                                 if all(r["p99_median_s"].values()) else None)
    r["targets"] = {
        "p99_ratio_median_le_1.5": bool(r["p99_ratio_median"] and r["p99_ratio_median"] <= P99_TARGET_RATIO),
        "all_bursts_complete": all(b[w]["all_complete"] for b in r["rounds"] for w in ("minimal", "operator")),
    }
    for phase in ("idle", "idle_after_restart"):
        if phase in r:
            r["targets"][f"{phase}_requests_per_second_le_1"] = r[phase]["requests_per_second"] <= IDLE_REQUESTS_PER_SECOND_TARGET
            r["targets"][f"{phase}_rss_le_150_mib"] = r[phase]["peak_rss_mib"] <= IDLE_RSS_TARGET_MIB


def write_results(args: argparse.Namespace, r: dict[str, Any]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    idle = r.get("idle")
    lines = [
        f"# Operator scale ({r['date']})", "",
        f"{r['label']}".strip() or "(no label)", "",
        f"Load average (1/5/15 min) at the start {r.get('load_average_start')}, at the end {r.get('load_average_end')}.", "",
        f"{len(r['rounds'])} rounds, each a burst of {r['finetunes']} FineTunes x {r['workers']} workers for each "
        "operator (freshly started, alone on the control plane; which goes first alternates); latency = "
        "FineTune ADDED -> last pod ADDED (the benchmark's own watch). CPU seconds from the burst's start to "
        "its last pods.", "",
        "| round | operator | complete | p50 s | p99 s | max s | API requests | CPU s operator / apiserver / etcd | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, b in enumerate(r["rounds"], 1):
        for which in (b["first"], "operator" if b["first"] == "minimal" else "minimal"):
            v, cpu = b[which], b[which]["cpu_seconds_to_last_pods"]
            lines.append(f"| {i} | {which} | {v['complete']}/{v['finetunes']} | {v['latency_p50_s']} | "
                         f"{v['latency_p99_s']} | {v['latency_max_s']} | {v['api_requests']} | "
                         f"{cpu.get('operator')} / {cpu.get('kube-apiserver')} / {cpu.get('etcd')} | {v['peak_rss_mib']} |")
    lines += [
        "", f"p99 ratio (finetune / minimal) by round: {[b['p99_ratio'] for b in r['rounds']]}; median "
        f"**{r['p99_ratio_median']}** (target <= {P99_TARGET_RATIO}), worst {r['p99_ratio_worst']}; "
        f"ratio of the median p99s ({r['p99_median_s']['operator']} / {r['p99_median_s']['minimal']} s) "
        f"{r['p99_ratio_of_medians']}.", "",
    ]
    for phase, what in (("idle", f"created in bursts of {r['finetunes']} on a fresh operator"),
                        ("idle_after_restart", "the operator restarted over them")):
        v = r.get(phase)
        if not v:
            continue
        lines += [
            f"Idle, {what}: {v['finetunes']} FineTunes {v['phases']}, {v['seconds']} s: **{v['requests_per_second']} "
            f"requests/s** beyond watches (target <= {IDLE_REQUESTS_PER_SECOND_TARGET}), peak RSS **{v['peak_rss_mib']} MiB** "
            f"(target <= {IDLE_RSS_TARGET_MIB}; whole run {v['peak_rss_whole_run_mib']} MiB). Measured after the "
            f"operator's work queue had been empty for 15 s ({v['wait_seconds']} s after the last pods or the start); "
            f"requests per 10 s of the window: {v['requests_per_10s']}; by verb: "
            + (", ".join(f"`{k}` {n}" for k, n in v["api_requests_by_verb"].items()) or "none") + ".", "",
        ]
    lines += ["Requests by verb (the first round's bursts):", ""]
    for which in ("minimal", "operator"):
        lines.append(f"- {which}: " + ", ".join(f"`{k}` {n}" for k, n in
                                                 r["rounds"][0][which]["api_requests_by_verb"].items()))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if not args.no_readme:
        readme = RESULTS / "README.md"
        text = readme.read_text()
        header = "## Operator scale runs"
        if header not in text:
            text += (f"\n{header}\n\n`operator-scale.{{json,md}}` hold the latest `bench/operator_scale.py` run. "
                     "Every run:\n\n| date (UTC) | code | N | minimal p50 / p99 s | finetune p50 / p99 s | p99 ratio | "
                     "burst requests (minimal / finetune) | idle FineTunes | idle req/s | idle peak RSS MiB |\n"
                     "|---|---|---|---|---|---|---|---|---|---|\n")
        median = {which: (statistics.median(b[which]["latency_p50_s"] for b in r["rounds"]),
                          r["p99_median_s"][which]) for which in ("minimal", "operator")}
        ratios = ", ".join(str(b["p99_ratio"]) for b in r["rounds"])
        row = (f"| {r['date']} | {r['label']} | {r['finetunes']} x {len(r['rounds'])} rounds | "
               f"{median['minimal'][0]} / {median['minimal'][1]} (medians) | "
               f"{median['operator'][0]} / {median['operator'][1]} (medians) | "
               f"median {r['p99_ratio_median']} ({ratios}) | {r['rounds'][0]['minimal']['api_requests']} / "
               f"{r['rounds'][0]['operator']['api_requests']} | "
               + (f"{idle['finetunes']} | {idle['requests_per_second']} | {idle['peak_rss_mib']}"
                  + (f" (restarted: {r['idle_after_restart']['requests_per_second']} req/s, "
                     f"{r['idle_after_restart']['peak_rss_mib']} MiB)" if r.get("idle_after_restart") else "") + " |"
                  if idle else "- | - | - |"))
        # Right after the table's last row (other sections may follow it).
        lines = text.rstrip("\n").split("\n")
        at = next(i for i, line in enumerate(lines) if line == header)
        while at + 1 < len(lines) and not lines[at + 1].startswith("|"):
            at += 1
        while at + 1 < len(lines) and lines[at + 1].startswith("|"):
            at += 1
        lines.insert(at + 1, row)
        readme.write_text("\n".join(lines) + "\n")
    say(f"wrote {args.out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    sys.exit(main())
