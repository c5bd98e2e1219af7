"""The chart's monitoring assets against a real Prometheus 2.42 and promtool, no cluster.

* promtool accepts the alert rules (the file and the chart's rendered PrometheusRule) and the
  config that tests/e2e/prometheus.py writes; promtool unit-tests the alerts
  (tests/e2e/prom_alerts_test.yaml).
* The PodMonitor-equivalent service discovery selects and relabels the pods the operator
  really builds (finetune_operator.manifests) as the chart's PodMonitor says.
* A real Prometheus scrapes a real `finetune train` run (rank 0's endpoint) and the
  operator's real metrics (finetune_operator.metrics served by prometheus_client); the values
  match the run's results.csv / metrics.json, every series carries the chart's labels, every
  dashboard panel query is valid PromQL and returns data, and the alert rules evaluate.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import prometheus as prom
from finetune_operator import manifests

HERE = Path(__file__).resolve().parent
RULE_TESTS = HERE / "prom_alerts_test.yaml"
OPERATOR_METRICS_HELPER = HERE / "prom_operator_metrics.py"

FINETUNE = "prom-test"
NAMESPACE = "prom-ns"
OTHER = "other-run"  # a second FineTune only the operator knows (Running, mAP regressed)
EPOCHS = 3
SCRAPE_INTERVAL = "200ms"  # the run's endpoint lives ~2 s; sub-second scrapes catch epochs
GPU_ONLY = {"finetune_gpu_memory_allocated_bytes", "finetune_gpu_memory_reserved_bytes",
            "finetune_gpu_memory_peak_bytes", "finetune_gpu_utilization_ratio"}


# ------------------------------------------------------------------------------ helpers
def assert_promtool_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"{' '.join(proc.args)} (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def worker_pods(name: str, namespace: str, workers: int = 2) -> list[dict]:
    """The pods the operator builds for a FineTune, with the status a kubelet would report."""
    spec = {"model": {"architecture": "yolov5n"}, "workers": workers,
            "dataset": {"config": "d.yaml", "volume": {"emptyDir": {}}}}
    owner = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTune",
             "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"}}
    pods = [manifests.build_worker_pod(name, namespace, spec, i, owner) for i in range(workers)]
    for i, pod in enumerate(pods):
        pod["metadata"]["uid"] = f"{name}-pod-{i}"
        pod["spec"]["nodeName"] = "node-0"
        pod["status"] = {"phase": "Running", "podIP": f"10.244.0.{10 + i}", "hostIP": "10.250.0.1",
                         "conditions": [{"type": "Ready", "status": "True"}]}
    return pods


def metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(re.findall(r"\bfinetune_[a-zA-Z0-9_:]*", without_strings))


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


# ------------------------------------------------------------------------------ promtool
@pytest.fixture(scope="module")
def installed():
    try:
        return prom.ensure_prometheus_installed()
    except prom.PrometheusError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.mark.slow
def test_promtool_checks_the_alert_rules_file(installed):
    proc = prom.promtool("check", "rules", prom.RULES_FILE)
    assert_promtool_ok(proc)
    assert "SUCCESS: 6 rules found" in proc.stdout


@pytest.mark.slow
def test_promtool_checks_the_rendered_prometheus_rule(installed, tmp_path):
    extra = {"team": "ml-platform", "severity_override": "no"}
    rule = prom.chart_prometheus_rule({"prometheusRule": {"additionalRuleLabels": extra}})
    path = tmp_path / "rendered-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    assert_promtool_ok(prom.promtool("check", "rules", path))
    # The same rules as the file, each with the extra labels merged in.
    source = yaml.safe_load(prom.RULES_FILE.read_text())["groups"]
    rendered = rule["spec"]["groups"]
    assert [g["name"] for g in rendered] == [g["name"] for g in source]
    for src_group, out_group in zip(source, rendered):
        for src, out in zip(src_group["rules"], out_group["rules"], strict=True):
            assert out["expr"] == src["expr"] and out["annotations"] == src["annotations"]
            assert out["labels"] == {**src.get("labels", {}), **extra}


@pytest.mark.slow
def test_promtool_checks_the_prometheus_server_config(installed, tmp_path):
    with prom.HttpServiceDiscovery() as sd:
        server = prom.PrometheusServer(sd, workdir=tmp_path)
        path = server.write_config(tmp_path / "prometheus.yml")
    proc = prom.promtool("check", "config", path)
    assert_promtool_ok(proc)
    assert "SUCCESS: 6 rules found" in proc.stdout
    config = yaml.safe_load(path.read_text())
    assert all(job["honor_labels"] for job in config["scrape_configs"])
    assert config["rule_files"] == [str(prom.RULES_FILE)]


@pytest.mark.slow
def test_promtool_unit_tests_of_the_alerts(installed):
    proc = prom.promtool("test", "rules", RULE_TESTS.name, cwd=HERE)
    assert_promtool_ok(proc)
    assert "SUCCESS" in proc.stdout
    # Every alert of the chart has a unit test.
    alerts = {r["alert"] for g in yaml.safe_load(prom.RULES_FILE.read_text())["groups"] for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for t in case.get("alert_rule_test", [])}
    assert alerts <= tested, f"alerts without a promtool test: {sorted(alerts - tested)}"


# ------------------------------------------------------------------------------ SD, no processes
def test_pod_monitor_targets_follow_the_chart():
    pods = worker_pods("ft1", "team-a", workers=2) + worker_pods("ft2", "team-b", workers=1)
    finished = worker_pods("ft3", "team-a", workers=1)
    finished[0]["status"]["phase"] = "Succeeded"
    pending = worker_pods("ft4", "team-a", workers=1)
    pending[0]["status"] = {"phase": "Pending"}  # no podIP yet
    stranger = worker_pods("ft5", "team-a", workers=1)
    stranger[0]["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "someone-else"
    groups = prom.targets_from_pods({"items": pods + finished + pending + stranger})
    by_pod = {g["labels"]["pod"]: g for g in groups}
    # Only worker 0 (rank 0) of running FineTunes of the operator, on the port named metrics.
    assert sorted(by_pod) == ["ft1-worker-0", "ft2-worker-0"]
    g = by_pod["ft1-worker-0"]
    assert g["targets"] == [f"10.244.0.10:{manifests.METRICS_PORT}"]
    assert g["labels"] == {"job": manifests.TRAINER_APP, "namespace": "team-a", "pod": "ft1-worker-0",
                           "finetune": "ft1", "container": "trainer", "endpoint": "metrics",
                           "__metrics_path__": "/metrics"}
    assert by_pod["ft2-worker-0"]["labels"]["namespace"] == "team-b"
    # Namespaced mode: the chart's namespaceSelector lists the watched namespaces.
    monitor = prom.chart_pod_monitor({"watchNamespaces": ["team-b"]})
    assert [g["labels"]["pod"] for g in prom.targets_from_pods(pods, monitor)] == ["ft2-worker-0"]
    # Extra relabelings from values are applied after the chart's.
    monitor = prom.chart_pod_monitor({"podMonitor": {"relabelings": [
        {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}]}})
    assert {g["labels"]["node"] for g in prom.targets_from_pods(pods, monitor)} == {"node-0"}
    # address_for maps a pod to where it really listens (None leaves it out).
    mapped = prom.targets_from_pods(pods, address_for=lambda pod, port: (
        f"127.0.0.1:{port + 1}" if pod["metadata"]["name"] == "ft1-worker-0" else None))
    assert [g["targets"] for g in mapped] == [[f"127.0.0.1:{manifests.METRICS_PORT + 1}"]]


def test_operator_target_labels_follow_the_service_monitor():
    labels = prom.chart_operator_target_labels()
    # FineTuneOperatorDown keys on job="finetune-operator".
    assert labels["job"] == "finetune-operator"
    assert 'up{job="finetune-operator"}' in prom.RULES_FILE.read_text()
    assert labels["endpoint"] == "http-metrics"


def test_relabel_follows_prometheus_semantics():
    configs = [
        {"source_labels": ["a", "b"], "regex": "x;(.*)", "target_label": "c", "replacement": "got-${1}"},
        {"source_labels": ["missing"], "target_label": "a"},  # empty result deletes the label
        {"action": "labelmap", "regex": "__meta_(.+)"},
    ]
    assert prom.relabel({"a": "x", "b": "y", "__meta_zone": "z"}, configs) == {
        "b": "y", "c": "got-y", "__meta_zone": "z", "zone": "z"}
    assert prom.relabel({"a": "1"}, [{"action": "keep", "source_labels": ["a"], "regex": "2"}]) is None


def test_dashboard_queries_cover_every_target_and_substitute_variables():
    dashboard = json.loads(prom.DASHBOARD.read_text())

    def count(panels):
        return sum(len([t for t in p.get("targets", []) if t.get("expr")]) + count(p.get("panels", []))
                   for p in panels)

    queries = prom.dashboard_queries()
    assert len(queries) == count(dashboard["panels"]) > 0
    for title, expr in queries:
        assert "$" not in expr and "[[" not in expr, (title, expr)
    named = prom.dashboard_queries(variables={"finetune": FINETUNE, "namespace": NAMESPACE})
    assert any(f'finetune=~"{FINETUNE}"' in expr for _, expr in named)
    with pytest.raises(prom.PrometheusError, match="unknown Grafana variable"):
        bad = dict(dashboard, panels=[{"title": "x", "targets": [{"expr": "up{a=\"$nope\"}"}]}])
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"prom-dash-{os.getpid()}.json"
        path.write_text(json.dumps(bad))
        try:
            prom.dashboard_queries(path)
        finally:
            path.unlink()


# ------------------------------------------------------------------------------ a real scrape
class ScrapedRun:
    """What the module fixture ran: Prometheus, the run's files and time window."""

    def __init__(self, server: prom.PrometheusServer, run_dir: Path, started: float, trainer_port: int,
                 operator_port: int):
        self.server = server
        self.run_dir = run_dir
        self.started = started
        self.trainer_port = trainer_port
        self.operator_port = operator_port
        self.summary = json.loads((run_dir / "metrics.json").read_text())
        with open(run_dir / "results.csv") as f:
            self.rows = {int(r["epoch"]): r for r in csv.DictReader(f)}

    def last(self, metric: str, selector: str = f'finetune="{FINETUNE}"') -> list[dict]:
        return self.server.query(f"last_over_time({metric}{{{selector}}}[10m])")

    def last_value(self, metric: str, selector: str = f'finetune="{FINETUNE}"') -> float | None:
        return self.server.query_value(f"last_over_time({metric}{{{selector}}}[10m])")


