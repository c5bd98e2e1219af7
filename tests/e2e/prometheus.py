"""A real Prometheus (Debian's 2.42 ``/usr/bin/prometheus``) for end-to-end tests.

Everything listens on 127.0.0.1 on random free ports; every process is stopped at the end
(also on Ctrl-C, SIGTERM/SIGHUP, and - via PR_SET_PDEATHSIG - when pytest is SIGKILLed).
Debian builds Prometheus without ``kubernetes_sd_configs``, so targets come from a tiny
HTTP service discovery server (``http_sd_configs``) that the tests fill in, either by hand or
from the test control plane's pods, selected and relabelled exactly as the chart's
PodMonitor / ServiceMonitor (rendered with helm_python) tell the Prometheus Operator to.

API
---
``ensure_prometheus_installed() -> (prometheus, promtool)``
    ``apt-get install prometheus`` when missing (idempotent, root only); the Debian service it
    installs is stopped and disabled. Raises :class:`PrometheusError` with a readable message.

``HttpServiceDiscovery()`` (context manager; ``start()``/``stop()``)
    Serves ``GET /<key>`` -> http_sd JSON ``[{"targets": ["host:port"], "labels": {...}}]``.
    Keys: ``TRAINERS`` ("trainers") and ``OPERATOR`` ("operator") are what
    :class:`PrometheusServer` scrapes. ``url(key)``, ``set_targets(key, groups)``,
    ``add_target(key, address, labels)``, ``groups(key)``, ``requests(key)`` (fetch count),
    ``set_provider(key, fn)`` (``fn() -> groups`` called on every fetch; an exception keeps
    the previous answer), ``set_operator(address, namespace=...)`` (the operator's
    ``127.0.0.1:<port>`` with the labels of the chart's ServiceMonitor: ``job="finetune-operator"``),
    ``refresh_from_control_plane(control_plane, address_for=None)`` (lists pods with kubectl once),
    ``follow_control_plane(control_plane, address_for=None)`` (re-lists on every SD fetch).

``targets_from_pods(pods_json, pod_monitor=None, *, address_for=None, namespaces=None)``
    http_sd groups for a ``kubectl get pods -o json`` list, as the chart's PodMonitor selects
    and relabels them: matchLabels/matchExpressions selector, namespaceSelector, container port
    named ``metrics``, no Succeeded/Failed pods, a podIP; labels ``namespace``, ``pod``,
    ``finetune`` (pod label ``finetune.dev/name``), plus what the Prometheus Operator adds
    (``container``, ``endpoint``, ``job`` from the PodMonitor's jobLabel:
    ``app.kubernetes.io/name`` = ``finetune-trainer``). ``address_for(pod, port) -> "host:port"``
    overrides ``podIP:port`` (the control plane's pod IPs are fake; a node agent running the
    trainer on loopback maps them to ``127.0.0.1:<its port>``).

``chart_pod_monitor()``, ``chart_service_monitor()``, ``chart_operator_target_labels(namespace)``,
``chart_prometheus_rule()``, ``render_chart(values)``: the chart's objects (cached renders).

``PrometheusServer(sd, scrape_interval="1s", ...)`` (context manager; ``start()``/``stop()``)
    Writes ``prometheus.yml`` (jobs ``finetune-trainers`` and ``finetune-operator``, both
    ``honor_labels: true`` like the chart's monitors, http_sd refresh 1s; rule_files = the
    chart's ``rules/finetune-alerts.yaml``), runs ``/usr/bin/prometheus`` on 127.0.0.1:<free>
    with its own data dir, waits for ``/-/ready`` and prints its URL. Then:
    ``url``, ``config_path``, ``query(promql, time=None) -> list`` (vector/matrix ``result``),
    ``query_value(promql, time=None) -> float | None`` (one series or scalar; None if empty),
    ``query_range(promql, start, end, step) -> list``, ``samples(selector, window="1h")``
    (raw ``[(labels, [(ts, value), ...]), ...]``), ``label_values(label, match=[...])``,
    ``targets(job=None)`` (active targets of a job label or scrape pool),
    ``wait_for(promql, predicate=bool, timeout=60) -> result``, ``wait_for_targets(job, health="up")``,
    ``alerts()``, ``rules()``, ``log_tail()``. Query errors raise :class:`PrometheusQueryError`.

``dashboard_queries(path=DASHBOARD, variables=None) -> [(panel_title, expr), ...]``
    Every panel target expression of the Grafana dashboard with its template variables
    (``$namespace``, ``${finetune}``, ``$__rate_interval``, ``[[var]]``, ...) substituted:
    ``.*`` for the dashboard's query variables unless ``variables`` names values.
    ``dashboard_targets()`` gives dicts with ``title``, ``expr``, ``instant``, ``ref_id``.

``promtool(*args) -> CompletedProcess`` runs ``/usr/bin/promtool``.

Pytest fixtures (import them into a conftest: ``from prometheus import prometheus_sd,
prometheus_server`` with tests/e2e on sys.path, which pytest's default import mode provides):
``prometheus_installed`` (session), ``prometheus_sd`` (session, a started
:class:`HttpServiceDiscovery`), ``prometheus_server`` (session, a started
:class:`PrometheusServer` on ``prometheus_sd``; keep its data with FINETUNE_PROMETHEUS_KEEP=1).

Interactive: ``python tests/e2e/prometheus.py`` runs one until Ctrl-C and prints its URL.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

# The test-infra modules are loaded by path; their shared teardown registry is one module.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
import teardown  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "finetune-operator"
RULES_FILE = CHART_DIR / "rules" / "finetune-alerts.yaml"
DASHBOARD = CHART_DIR / "dashboards" / "finetune.json"
PROMETHEUS_BIN = Path(os.environ.get("FINETUNE_PROMETHEUS", "/usr/bin/prometheus"))
PROMTOOL_BIN = Path(os.environ.get("FINETUNE_PROMTOOL", "/usr/bin/promtool"))

# http_sd keys (URL paths) and the scrape jobs that read them.
TRAINERS = "trainers"
OPERATOR = "operator"
TRAINER_JOB = "finetune-trainers"  # job_name; targets carry their own `job` label (jobLabel)
OPERATOR_JOB = "finetune-operator"

# What the chart is rendered with to read its monitors (the e2e tests' release).
RELEASE = "ft"
RELEASE_NAMESPACE = "ml-platform"

Groups = list[dict[str, Any]]


class PrometheusError(RuntimeError):
    pass


class PrometheusQueryError(PrometheusError):
    pass


# ------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


# ------------------------------------------------------------------------------ install
def ensure_prometheus_installed() -> tuple[Path, Path]:
    """Install Debian's `prometheus` package when /usr/bin/prometheus or promtool is missing.

    Idempotent and serialised with a file lock. The package's systemd service is stopped and
    disabled afterwards (tests run their own binary on their own port and data dir anyway).
    """
    def present() -> bool:
        return all(p.is_file() and os.access(p, os.X_OK) for p in (PROMETHEUS_BIN, PROMTOOL_BIN))

    if present():
        return PROMETHEUS_BIN, PROMTOOL_BIN
    if os.geteuid() != 0:
        raise PrometheusError(f"{PROMETHEUS_BIN} / {PROMTOOL_BIN} missing and not root: "
                              "run `sudo apt-get install -y prometheus` (Debian bookworm: 2.42)")
    if not shutil.which("apt-get"):
        raise PrometheusError(f"{PROMETHEUS_BIN} missing and no apt-get: install Prometheus 2.x and "
                              "set FINETUNE_PROMETHEUS / FINETUNE_PROMTOOL")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with open(Path(tempfile.gettempdir()) / "finetune-prometheus-apt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not present():
            cmd = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:  # stale package lists: update once and retry
                subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0 or not present():
                raise PrometheusError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                                      + (proc.stdout + proc.stderr)[-3000:])
            _disable_packaged_service()
    return PROMETHEUS_BIN, PROMTOOL_BIN


def _disable_packaged_service() -> None:
    """Best effort: the Debian package enables (and, under systemd, starts) prometheus.service."""
    if shutil.which("systemctl"):
        subprocess.run(["systemctl", "disable", "--now", "prometheus.service"], capture_output=True)
    elif Path("/etc/init.d/prometheus").exists():
        subprocess.run(["/etc/init.d/prometheus", "stop"], capture_output=True)


def promtool(*args: str | os.PathLike, cwd: str | os.PathLike | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess:
    ensure_prometheus_installed()
    return subprocess.run([str(PROMTOOL_BIN), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


# ------------------------------------------------------------------------------ the chart
@functools.lru_cache(maxsize=None)
def _render_cached(values_json: str, namespace: str) -> tuple[dict, ...]:
    import helm_python as helm  # dev extra

    with helm.Chart.load(CHART_DIR) as chart:
        manifests = chart.render(json.loads(values_json), name=RELEASE, namespace=namespace,
                                 is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if isinstance(doc, dict))
    return tuple(objects)


def render_chart(values: Mapping[str, Any] | None = None, namespace: str = RELEASE_NAMESPACE) -> list[dict]:
    """All objects of the chart rendered with `values` (a deep copy: safe to modify)."""
    objects = _render_cached(json.dumps(values or {}, sort_keys=True), namespace)
    return json.loads(json.dumps(list(objects)))


def _one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o.get("kind") == kind]
    if len(found) != 1:
        raise PrometheusError(f"chart rendered {len(found)} {kind} objects, expected one")
    return found[0]


def chart_pod_monitor(values: Mapping[str, Any] | None = None) -> dict:
    """The chart's PodMonitor (podMonitor.enabled=true plus `values`)."""
    merged = {**(values or {}), "podMonitor": {**(values or {}).get("podMonitor", {}), "enabled": True}}
    return _one(render_chart(merged), "PodMonitor")