def _operator_state(summary: dict) -> dict:
    """FineTune statuses as the operator would hold them after the run (status.metrics from the
    last epoch, status.bestMetrics from the best one)."""
    final, best = summary["final"], summary["best"]
    return {
        "finetunes": [
            {"namespace": NAMESPACE, "name": FINETUNE, "status": {
                "phase": "Succeeded",
                "metrics": {"map50": final["metrics/mAP_0.5"], "map50_95": final["metrics/mAP_0.5:0.95"],
                            "gpuMemoryPeakBytes": final["memory_peak_bytes"]},
                "bestMetrics": {"map50": best["map50"], "map50_95": best["map50_95"]}}},
            {"namespace": NAMESPACE, "name": OTHER, "status": {
                "phase": "Running",
                "metrics": {"map50": 0.3, "map50_95": 0.2},
                "bestMetrics": {"map50": 0.5, "map50_95": 0.4}}},
        ],
        "transitions": {"created": 2, "succeeded": 1, "failed": 1, "restarts": 2},
        "handlers": {"create": 2, "pod_event": 3},
    }


@pytest.fixture(scope="module")
def scraped_run(installed, tmp_path_factory):
    work = tmp_path_factory.mktemp("prom-run")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    synth = subprocess.run([sys.executable, "-m", "finetune.cli", "synth", "--out", str(work / "data"),
                            "--train", "16", "--val", "4", "--imgsz", "96"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert synth.returncode == 0, synth.stderr
    trainer_port, operator_port = prom.free_port(), prom.free_port()
    operator = None
    with prom.HttpServiceDiscovery() as sd, prom.PrometheusServer(sd, scrape_interval=SCRAPE_INTERVAL) as server:
        try:
            # Worker 0 of the pods the operator builds, as the chart's PodMonitor selects it,
            # "running" on loopback where the trainer below listens.
            pods = worker_pods(FINETUNE, NAMESPACE, workers=2)
            sd.set_targets(prom.TRAINERS, prom.targets_from_pods(pods, address_for=lambda pod, port: (
                f"127.0.0.1:{trainer_port}" if port == manifests.METRICS_PORT else None)))
            _wait_target_listed(server, manifests.TRAINER_APP)
            started = time.time()
            run_dir = work / "run"
            train = subprocess.run(
                [sys.executable, "-m", "finetune.cli", "train", "--data", str(work / "data" / "data.yaml"),
                 "--model", "yolov5n", "--epochs", str(EPOCHS), "--batch", "4", "--imgsz", "64",
                 "--workers", "0", "--metrics-port", str(trainer_port), "--hyp", "warmup_epochs=0",
                 "--device", "cpu", "--out", str(run_dir)],
                capture_output=True, text=True, env={**env, "FINETUNE_NAME": FINETUNE}, timeout=600,
                preexec_fn=prom.teardown.die_with_parent)
            assert train.returncode == 0, f"finetune train failed:\n{train.stdout}\n{train.stderr}"

            # The operator's metrics for the same FineTune, served as finetune-operator serves them.
            state = work / "operator-state.json"
            state.write_text(json.dumps(_operator_state(json.loads((run_dir / "metrics.json").read_text()))))
            operator = subprocess.Popen(
                [sys.executable, str(OPERATOR_METRICS_HELPER), "--port", str(operator_port), "--state", str(state)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                preexec_fn=prom.teardown.die_with_parent)
            assert operator.stdout.readline().strip() == "ready", "operator metrics helper did not start"
            sd.set_operator(f"127.0.0.1:{operator_port}")
            server.wait_for_targets("finetune-operator", health="up", timeout=60)
            # Two scrapes after the first one, so that rules have evaluated on its data.
            server.wait_for('count_over_time(up{job="finetune-operator"}[1m]) >= 3', timeout=60)
            yield ScrapedRun(server, run_dir, started, trainer_port, operator_port)
        finally:
            if operator is not None:
                operator.terminate()
                try:
                    operator.wait(10)
                except subprocess.TimeoutExpired:
                    operator.kill()
                    operator.wait()


def _wait_target_listed(server: prom.PrometheusServer, job: str, timeout: float = 30) -> None:
    """Until service discovery has handed Prometheus the target (before the trainer starts)."""
    deadline = time.monotonic() + timeout
    while not server.targets(job):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {job} target after {timeout}s: {server.targets()}")
        time.sleep(0.1)


@pytest.mark.slow
def test_trainer_metrics_are_scraped_with_the_chart_labels_and_the_run_values(scraped_run):
    run = scraped_run
    epoch = run.last_value("finetune_epoch")
    assert epoch is not None, f"no trainer sample was scraped; targets {run.server.targets()}"
    epoch = int(epoch)
    assert 1 <= epoch <= EPOCHS, f"the last scraped epoch is {epoch}: no completed epoch was scraped"

    # One series per metric, with the trainer's labels and the PodMonitor's.
    (series,) = run.last("finetune_map50")
    series["metric"].pop("__name__", None)  # Prometheus 2.42's last_over_time keeps it
    assert series["metric"] == {
        "finetune": FINETUNE, "rank": "0", "namespace": NAMESPACE, "pod": f"{FINETUNE}-worker-0",
        "job": manifests.TRAINER_APP, "container": "trainer", "endpoint": "metrics",
        "instance": f"127.0.0.1:{run.trainer_port}",
    }

    # Gauges set once per epoch (at its end) hold the last scraped epoch's values, as
    # results.csv (6 significant digits) recorded them.
    row = run.rows[epoch]
    per_epoch = {
        "finetune_map50": row["metrics/mAP_0.5"], "finetune_map50_95": row["metrics/mAP_0.5:0.95"],
        "finetune_precision": row["metrics/precision"], "finetune_recall": row["metrics/recall"],
        "finetune_cpu_memory_peak_bytes": row["memory_peak_bytes"],
    }
    for metric, value in per_epoch.items():
        got = run.last_value(metric)
        assert got is not None and close(got, float(value)), f"{metric}: scraped {got}, epoch {epoch}: {value}"
    assert run.last_value("finetune_epochs_total") == EPOCHS
    assert run.last_value("finetune_frozen_parameters") == run.summary["frozen_parameters"]
    assert run.last_value("finetune_trainable_parameters") == run.summary["trainable_parameters"]

    # Loss and throughput are live within an epoch (running means of the epoch under way);
    # once the last epoch has ended nothing changes them, so when that state was scraped they
    # equal its results.csv row (and metrics.json, unrounded).
    live = {f"train/{c}_loss": run.last_value("finetune_train_loss", f'finetune="{FINETUNE}", component="{c}"')
            for c in ("box", "obj", "cls")}
    live["images_per_second"] = run.last_value("finetune_images_per_second")
    for key, got in live.items():
        assert got is not None and math.isfinite(got) and got > 0, (key, got)
        if epoch == EPOCHS:
            assert close(got, float(row[key])), (key, got, row[key])
            assert close(got, run.summary["final"][key], 1e-12), (key, got)
    # Every scrape saw one consistent run: the epoch never goes backwards, never past the total.
    ((_, epochs),) = run.server.samples(f'finetune_epoch{{finetune="{FINETUNE}"}}', "10m")
    values = [v for _, v in epochs]
    assert values == sorted(values) and values[-1] == epoch, values
    # CPU run: no GPU series.
    assert run.last("finetune_gpu_memory_peak_bytes") == []
    # Rank 0's endpoint went away with the run: the target is down now, its series stale.
    run.server.wait_for(f'up{{job="{manifests.TRAINER_APP}"}} == 0', timeout=30)
    assert run.server.query(f'finetune_epoch{{finetune="{FINETUNE}"}}') == []


@pytest.mark.slow
def test_operator_metrics_are_scraped_as_the_service_monitor_labels_them(scraped_run):
    run, server = scraped_run, scraped_run.server
    best = server.query(f'finetune_operator_best_map50_95{{namespace="{NAMESPACE}", finetune="{FINETUNE}"}}')
    assert len(best) == 1, best
    labels = best[0]["metric"]
    # honor_labels keeps the operator's per-FineTune namespace (not the operator's own, ml-platform).
    assert labels["namespace"] == NAMESPACE and labels["job"] == "finetune-operator"
    assert labels["instance"] == f"127.0.0.1:{run.operator_port}"
    assert close(float(best[0]["value"][1]), run.summary["best"]["map50_95"], 1e-9)
    assert close(server.query_value(f'finetune_operator_best_map50{{finetune="{FINETUNE}"}}'),
                 run.summary["best"]["map50"], 1e-9)
    assert close(server.query_value(f'finetune_operator_map50_95{{finetune="{FINETUNE}"}}'),
                 run.summary["final"]["metrics/mAP_0.5:0.95"], 1e-9)
    assert server.query_value(f'finetune_operator_gpu_memory_peak_bytes{{finetune="{FINETUNE}"}}') == \
        run.summary["final"]["memory_peak_bytes"]
    # Series without a namespace of their own get the ServiceMonitor's target namespace.
    phases = {r["metric"]["phase"]: float(r["value"][1]) for r in server.query("finetune_operator_finetunes")}
    assert phases == {"Pending": 0, "Running": 1, "Restarting": 0, "Succeeded": 1, "Failed": 0, "Suspended": 0}
    assert {r["metric"]["namespace"] for r in server.query("finetune_operator_finetunes")} == {
        prom.RELEASE_NAMESPACE}
    for counter, value in {"created": 2, "succeeded": 1, "failed": 1, "restarts": 2}.items():
        assert server.query_value(f"finetune_operator_{counter}_total") == value, counter
    assert server.query_value('sum(finetune_operator_reconcile_duration_seconds_count{handler="status"})') == 2
    # FineTuneOperatorDown's expression is empty while the operator is up.
    assert server.query('absent(up{job="finetune-operator"} == 1)') == []


@pytest.mark.slow
def test_every_dashboard_query_is_valid_and_returns_data(scraped_run):
    run, server = scraped_run, scraped_run.server
    end = time.time()
    # Grafana's template variables resolve to the test run.
    dashboard = json.loads(prom.DASHBOARD.read_text())
    for var in dashboard["templating"]["list"]:
        if var.get("type") != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
        assert match, var["definition"]
        selector = match.group(1).replace("$namespace", ".*").replace("$finetune", ".*")
        values = server.label_values(match.group(2), [selector], start=run.started - 60, end=end)
        assert {"namespace": NAMESPACE, "finetune": FINETUNE}[var["name"]] in values, (var["name"], values)

    empty = []
    for variables in (None, {"namespace": NAMESPACE, "finetune": FINETUNE}):
        for target in prom.dashboard_targets(variables=variables):
            title, expr = target["title"], target["expr"]
            server.query(expr)  # raises PrometheusQueryError on invalid PromQL
            # Over the run's window, as Grafana's time range would cover it (instant panels
            # would be evaluated while the run is live; rank 0's endpoint is gone by now).
            result = server.query_range(expr, run.started - 5, end, step=0.2)
            names = metric_names(expr)
            if names and names <= GPU_ONLY:
                continue  # a CPU run exports no GPU series
            if not result or not any(r["values"] for r in result):
                empty.append(f"{title}: {expr}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


@pytest.mark.slow
def test_alert_rules_are_loaded_and_evaluate_on_the_scraped_series(scraped_run):
    server = scraped_run.server
    deadline = time.monotonic() + 30
    while True:  # health is "unknown" until a rule's group has evaluated once
        rules = {r["name"]: r for g in server.rules() for r in g["rules"]}
        if all(r["health"] != "unknown" for r in rules.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(rules) == 6
    assert all(r["health"] == "ok" for r in rules.values()), {n: r.get("lastError") for n, r in rules.items()}
    # The operator reports OTHER Running with mAP 50% below its best and no trainer metrics:
    # FineTuneMapRegressed and FineTuneMetricsAbsent are pending (they need 30m / 15m to fire).
    pending = server.wait_for('ALERTS{alertstate="pending"}', lambda r: len(r) >= 2, timeout=30)
    by_name = {r["metric"]["alertname"]: r["metric"] for r in pending}
    assert by_name["FineTuneMapRegressed"]["finetune"] == OTHER
    assert by_name["FineTuneMapRegressed"]["namespace"] == NAMESPACE
    assert "FineTuneMetricsAbsent" in by_name
    # FineTuneOperatorDown was pending while no operator target existed (before the helper
    # started) and may be again after a single slow scrape on a loaded machine; it must clear
    # once the operator is scraped, and never fire (for: 10m).
    def operator_down() -> list[dict]:
        return [a for a in server.alerts() if a["labels"]["alertname"] == "FineTuneOperatorDown"]
    deadline = time.monotonic() + 30
    while operator_down() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert operator_down() == [], (operator_down(), server.targets("finetune-operator"))