def chart_service_monitor(values: Mapping[str, Any] | None = None) -> dict:
    merged = {**(values or {}), "serviceMonitor": {**(values or {}).get("serviceMonitor", {}), "enabled": True}}
    return _one(render_chart(merged), "ServiceMonitor")


def chart_prometheus_rule(values: Mapping[str, Any] | None = None) -> dict:
    merged = {**(values or {}), "prometheusRule": {**(values or {}).get("prometheusRule", {}), "enabled": True}}
    return _one(render_chart(merged), "PrometheusRule")


def chart_operator_target_labels(namespace: str | None = None) -> dict[str, str]:
    """Target labels the Prometheus Operator gives the operator's endpoint via the chart's
    ServiceMonitor: job from `jobLabel` (the Service's app.kubernetes.io/name), namespace,
    service, endpoint (the port name)."""
    objects = render_chart({"serviceMonitor": {"enabled": True}}, namespace or RELEASE_NAMESPACE)
    monitor = _one(objects, "ServiceMonitor")
    selector = monitor["spec"]["selector"].get("matchLabels", {})
    services = [o for o in objects if o["kind"] == "Service"
                and all(o["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())]
    if len(services) != 1:
        raise PrometheusError(f"the chart's ServiceMonitor selects {len(services)} Services, expected one")
    service = services[0]
    endpoint = monitor["spec"]["endpoints"][0]
    job = service["metadata"]["name"]  # the Prometheus Operator's default without jobLabel
    job_label = monitor["spec"].get("jobLabel")
    if job_label and service["metadata"].get("labels", {}).get(job_label):
        job = service["metadata"]["labels"][job_label]
    return {"job": job, "namespace": service["metadata"]["namespace"],
            "service": service["metadata"]["name"], "endpoint": str(endpoint.get("port", ""))}


# ------------------------------------------------------------------------------ relabelling
_GO_TEMPLATE_REF = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def _expand(match: re.Match, replacement: str) -> str:
    def sub(m: re.Match) -> str:
        ref = m.group(1) or m.group(2)
        try:
            value = match.group(int(ref)) if ref.isdigit() else match.group(ref)
        except IndexError:  # Go expands an unknown group to ""
            value = ""
        return value or ""

    return _GO_TEMPLATE_REF.sub(sub, replacement)


def relabel(labels: Mapping[str, str], configs: Iterable[Mapping[str, Any]]) -> dict[str, str] | None:
    """Prometheus relabelling (replace/keep/drop/labelmap/labeldrop/labelkeep/lowercase/uppercase/
    hashmod) of one label set; configs in Prometheus (snake_case) or Prometheus Operator
    (camelCase) spelling. Returns None when the target is dropped."""
    out = dict(labels)
    for cfg in configs:
        get = lambda snake, camel, default=None: cfg.get(snake, cfg.get(camel, default))  # noqa: E731
        action = str(get("action", "action", "replace")).lower()
        regex = re.compile(f"^(?:{get('regex', 'regex', '(.*)')})$")
        separator = get("separator", "separator", ";")
        sources = get("source_labels", "sourceLabels", []) or []
        target = get("target_label", "targetLabel")
        replacement = str(get("replacement", "replacement", "$1"))
        value = separator.join(out.get(s, "") for s in sources)
        if action == "replace":
            m = regex.match(value)
            if m:
                result = _expand(m, replacement)
                target_name = _expand(m, target) if target else target
                if not result:
                    out.pop(target_name, None)
                else:
                    out[target_name] = result
        elif action == "keep":
            if not regex.match(value):
                return None
        elif action == "drop":
            if regex.match(value):
                return None
        elif action in ("lowercase", "uppercase"):
            out[target] = value.lower() if action == "lowercase" else value.upper()
        elif action == "hashmod":
            import hashlib

            digest = hashlib.md5(value.encode()).digest()
            out[target] = str(int.from_bytes(digest[8:], "big") % int(get("modulus", "modulus")))
        elif action == "labelmap":
            for name, val in list(out.items()):
                m = regex.match(name)
                if m:
                    out[_expand(m, replacement)] = val
        elif action == "labeldrop":
            out = {k: v for k, v in out.items() if not regex.match(k)}
        elif action == "labelkeep":
            out = {k: v for k, v in out.items() if regex.match(k)}
        else:
            raise PrometheusError(f"unsupported relabel action {action!r}")
    return out


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_meta_labels(pod: Mapping[str, Any], container: Mapping[str, Any], port: Mapping[str, Any] | None,
                    address: str) -> dict[str, str]:
    """The `__meta_kubernetes_pod_*` labels kubernetes_sd_configs (role: pod) gives one port."""
    md, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    labels = {
        "__address__": address,
        "__meta_kubernetes_namespace": md.get("namespace", ""),
        "__meta_kubernetes_pod_name": md.get("name", ""),
        "__meta_kubernetes_pod_ip": status.get("podIP", ""),
        "__meta_kubernetes_pod_uid": md.get("uid", ""),
        "__meta_kubernetes_pod_node_name": spec.get("nodeName", ""),
        "__meta_kubernetes_pod_host_ip": status.get("hostIP", ""),
        "__meta_kubernetes_pod_phase": status.get("phase", ""),
        "__meta_kubernetes_pod_ready": next((c.get("status", "").lower() for c in status.get("conditions") or []
                                             if c.get("type") == "Ready"), "unknown"),
        "__meta_kubernetes_pod_container_name": container.get("name", ""),
        "__meta_kubernetes_pod_container_image": container.get("image", ""),
        "__meta_kubernetes_pod_container_init": "false",
    }
    for owner in md.get("ownerReferences") or []:
        if owner.get("controller"):
            labels["__meta_kubernetes_pod_controller_kind"] = owner.get("kind", "")
            labels["__meta_kubernetes_pod_controller_name"] = owner.get("name", "")
    if port is not None:
        labels["__meta_kubernetes_pod_container_port_name"] = port.get("name", "")
        labels["__meta_kubernetes_pod_container_port_number"] = str(port.get("containerPort", ""))
        labels["__meta_kubernetes_pod_container_port_protocol"] = port.get("protocol", "TCP")
    for kind, values in (("label", md.get("labels") or {}), ("annotation", md.get("annotations") or {})):
        for key, val in values.items():
            labels[f"__meta_kubernetes_pod_{kind}_{_sanitize(key)}"] = str(val)
            labels[f"__meta_kubernetes_pod_{kind}present_{_sanitize(key)}"] = "true"
    return labels


def _selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != str(value):
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], [str(v) for v in expr.get("values") or []]
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _namespace_selected(monitor: Mapping[str, Any], namespace: str, namespaces: Iterable[str] | None) -> bool:
    if namespaces is not None:
        return namespace in set(namespaces)
    ns_selector = monitor["spec"].get("namespaceSelector") or {}
    if ns_selector.get("any"):
        return True
    names = ns_selector.get("matchNames")
    return namespace in (names or [monitor["metadata"].get("namespace")])


def pod_monitor_relabel_configs(monitor: Mapping[str, Any], endpoint_index: int = 0) -> list[dict[str, Any]]:
    """The relabel_configs the Prometheus Operator generates for one PodMonitor endpoint
    (selector keep rules, port keep rule, namespace/container/pod, jobLabel, endpoint, then
    the monitor's own relabelings), in Prometheus spelling."""
    spec = monitor["spec"]
    endpoint = spec["podMetricsEndpoints"][endpoint_index]
    md = monitor["metadata"]
    configs: list[dict[str, Any]] = [
        {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
        # filterRunning (default true): drop finished pods.
        {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
    ]
    for key, value in (spec.get("selector", {}).get("matchLabels") or {}).items():
        configs.append({"action": "keep", "regex": f"({re.escape(str(value))});true",
                        "source_labels": [f"__meta_kubernetes_pod_label_{_sanitize(key)}",
                                          f"__meta_kubernetes_pod_labelpresent_{_sanitize(key)}"]})
    if endpoint.get("port"):
        configs.append({"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                        "regex": re.escape(str(endpoint["port"]))})
    elif endpoint.get("targetPort"):
        configs.append({"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_number"],
                        "regex": str(endpoint["targetPort"])})
    configs += [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"target_label": "job", "replacement": f"{md.get('namespace')}/{md['name']}"},
    ]
    if spec.get("jobLabel"):
        configs.append({"source_labels": [f"__meta_kubernetes_pod_label_{_sanitize(spec['jobLabel'])}"],
                        "target_label": "job", "regex": "(.+)", "replacement": "${1}"})
    if endpoint.get("port"):
        configs.append({"target_label": "endpoint", "replacement": str(endpoint["port"])})
    configs += list(endpoint.get("relabelings") or [])
    return configs


def targets_from_pods(pods_json: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                      pod_monitor: Mapping[str, Any] | None = None, *,
                      address_for: Callable[[Mapping[str, Any], int], str | None] | None = None,
                      namespaces: Iterable[str] | None = None) -> Groups:
    """http_sd groups for the pods the chart's PodMonitor selects, relabelled as it says.

    `pods_json`: ``kubectl get pods -o json`` output (a List) or a list of pods.
    `namespaces` overrides the PodMonitor's namespaceSelector (the chart's default: any).
    `address_for(pod, port)` returns the address to scrape (default ``podIP:port``); None
    leaves the pod out.
    """
    monitor = pod_monitor if pod_monitor is not None else chart_pod_monitor()
    items = pods_json.get("items", []) if isinstance(pods_json, Mapping) else list(pods_json)
    spec = monitor["spec"]
    groups: Groups = []
    for index, endpoint in enumerate(spec["podMetricsEndpoints"]):
        configs = pod_monitor_relabel_configs(monitor, index)
        for pod in items:
            md, status = pod.get("metadata", {}), pod.get("status", {})
            if not _namespace_selected(monitor, md.get("namespace", ""), namespaces):
                continue
            if not _selector_matches(spec.get("selector") or {}, md.get("labels") or {}):
                continue  # also encoded in the keep rules; this skips the work early
            if md.get("deletionTimestamp") and status.get("phase") not in ("Running", "Pending"):
                continue
            for container in (pod.get("spec") or {}).get("containers") or []:
                for port in container.get("ports") or []:
                    if address_for is not None:
                        address = address_for(pod, int(port["containerPort"]))
                    elif status.get("podIP"):
                        address = f"{status['podIP']}:{port['containerPort']}"
                    else:
                        address = None
                    if not address:
                        continue
                    labels = relabel({"job": TRAINER_JOB, **pod_meta_labels(pod, container, port, address)},
                                     configs)
                    if labels is None:
                        continue
                    if endpoint.get("path"):
                        labels["__metrics_path__"] = endpoint["path"]
                    address = labels.pop("__address__", address)
                    final = {k: v for k, v in labels.items()
                             if not k.startswith("__") or k == "__metrics_path__"}
                    groups.append({"targets": [address], "labels": final})
    return groups


def list_pods(control_plane, namespace: str | None = None) -> dict:
    """``kubectl get pods -o json`` (all namespaces unless `namespace`) on a ControlPlane."""
    if namespace:
        return control_plane.get_json("pods", namespace=namespace)
    return control_plane.get_json("pods", "--all-namespaces")


# ------------------------------------------------------------------------------ service discovery
class HttpServiceDiscovery:
    """A tiny http_sd server on 127.0.0.1: ``GET /<key>`` returns that key's target groups."""

    def __init__(self, port: int = 0):
        self._port = port
        self._lock = threading.Lock()
        self._groups: dict[str, Groups] = {TRAINERS: [], OPERATOR: []}
        self._providers: dict[str, Callable[[], Groups]] = {}
        self._requests: dict[str, int] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle
    def __enter__(self) -> "HttpServiceDiscovery":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "HttpServiceDiscovery":
        sd = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                key = urllib.parse.urlparse(self.path).path.strip("/")
                body = json.dumps(sd._answer(key)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http-sd", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise PrometheusError("HttpServiceDiscovery not started")
        return self._server.server_address[1]

    def url(self, key: str) -> str:
        return f"http://127.0.0.1:{self.port}/{key}"

    # content
    def _answer(self, key: str) -> Groups:
        provider = self._providers.get(key)
        if provider is not None:
            try:
                groups = provider()
            except Exception as e:  # keep the previous answer (e.g. kubectl hiccup)
                print(f"[http_sd] provider for {key!r} failed: {e}", file=sys.stderr)
            else:
                with self._lock:
                    self._groups[key] = list(groups)
        with self._lock:
            self._requests[key] = self._requests.get(key, 0) + 1
            return json.loads(json.dumps(self._groups.get(key, [])))

    def groups(self, key: str = TRAINERS) -> Groups:
        with self._lock:
            return json.loads(json.dumps(self._groups.get(key, [])))

    def requests(self, key: str = TRAINERS) -> int:
        with self._lock:
            return self._requests.get(key, 0)

    def set_targets(self, key: str, groups: Groups) -> None:
        for group in groups:
            if not isinstance(group.get("targets"), list):
                raise ValueError(f"not an http_sd target group: {group!r}")
        with self._lock:
            self._groups[key] = json.loads(json.dumps(list(groups)))

    def add_target(self, key: str, address: str, labels: Mapping[str, str] | None = None) -> None:
        with self._lock:
            self._groups.setdefault(key, []).append({"targets": [address], "labels": dict(labels or {})})

    def clear(self, key: str | None = None) -> None:
        with self._lock:
            for k in [key] if key else list(self._groups):
                self._groups[k] = []
                self._providers.pop(k, None)

    def set_provider(self, key: str, provider: Callable[[], Groups] | None) -> None:
        with self._lock:
            if provider is None:
                self._providers.pop(key, None)
            else:
                self._providers[key] = provider

    # convenience
    def set_operator(self, address: str, namespace: str | None = None, **extra_labels: str) -> None:
        """The operator's metrics endpoint (e.g. ``127.0.0.1:8080``) with the target labels of
        the chart's ServiceMonitor (job="finetune-operator", namespace, service, endpoint)."""
        labels = {**chart_operator_target_labels(namespace), **extra_labels}
        self.set_targets(OPERATOR, [{"targets": [address], "labels": labels}])

    def refresh_from_control_plane(self, control_plane, *, address_for=None, namespaces=None,
                                   pod_monitor=None) -> Groups:
        """List the control plane's pods once and serve the PodMonitor's targets."""
        groups = targets_from_pods(list_pods(control_plane), pod_monitor, address_for=address_for,
                                   namespaces=namespaces)
        self.set_targets(TRAINERS, groups)
        return groups

    def follow_control_plane(self, control_plane, *, address_for=None, namespaces=None, pod_monitor=None) -> None:
        """Re-list the control plane's pods on every SD fetch (Prometheus refreshes each second)."""
        monitor = pod_monitor if pod_monitor is not None else chart_pod_monitor()
        self.set_provider(TRAINERS, lambda: targets_from_pods(list_pods(control_plane), monitor,
                                                              address_for=address_for, namespaces=namespaces))


# ------------------------------------------------------------------------------ the server
class PrometheusServer:
    """A real Prometheus on 127.0.0.1:<free port> scraping what `sd` serves."""

    def __init__(self, sd: HttpServiceDiscovery, *, scrape_interval: str = "1s",
                 evaluation_interval: str = "1s", sd_refresh_interval: str = "1s",
                 rule_files: Sequence[str | os.PathLike] = (RULES_FILE,),
                 workdir: str | os.PathLike | None = None, keep: bool | None = None,
                 start_timeout: float = 60.0, extra_args: Sequence[str] = ()):
        self.sd = sd
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.sd_refresh_interval = sd_refresh_interval
        self.rule_files = [str(Path(p).resolve()) for p in rule_files]
        self._workdir_arg = workdir
        self.keep = os.environ.get("FINETUNE_PROMETHEUS_KEEP") == "1" if keep is None else keep
        self.start_timeout = start_timeout
        self.extra_args = list(extra_args)
        self.dir: Path | None = None
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._log = None

    # lifecycle
    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "prometheus.yml"

    @property
    def log_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "prometheus.log"

    def config(self) -> dict[str, Any]:
        def job(name: str, key: str) -> dict[str, Any]:
            return {
                "job_name": name,
                "honor_labels": True,  # like the chart's PodMonitor/ServiceMonitor (honorLabels: true)
                "metrics_path": "/metrics",
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "http_sd_configs": [{"url": self.sd.url(key), "refresh_interval": self.sd_refresh_interval}],
            }

        return {
            "global": {"scrape_interval": self.scrape_interval, "scrape_timeout": self.scrape_interval,
                       "evaluation_interval": self.evaluation_interval},
            "rule_files": list(self.rule_files),
            "scrape_configs": [job(TRAINER_JOB, TRAINERS), job(OPERATOR_JOB, OPERATOR)],
        }

    def write_config(self, path: str | os.PathLike | None = None) -> Path:
        if path is None:
            if self.dir is None:
                self.dir = Path(tempfile.mkdtemp(prefix="finetune-prometheus-"))
            path = self.config_path
        Path(path).write_text(yaml.safe_dump(self.config(), sort_keys=False))
        return Path(path)

    def start(self) -> "PrometheusServer":
        ensure_prometheus_installed()
        started = time.monotonic()
        if self._workdir_arg:
            self.dir = Path(self._workdir_arg)
            self.dir.mkdir(parents=True, exist_ok=True)
        elif self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="finetune-prometheus-"))
        self.write_config()
        last_error = ""
        for _attempt in range(3):  # a free port may be taken between probing and binding
            self.port = free_port()
            self._spawn()
            try:
                self._wait_ready()
                break
            except PrometheusError as e:
                last_error = str(e)
                self._kill()
                if "address already in use" not in last_error:
                    raise
        else:
            raise PrometheusError(last_error)
        self.startup_seconds = time.monotonic() - started
        teardown.track(self)
        print(f"\n[prometheus] {self.url} (config {self.config_path}, up in {self.startup_seconds:.1f}s)",
              file=sys.stderr)
        return self

    def _spawn(self) -> None:
        data = self.dir / "data"
        shutil.rmtree(data, ignore_errors=True)
        args = [str(PROMETHEUS_BIN), f"--config.file={self.config_path}", f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle",
                "--storage.tsdb.retention.time=1d", "--log.level=info", *self.extra_args]
        if self._log:
            self._log.close()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.dir, preexec_fn=teardown.die_with_parent)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if _http_get(f"{self.url}/-/ready", timeout=2).strip():
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready after {self.start_timeout:.0f}s:\n{self.log_tail()}")

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def stop(self) -> None:
        self._kill()
        self.proc = None
        if self._log:
            self._log.close()
            self._log = None
        teardown.untrack(self)
        if self.dir is not None and not self.keep and not self._workdir_arg:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def reload(self) -> None:
        """Rewrite the config and POST /-/reload."""
        self.write_config()
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    # HTTP API
    def api(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None}, doseq=True)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            body = _http_get(url)
        except urllib.error.HTTPError as e:
            body = e.read()
        try:
            answer = json.loads(body)
        except ValueError:
            raise PrometheusQueryError(f"{path}: not JSON: {body[:300]!r}") from None
        if answer.get("status") != "success":
            raise PrometheusQueryError(f"{path} {dict(params or {})}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, promql: str, time: float | None = None) -> list[dict[str, Any]]:
        """Instant query: the `result` list (vector/matrix); a scalar becomes one unlabelled sample."""
        data = self.api("query", {"query": promql, "time": time})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_value(self, promql: str, time: float | None = None) -> float | None:
        """The value of a one-series (or scalar) result; None when empty; error when ambiguous."""
        result = self.query(promql, time)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusQueryError(f"{promql!r} returned {len(result)} series: {[r['metric'] for r in result]}")
        if "value" not in result[0]:
            raise PrometheusQueryError(f"{promql!r} returned a range vector; use samples()")
        return float(result[0]["value"][1])

    def query_range(self, promql: str, start: float, end: float, step: float | str = 1.0) -> list[dict[str, Any]]:
        return self.api("query_range", {"query": promql, "start": start, "end": end, "step": step})["result"]

    def samples(self, selector: str, window: str = "1h",
                time: float | None = None) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
        """Raw samples of `selector` over the last `window`: [(labels, [(ts, value), ...]), ...]."""
        result = self.query(f"{selector}[{window}]", time)
        return [(r["metric"], [(float(t), float(v)) for t, v in r["values"]]) for r in result]

    def label_values(self, label: str, match: Sequence[str] = (), start: float | None = None,
                     end: float | None = None) -> list[str]:
        """/api/v1/label/<label>/values (what Grafana's label_values(match, label) asks)."""
        return self.api(f"label/{label}/values", {"match[]": list(match), "start": start, "end": end})

    def targets(self, job: str | None = None) -> list[dict[str, Any]]:
        active = self.api("targets", {"state": "active"})["activeTargets"]
        return [t for t in active if job is None or t["labels"].get("job") == job or t.get("scrapePool") == job]

    def rules(self) -> list[dict[str, Any]]:
        return self.api("rules")["groups"]

    def alerts(self) -> list[dict[str, Any]]:
        return self.api("alerts")["alerts"]

    def wait_for(self, promql: str, predicate: Callable[[list[dict[str, Any]]], bool] = bool,
                 timeout: float = 60.0, interval: float = 0.25, time_: float | None = None) -> list[dict[str, Any]]:
        """Poll `promql` until `predicate(result)` holds; TimeoutError shows the last result and targets."""
        deadline = time.monotonic() + timeout
        result: list = []
        while True:
            result = self.query(promql, time_)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                break
            time.sleep(interval)
        raise TimeoutError(f"{promql!r}: condition not met in {timeout:.0f}s; last result {result}; "
                           f"targets {self._target_summary()}")

    def wait_for_targets(self, job: str | None = None, health: str = "up", count: int = 1,
                         timeout: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = [t for t in self.targets(job) if t["health"] == health]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {count} {health} targets for job {job!r} in {timeout:.0f}s: "
                                   f"{self._target_summary()}")
            time.sleep(0.2)

    def _target_summary(self) -> list[str]:
        try:
            return [f"{t['scrapeUrl']} {t['labels'].get('job')} {t['health']} {t.get('lastError', '')}".strip()
                    for t in self.targets()]
        except Exception as e:
            return [f"(targets unavailable: {e})"]


# ------------------------------------------------------------------------------ dashboard
# Grafana's built-in variables, with values that suit a 1s-scrape test Prometheus.
GRAFANA_BUILTINS = {
    "__rate_interval": "1m", "__interval": "15s", "__interval_ms": "15000", "__range": "1h",
    "__range_s": "3600", "__range_ms": "3600000", "__auto_interval": "15s", "__name": "",
    "datasource": "prometheus", "DS_PROMETHEUS": "prometheus",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def _walk_panels(panels: Iterable[Mapping[str, Any]]):
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels") or [])


def dashboard_targets(path: str | os.PathLike = DASHBOARD,
                      variables: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Every panel target of the dashboard with variables substituted (see dashboard_queries)."""
    dashboard = json.loads(Path(path).read_text())
    values = dict(GRAFANA_BUILTINS)
    for var in (dashboard.get("templating") or {}).get("list") or []:
        if var.get("type") == "datasource":
            values[var["name"]] = "prometheus"
        elif var.get("type") == "query":  # "All" selects everything the test run exported
            values[var["name"]] = var.get("allValue") or ".*"
        else:  # custom, textbox, constant, interval: the current (default) value
            current = (var.get("current") or {}).get("value")
            values[var["name"]] = str(current if current not in (None, "", "$__all") else var.get("query", ""))
    values.update(variables or {})

    def substitute(expr: str) -> str:
        def one(m: re.Match) -> str:
            name = m.group(1) or m.group(2) or m.group(3)
            if name not in values:
                raise PrometheusError(f"unknown Grafana variable ${name} in {expr!r}")
            return values[name]

        return _VARIABLE.sub(one, expr)

    out = []
    for panel in _walk_panels(dashboard.get("panels") or []):
        for target in panel.get("targets") or []:
            if target.get("expr"):
                out.append({"title": panel.get("title", ""), "expr": substitute(target["expr"]),
                            "raw_expr": target["expr"], "instant": bool(target.get("instant")),
                            "ref_id": target.get("refId", ""), "panel_type": panel.get("type", "")})
    return out


def dashboard_queries(path: str | os.PathLike = DASHBOARD,
                      variables: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """[(panel title, PromQL), ...] for every panel target; `variables` overrides values
    (e.g. {"finetune": "prom-test", "namespace": "ml"}); query variables default to `.*`."""
    return [(t["title"], t["expr"]) for t in dashboard_targets(path, variables)]


# ------------------------------------------------------------------------------ pytest fixtures
try:
    import pytest
except ImportError:  # the module is usable without pytest (interactive use)
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def prometheus_installed() -> tuple[Path, Path]:
        try:
            return ensure_prometheus_installed()
        except PrometheusError as e:
            pytest.fail(str(e), pytrace=False)

    @pytest.fixture(scope="session")
    def prometheus_sd() -> Iterable[HttpServiceDiscovery]:
        with HttpServiceDiscovery() as sd:
            yield sd

    @pytest.fixture(scope="session")
    def prometheus_server(prometheus_installed, prometheus_sd) -> Iterable[PrometheusServer]:
        server = PrometheusServer(prometheus_sd)
        try:
            server.start()
        except PrometheusError as e:
            server.stop()
            pytest.fail(f"could not start Prometheus: {e}", pytrace=False)
        try:
            yield server
        finally:
            server.stop()


# ------------------------------------------------------------------------------ command line
def main() -> int:
    with HttpServiceDiscovery() as sd, PrometheusServer(sd, keep=True) as server:
        print(f"Prometheus: {server.url}  http_sd: {sd.url(TRAINERS)} {sd.url(OPERATOR)}  dir: {server.dir}")
        try:
            while server.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
