"""A node agent for tests: plays the kubelet for pods bound to its Nodes (test infrastructure).

It registers Ready ``Node`` objects with the control plane, keeps their Lease and status
heartbeat fresh, and runs every container of every pod bound to them as a **local process**
(no images, no container runtime): the project's ``.venv/bin`` comes first on PATH, so a pod's
``finetune-launch ...`` command runs the code of this checkout.

Per pod (what a container runtime would give it):

* a network namespace ``ftna<id>-<n>`` with ``lo`` up and ``eth0`` (a veth pair) on a bridge
  ``ftbr<id>`` that holds ``10.<S>.0.1/16`` in the root namespace, so the operator and
  Prometheus (root namespace) reach pod IPs, and pods reach each other. Only this machine's
  own namespaces: no traffic leaves the host.
* ``/etc/netns/<netns>/hosts`` (``ip netns exec`` binds it over ``/etc/hosts``) listing every
  pod's IP with ``<hostname>``, ``<hostname>.<subdomain>``, ``...<ns>.svc`` and
  ``...<ns>.svc.cluster.local`` (short names only for pods of the same namespace, as DNS search
  paths would resolve them). Rewritten in place for all pods as pods come and go.
* a UTS namespace (hostname = ``spec.hostname`` or the pod name) and a private mount namespace
  in which the volumes are bind-mounted at their ``mountPath`` (read-only when asked), plus a
  private ``/tmp`` (into which the checkout and its venv are bound at their own paths when
  they live under the host's ``/tmp``).
* the container's user: ``runAsUser``/``runAsGroup``/``fsGroup``/``supplementalGroups`` via
  ``setpriv``; fsGroup-owned, group-writable (setgid) volume dirs, as a kubelet would.
* env (values, fieldRef, resourceFieldRef, configMap/secret keys, envFrom) and ``$(VAR)``
  expansion in command/args; ``workingDir``.

Status is reported like a kubelet: Pending -> Running (podIP, hostIP, Ready, startedAt) ->
Succeeded/Failed with the real exit code (128+N for signal N), reason Completed/Error (or
DeadlineExceeded), and the log tail as ``message`` for ``FallbackToLogsOnError``. Deleting a
pod SIGTERMs the container's main process, SIGKILLs everything in its netns after
``terminationGracePeriodSeconds`` (or the deletion's own grace period) capped at ``grace_cap``
(default 10 s so that the suite stays fast; ``FINETUNE_NODE_AGENT_GRACE_CAP`` or the
``grace_cap`` argument changes it, and ``with agent.raised_grace_cap(120): ...`` lets one test
honour a pod's longer grace period), then removes the pod object (grace 0). Each run records
when its SIGTERM went out, the grace it was given and when its main process ended
(``PodRun.sigterm_at``/``grace``/``exited_at``, monotonic). ``activeDeadlineSeconds`` is enforced.

Everything it makes is named with its id (netns, veths, bridge, ``/etc/netns`` dirs, the work
dir, and mount-point dirs such as ``/data`` that it had to create on the host) and recorded
under ``/run/finetune-node-agent/<id>/``; :meth:`NodeAgent.stop` (also atexit, SIGTERM, SIGHUP)
removes it all, and every start sweeps what a killed run (dead owner pid) left behind.

Image mode (``NodeAgent(..., image_mode=True)``): each pod's ``image:`` is resolved against the
local image store of docker/images.py (``make images``) and its container runs with ``runc``
from that image's root filesystem (unpacked once per image; a per-pod overlay on top, so pods
never see each other's writes), in the same per-pod network namespace, ``/etc/hosts``, volumes
and private ``/tmp``. The pod's ``securityContext`` becomes the OCI spec: ``runAsUser``/
``runAsGroup``/``fsGroup``/``supplementalGroups``, ``allowPrivilegeEscalation: false`` ->
no-new-privileges, ``capabilities`` add/drop on the runtime's default set, ``seccompProfile:
RuntimeDefault`` -> Debian's /usr/share/containers/seccomp.json, ``readOnlyRootFilesystem``.
``command``/``args`` override the image's ENTRYPOINT/CMD; the image's Env comes first. A pod
whose image is not in the store stays Pending with ``ErrImageNeverPull``, as a kubelet with
``imagePullPolicy: Never`` reports it: never a fall-back to the virtualenv.

Needs root, ``ip`` (iproute2), ``unshare``/``setpriv`` (util-linux) and the kubernetes client;
image mode also ``runc`` and buildah (docker/images.py installs them).

    agent = NodeAgent(control_plane, nodes=[NodeSpec("node-a"), NodeSpec("node-b")]).start()
    agent.log_path("ns", "pod")         # the container's output
    agent.kill_pod_process("ns", "pod-0", signal.SIGKILL)   # the trainer process
    agent.stop()
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

# The test-infra modules are loaded by path; their shared teardown registry is one module.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import teardown  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STATE_ROOT = Path("/run/finetune-node-agent")
RUNC_ROOT = Path("/run/finetune-runc")  # = docker/images.py's RUNC_ROOT (runc's state dir)
NETNS_PREFIX = "ftna"
BRIDGE_PREFIX = "ftbr"
VETH_PREFIX = "ftv"
LOG_TAIL_LINES = 80      # kubelet: FallbackToLogsOnError uses the last 80 lines ...
LOG_TAIL_BYTES = 2048    # ... or 2 KiB, whichever is smaller
# Most seconds between a deleted pod's SIGTERM and SIGKILL (below: the pod's own grace period).
# Short by default so that deletions in the suite stay fast; a test of graceful stop raises it.
GRACE_CAP_ENV = "FINETUNE_NODE_AGENT_GRACE_CAP"
DEFAULT_GRACE_CAP = 10.0


class NodeAgentError(RuntimeError):
    pass


@dataclasses.dataclass
class NodeSpec:
    name: str
    cpu: str = "4"
    memory: str = "16Gi"
    gpus: int = 0
    labels: dict[str, str] | None = None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: str) -> float:
    return _dt.datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=_dt.timezone.utc).timestamp()


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NodeAgentError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(netns: str) -> list[int]:
    proc = _run("ip", "netns", "pids", netns, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _kill_netns(netns: str, sig: int = signal.SIGKILL) -> None:
    for pid in _netns_pids(netns):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
             "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def parse_quantity(q: str | int | float) -> float:
    m = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)", str(q).strip())
    if not m or m.group(2) not in _SUFFIXES:
        raise ValueError(f"bad quantity {q!r}")
    return float(m.group(1)) * _SUFFIXES[m.group(2)]


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: $$ escapes, unknown references stay as they are."""
    def repl(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", repl, text)


# ------------------------------------------------------------------ leftovers of killed runs
def _live_agent_ids() -> set[str]:
    live = set()
    for d in STATE_ROOT.glob("*"):
        try:
            if _pid_alive(int((d / "owner.pid").read_text())):
                live.add(d.name)
        except (OSError, ValueError):
            continue
    return live


def sweep_leftovers() -> list[str]:
    """Remove what agents whose owner process died left behind; returns what was removed."""
    removed: list[str] = []
    live = _live_agent_ids()
    for d in list(STATE_ROOT.glob("*")):
        if d.name in live or not d.is_dir():
            continue
        try:
            state = json.loads((d / "state.json").read_text())
        except (OSError, ValueError):
            state = {}
        for path in state.get("mountpoints", []):
            if not live and Path(path).is_dir():
                try:
                    Path(path).rmdir()
                    removed.append(path)
                except OSError:
                    pass
        # Image mode: its runc containers and per-pod overlay mounts (before removing the work dir).
        for cid in (_run("runc", "--root", str(RUNC_ROOT), "list", "-q", check=False).stdout.split()
                    if shutil.which("runc") else []):
            if cid.startswith(f"{NETNS_PREFIX}{d.name}-"):
                _run("runc", "--root", str(RUNC_ROOT), "delete", "--force", cid, check=False)
                removed.append(f"runc {cid}")
        if state.get("workdir"):
            for target in sorted(_mounts_under(state["workdir"]), key=len, reverse=True):
                _run("umount", "--lazy", target, check=False)
            shutil.rmtree(state["workdir"], ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
    netns = _run("ip", "netns", "list", check=False).stdout.split("\n")
    for line in netns:
        name = line.split(" ")[0].strip()
        m = re.fullmatch(rf"{NETNS_PREFIX}([0-9a-f]{{4}})-\d+", name)
        if m and m.group(1) not in live:
            _kill_netns(name)
            _run("ip", "netns", "del", name, check=False)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)
            removed.append(f"netns {name}")
    for d in Path("/etc/netns").glob(f"{NETNS_PREFIX}*") if Path("/etc/netns").is_dir() else []:
        m = re.fullmatch(rf"{NETNS_PREFIX}([0-9a-f]{{4}})-\d+", d.name)
        if m and m.group(1) not in live:
            shutil.rmtree(d, ignore_errors=True)
    _registry_update(remove_all_if_alone=True)
    links = json.loads(_run("ip", "-j", "link", "show", check=False).stdout or "[]")
    for link in links:
        name = link.get("ifname", "")
        m = re.fullmatch(rf"(?:{BRIDGE_PREFIX}|{VETH_PREFIX})([0-9a-f]{{4}})\d*", name)
        if m and m.group(1) not in live:
            _run("ip", "link", "del", name, check=False)
            removed.append(f"link {name}")
    return removed


def _mounts_under(directory: str) -> list[str]:
    prefix = directory.rstrip("/") + "/"
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]


MOUNTPOINTS_REGISTRY = STATE_ROOT / "mountpoints.json"


def _registry_update(add: Iterable[str] = (), remove_all_if_alone: bool = False, me: str | None = None) -> None:
    """Host dirs created as mount points by any agent; the last agent alive removes them all
    (another agent may still bind volumes onto them until then)."""
    import fcntl
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(STATE_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            known = json.loads(MOUNTPOINTS_REGISTRY.read_text())
        except (OSError, ValueError):
            known = []
        known = sorted(set(known) | set(add))
        if remove_all_if_alone and not (_live_agent_ids() - {me}):
            for path in sorted(known, key=len, reverse=True):
                try:
                    Path(path).rmdir()
                except OSError:
                    pass
            known = [p for p in known if Path(p).exists()]
        MOUNTPOINTS_REGISTRY.write_text(json.dumps(known))


def _run_as(python: Path, uid: int, gid: int) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", str(python),
                           "-c", "import finetune, torch"], capture_output=True, text=True, cwd="/")


def _untraversable_ancestors(path: Path) -> list[Path]:
    out = []
    for p in [path, *path.parents]:
        try:
            if not p.stat().st_mode & 0o001:
                out.append(p)
        except OSError:
            pass
    return out


def check_venv_for_user(python: Path, uid: int = 1000, gid: int = 1000) -> None:
    """Make sure a non-root pod user can run the project's venv, or fail clearly.

    A checkout under a private home (e.g. /root, mode 700) is unreachable for the pods'
    uid. On this test machine we then add the traverse bit (o+x: enter, not list) to the
    blocking ancestors, as a real node's image would simply ship the environment; set
    FINETUNE_AGENT_FIX_PERMISSIONS=0 to refuse instead."""
    proc = _run_as(python, uid, gid)
    if proc.returncode == 0:
        return
    if os.environ.get("FINETUNE_AGENT_FIX_PERMISSIONS", "1") != "0":
        for d in _untraversable_ancestors(python.parent):
            print(f"node agent: adding o+x to {d} so that pod users (uid {uid}) can reach the venv", file=sys.stderr)
            d.chmod(d.stat().st_mode | 0o001)
        proc = _run_as(python, uid, gid)
        if proc.returncode == 0:
            return
    blocked = []
    p = python.parent
    while True:
        try:
            mode = p.stat().st_mode
            if not mode & 0o001:
                blocked.append(f"{p} (mode {oct(mode & 0o777)})")
        except OSError:
            pass
        if p == p.parent:
            break
        p = p.parent
    hint = (f"; these directories are not traversable by others: {', '.join(blocked)} "
            f"-> e.g. `chmod o+x` them, or clone the repo under a world-readable path") if blocked else ""
    raise NodeAgentError(
        f"pods run as uid {uid}, but uid {uid} cannot run {python} -c 'import finetune' "
        f"(exit {proc.returncode}: {proc.stderr.strip()[-500:]}){hint}. The venv must be built from a "
        f"world-readable Python (the Makefile uses /usr/bin/python3), not e.g. /root/.pyenv.")


def paths_under_tmp(paths: list[Path]) -> list[Path]:
    """Those of ``paths`` (resolved) that lie under /tmp, without any that lie inside another."""
    resolved = {p.resolve() for p in paths}
    inside_tmp = sorted(p for p in resolved if p.is_relative_to("/tmp") and p != Path("/tmp"))
    kept: list[Path] = []
    for p in inside_tmp:  # sorted, so a parent comes before what is inside it
        if not any(p.is_relative_to(k) for k in kept):
            kept.append(p)
    return kept


# ------------------------------------------------------------------ per pod
@dataclasses.dataclass
class PodRun:
    namespace: str
    name: str
    uid: str
    node: str
    hostname: str
    subdomain: str
    netns: str
    veth: str
    ip: str
    dir: Path
    log: Path
    proc: subprocess.Popen | None = None
    started_at: str = ""
    start_time: float = 0.0
    kill_at: float | None = None          # SIGKILL everything at this monotonic time
    sigterm_at: float | None = None       # when the main process got its SIGTERM (monotonic)
    grace: float | None = None            # the seconds it was given before SIGKILL (capped)
    exited_at: float | None = None        # when the agent saw the main process end (monotonic)
    stop_reason: str | None = None        # "Deleted" | "DeadlineExceeded"
    reported: bool = False
    torn_down: bool = False
    container: str = ""
    image: str = ""
    image_id: str = ""                    # image mode: the local image's id
    rootfs: str = ""                      # image mode: the per-pod overlay mount
    runc_id: str = ""


class NodeAgent:
    """Plays the kubelet for ``nodes`` against ``control_plane`` (see the module docstring)."""

    def __init__(self, control_plane, nodes: Iterable[NodeSpec | str] = ("node-0",), *,
                 workdir: str | Path | None = None, grace_cap: float | None = None, poll_interval: float = 0.3,
                 heartbeat_interval: float = 10.0, venv: str | Path | None = None, keep: bool | None = None,
                 namespaces: Iterable[str] | None = None, image_mode: bool = False):
        self.cp = control_plane
        self.image_mode = image_mode
        self.images = _images_module() if image_mode else None
        self._never_pulled: set[str] = set()   # pod uids reported ErrImageNeverPull
        # None: run every pod bound to our nodes. A set: only pods of these namespaces (see serve()).
        self.namespaces: set[str] | None = set(namespaces) if namespaces is not None else None
        self.nodes = [n if isinstance(n, NodeSpec) else NodeSpec(n) for n in nodes]
        self.node_names = {n.name for n in self.nodes}
        self.grace_cap = float(os.environ.get(GRACE_CAP_ENV) or DEFAULT_GRACE_CAP) if grace_cap is None else grace_cap
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.venv = Path(venv) if venv else REPO / ".venv"
        self.keep = bool(int(os.environ.get("FINETUNE_NODE_AGENT_KEEP", "0"))) if keep is None else keep
        self._workdir_arg = workdir
        self.id = uuid.uuid4().hex[:4]
        self.bridge = f"{BRIDGE_PREFIX}{self.id}"
        self.subnet_octet = 0
        self.bridge_ip = ""
        self.dir: Path | None = None
        self.state_dir = STATE_ROOT / self.id
        self.runs: dict[str, PodRun] = {}          # by pod uid
        self.finished: dict[str, PodRun] = {}      # torn down, kept for log_path
        self.mountpoints: list[str] = []           # host dirs this agent created
        self.errors: list[str] = []                # loop exceptions (for diagnostics)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_index = 0
        self._used_ips: set[str] = set()
        self._last_heartbeat = 0.0
        self._api = None
        self.started = False
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "NodeAgent":
        if os.geteuid() != 0:
            raise NodeAgentError("the node agent needs root (network namespaces, mounts, setpriv)")
        for tool in ("ip", "unshare", "setpriv", "mount"):
            if not shutil.which(tool):
                raise NodeAgentError(f"{tool} not found: apt-get install -y iproute2 util-linux mount")
        if self.image_mode:
            self.images.ensure_host_packages()
        else:
            check_venv_for_user(self.venv / "bin" / "python")
        STATE_ROOT.mkdir(parents=True, exist_ok=True)
        sweep_leftovers()
        self.state_dir.mkdir(parents=True)
        (self.state_dir / "owner.pid").write_text(str(os.getpid()))
        if self._workdir_arg:
            self.dir = Path(self._workdir_arg)
            self.dir.mkdir(parents=True, exist_ok=True)
        else:
            self.dir = Path(tempfile.mkdtemp(prefix=f"finetune-node-agent-{self.id}-"))
        self.dir.chmod(0o755)
        teardown.track(self)
        self.started = True
        self._save_state()
        try:
            self._setup_bridge()
            from kubernetes import client, config
            self._api_client = config.new_client_from_config(config_file=str(self.cp.kubeconfig))
            self.core = client.CoreV1Api(self._api_client)
            self.coord = client.CoordinationV1Api(self._api_client)
            for node in self.nodes:
                self._register(node)
            self._heartbeat(force=True)
        except BaseException:
            self.stop()
            raise
        self._thread = threading.Thread(target=self._loop, name=f"node-agent-{self.id}", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> "NodeAgent":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        with self._lock:
            if self._stopped or not self.started:
                return
            self._stopped = True
        self._stop.set()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout=15)
        with self._lock:
            for run in list(self.runs.values()):
                if run.proc and run.proc.poll() is None:
                    try:
                        os.kill(run.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self._teardown(run)
            for run in list(self.runs.values()):
                if run.proc:
                    try:
                        run.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
        try:
            for node in self.nodes:
                self.cp.kubectl("delete", "node", node.name, "--wait=false", check=False, timeout=10)
        except Exception:
            pass
        _run("ip", "link", "del", self.bridge, check=False)
        _registry_update(self.mountpoints, remove_all_if_alone=True, me=self.id)
        if self.dir and not self.keep and not self._workdir_arg:
            shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        teardown.untrack(self)

    def _save_state(self) -> None:
        (self.state_dir / "state.json").write_text(json.dumps({
            "workdir": str(self.dir) if self.dir and not self._workdir_arg and not self.keep else None,
            "mountpoints": self.mountpoints, "bridge": self.bridge}))

    def _setup_bridge(self) -> None:
        used = set()
        for addr in json.loads(_run("ip", "-j", "-4", "addr", "show").stdout or "[]"):
            for info in addr.get("addr_info", []):
                parts = info.get("local", "").split(".")
                if parts[0] == "10":
                    used.add(int(parts[1]))
        free = [o for o in range(244, 250) if o not in used]
        if not free:
            raise NodeAgentError("no free 10.244-249.0.0/16 subnet for the pod bridge")
        self.subnet_octet = free[0]
        self.bridge_ip = f"10.{self.subnet_octet}.0.1"
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.bridge_ip}/16", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")

    def _register(self, node: NodeSpec) -> None:
        self.cp.register_node(node.name, cpu=node.cpu, memory=node.memory, gpus=node.gpus,
                              labels={"finetune.dev/node-agent": self.id, **(node.labels or {})})
        self.cp.kubectl("patch", "node", node.name, "--subresource=status", "--type=merge", "-p", json.dumps(
            {"status": {"addresses": [{"type": "InternalIP", "address": self.bridge_ip},
                                      {"type": "Hostname", "address": node.name}],
                        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}}}}))

    # ------------------------------------------------------------------ public helpers
    def serve(self, namespace: str) -> None:
        """Run the pods of ``namespace`` too (when the agent was made with ``namespaces=``).

        In a pytest session other tests play the kubelet themselves (``set_pod_status``) for
        pods the scheduler may put on this agent's nodes; a namespace filter keeps the agent's
        hands off them. Pods of other namespaces on our nodes are left alone entirely.
        """
        if self.namespaces is not None:
            with self._lock:
                self.namespaces.add(namespace)

    def log_path(self, namespace: str, pod: str) -> Path:
        """The container's log (stdout+stderr) of the newest run of that pod."""
        with self._lock:
            runs = [r for r in [*self.finished.values(), *self.runs.values()]
                    if r.namespace == namespace and r.name == pod]
        if runs:
            return max(runs, key=lambda r: r.start_time).log
        return self.dir / "pods" / namespace / pod / "missing.log"

    def log(self, namespace: str, pod: str) -> str:
        path = self.log_path(namespace, pod)
        return path.read_text(errors="replace") if path.exists() else ""

    def pod_run(self, namespace: str, pod: str) -> PodRun | None:
        with self._lock:
            runs = [r for r in self.runs.values() if r.namespace == namespace and r.name == pod]
        return runs[0] if runs else None

    def processes(self) -> dict[str, list[int]]:
        """"ns/pod" -> pids still alive in that pod's network namespace (all pods it runs)."""
        with self._lock:
            runs = list(self.runs.values())
        out = {}
        for run in runs:
            pids = _netns_pids(run.netns) if not run.torn_down else []
            if run.proc and run.proc.poll() is None:
                pids = sorted(set(pids) | {run.proc.pid})
            if pids:
                out[f"{run.namespace}/{run.name}"] = pids
        return out

    @contextlib.contextmanager
    def raised_grace_cap(self, seconds: float):
        """Within the block, pods deleted are given up to ``seconds`` between SIGTERM and SIGKILL
        (their own ``terminationGracePeriodSeconds`` below that); restored afterwards, so the rest
        of the suite keeps the short default."""
        previous, self.grace_cap = self.grace_cap, max(self.grace_cap, float(seconds))
        try:
            yield self
        finally:
            self.grace_cap = previous

    def kill_pod_process(self, namespace: str, pod: str, sig: int = signal.SIGKILL, which: str = "trainer") -> list[int]:
        """Send ``sig`` to a process of a running pod; returns the pids signalled.

        ``which="trainer"``: the training process(es) that torchrun started (``-m finetune.cli``,
        not the launcher itself); ``"main"``: the container's main process.
        """
        run = self.pod_run(namespace, pod)
        if not run or not run.proc or run.proc.poll() is not None:
            raise NodeAgentError(f"pod {namespace}/{pod} has no running process on this agent")
        if which == "main":
            targets = [run.proc.pid]
        else:
            import psutil
            targets = []
            for pid in _netns_pids(run.netns):
                try:
                    cmd = psutil.Process(pid).cmdline()
                except psutil.Error:
                    continue
                text = " ".join(cmd)
                if "finetune.cli" in text and "finetune-launch" not in text and "finetune.launch" not in text:
                    targets.append(pid)
            # the trainer itself, not its data-loader children
            targets = [p for p in targets if psutil.Process(p).ppid() not in targets] if targets else []
        if not targets:
            raise NodeAgentError(f"no {which} process found in pod {namespace}/{pod}")
        for pid in targets:
            os.kill(pid, sig)
        return targets

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._heartbeat()
                self._sync()
            except Exception as e:  # keep going: a kubelet does not die on one API error
                self.errors.append(f"{_now()} {type(e).__name__}: {e}")
                del self.errors[:-50]
            self._stop.wait(self.poll_interval)

    def _heartbeat(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_heartbeat < self.heartbeat_interval:
            return
        self._last_heartbeat = time.monotonic()
        from kubernetes.client.rest import ApiException
        now = _now()
        for node in self.nodes:
            conditions = [{"type": t, "status": "False", "reason": r, "lastHeartbeatTime": now}
                          for t, r in (("MemoryPressure", "KubeletHasSufficientMemory"),
                                       ("DiskPressure", "KubeletHasNoDiskPressure"),
                                       ("PIDPressure", "KubeletHasSufficientPID"))]
            conditions.append({"type": "Ready", "status": "True", "reason": "KubeletReady",
                               "message": "node agent is posting ready status", "lastHeartbeatTime": now})
            self.core.patch_node_status(node.name, {"status": {"conditions": conditions}})
            lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                     "metadata": {"name": node.name, "namespace": "kube-node-lease"},
                     "spec": {"holderIdentity": node.name, "leaseDurationSeconds": 40,
                              "renewTime": _micro_now()}}
            try:
                self.coord.patch_namespaced_lease(node.name, "kube-node-lease", {"spec": lease["spec"]})
            except ApiException as e:
                if e.status != 404:
                    raise
                self.coord.create_namespaced_lease("kube-node-lease", lease)

    def _list_pods(self) -> list[dict]:
        resp = self.core.list_pod_for_all_namespaces(_preload_content=False, _request_timeout=20)
        items = json.loads(resp.data)["items"]
        return [p for p in items if (p.get("spec") or {}).get("nodeName") in self.node_names
                and (self.namespaces is None or p["metadata"]["namespace"] in self.namespaces)]

    def _sync(self) -> None:
        pods = self._list_pods()
        seen = set()
        now = time.monotonic()
        for pod in pods:
            md, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
            uid = md["uid"]
            seen.add(uid)
            run = self.runs.get(uid)
            if md.get("deletionTimestamp"):
                if run and run.proc and run.proc.poll() is None:
                    if run.kill_at is None or run.stop_reason != "Deleted":
                        self._terminate(run, pod, "Deleted")
                else:
                    if run:
                        if run.proc and run.exited_at is None:
                            run.exited_at = now
                        self._teardown(run)
                    self._force_delete(md["namespace"], md["name"], uid)
                continue
            if status.get("phase") in ("Succeeded", "Failed"):
                if run and run.proc and run.proc.poll() is None and run.kill_at is None:
                    self._terminate(run, pod, run.stop_reason or "Terminal")
                continue
            if run is None:
                if uid in self.finished:
                    continue
                try:
                    self._start_pod(pod)
                except _NotReady:
                    continue
                except Exception as e:
                    self.errors.append(f"{_now()} start {md['namespace']}/{md['name']}: {e}")
                    self._report_start_failure(pod, str(e))
                continue
            ads = spec.get("activeDeadlineSeconds")
            if ads is not None and run.proc and run.proc.poll() is None and run.kill_at is None:
                start = _parse_time(status["startTime"]) if status.get("startTime") else time.time()
                if time.time() - start >= int(ads):
                    self._terminate(run, pod, "DeadlineExceeded")
        with self._lock:
            runs = list(self.runs.values())
        for run in runs:
            if run.proc is None:
                continue
            code = run.proc.poll()
            if code is None:
                if run.kill_at is not None and now >= run.kill_at:
                    _kill_netns(run.netns)
                    try:
                        os.kill(run.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                continue
            if run.exited_at is None:
                run.exited_at = now
            if not run.reported:
                exit_code = code if code >= 0 else 128 - code
                _kill_netns(run.netns)  # the container ends with its main process
                if run.uid in seen and run.stop_reason != "Deleted":
                    self._report_terminated(run, exit_code)
                run.reported = True
                self._teardown(run)
                if run.stop_reason == "Deleted" and run.uid in seen:
                    self._force_delete(run.namespace, run.name, run.uid)
        for uid, run in list(self.runs.items()):
            if uid not in seen:  # force-deleted from under us
                if run.proc and run.proc.poll() is None:
                    _kill_netns(run.netns)
                    try:
                        os.kill(run.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    try:
                        run.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        continue
                self._teardown(run)

    # ------------------------------------------------------------------ pod start
    def _alloc_ip(self) -> str:
        for n in range(2, 255 * 250):
            ip = f"10.{self.subnet_octet}.{1 + n // 254}.{1 + n % 254}"
            if ip not in self._used_ips:
                self._used_ips.add(ip)
                return ip
        raise NodeAgentError("out of pod IPs")

    def _patch_status(self, namespace: str, name: str, status: dict) -> None:
        from kubernetes.client.rest import ApiException
        try:
            self.core.patch_namespaced_pod_status(name, namespace, {"status": status})
        except ApiException as e:
            if e.status != 404:
                raise

    def _force_delete(self, namespace: str, name: str, uid: str) -> None:
        from kubernetes.client import V1DeleteOptions, V1Preconditions
        from kubernetes.client.rest import ApiException
        try:
            self.core.delete_namespaced_pod(name, namespace, body=V1DeleteOptions(
                grace_period_seconds=0, preconditions=V1Preconditions(uid=uid)))
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    def _report_start_failure(self, pod: dict, message: str) -> None:
        md = pod["metadata"]
        now = _now()
        c = pod["spec"]["containers"][0]
        self._patch_status(md["namespace"], md["name"], {
            "phase": "Failed", "reason": "CreateContainerError", "message": message[-LOG_TAIL_BYTES:],
            "startTime": now,
            "containerStatuses": [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                                   "restartCount": 0, "started": False,
                                   "state": {"terminated": {"exitCode": 128, "reason": "StartError",
                                                            "message": message[-LOG_TAIL_BYTES:],
                                                            "startedAt": now, "finishedAt": now}}}]})
        self.finished[md["uid"]] = PodRun(md["namespace"], md["name"], md["uid"], pod["spec"]["nodeName"], "", "",
                                          "", "", "", self.dir, self.dir / "none.log", start_time=time.time(),
                                          reported=True, torn_down=True)

    def _volume_source(self, pod: dict, volume: dict, vol_dir: Path, fs_group: int | None) -> tuple[Path, bool]:
        """(host path, agent-managed) of one pod volume."""
        ns = pod["metadata"]["namespace"]
        name = volume["name"]
        if "emptyDir" in volume:
            path = vol_dir / "empty-dir" / name
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o777)  # like a kubelet: emptyDirs are world-writable
            return path, True
        if "hostPath" in volume:
            hp = volume["hostPath"]
            path = Path(hp["path"])
            kind = hp.get("type") or ""
            if kind == "DirectoryOrCreate":
                path.mkdir(parents=True, exist_ok=True)
            elif kind == "FileOrCreate" and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            elif not path.exists():
                raise NodeAgentError(f"hostPath {path} of volume {name!r} does not exist")
            return path, False
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            pvc = json.loads(self.core.read_namespaced_persistent_volume_claim(claim, ns, _preload_content=False).data)
            pv_name = pvc["spec"].get("volumeName")
            if not pv_name or (pvc.get("status") or {}).get("phase") != "Bound":
                raise _NotReady(f"PVC {ns}/{claim} not bound")
            pv = json.loads(self.core.read_persistent_volume(pv_name, _preload_content=False).data)
            source = pv["spec"].get("hostPath") or pv["spec"].get("local")
            if not source:
                raise NodeAgentError(f"PV {pv_name} (claim {claim}) is neither hostPath nor local")
            path = Path(source["path"])
            if not path.exists():
                if (pv["spec"].get("hostPath") or {}).get("type") == "DirectoryOrCreate":
                    path.mkdir(parents=True)
                else:
                    raise NodeAgentError(f"PV {pv_name}'s path {path} does not exist")
            return path, False
        if "configMap" in volume or "secret" in volume:
            is_secret = "secret" in volume
            src = volume["secret" if is_secret else "configMap"]
            obj_name = src.get("secretName" if is_secret else "name")
            read = self.core.read_namespaced_secret if is_secret else self.core.read_namespaced_config_map
            from kubernetes.client.rest import ApiException
            try:
                obj = json.loads(read(obj_name, ns, _preload_content=False).data)
            except ApiException as e:
                if e.status == 404 and src.get("optional"):
                    obj = {}
                elif e.status == 404:
                    raise _NotReady(f"{'secret' if is_secret else 'configmap'} {obj_name} not found")
                else:
                    raise
            import base64
            data: dict[str, bytes] = {}
            for k, v in (obj.get("data") or {}).items():
                data[k] = base64.b64decode(v) if is_secret else v.encode()
            for k, v in (obj.get("binaryData") or {}).items():
                data[k] = base64.b64decode(v)
            path = vol_dir / ("secret" if is_secret else "configmap") / name
            path.mkdir(parents=True, exist_ok=True)
            items = src.get("items") or [{"key": k, "path": k} for k in data]
            default_mode = src.get("defaultMode", 0o644)
            for item in items:
                if item["key"] not in data:
                    if src.get("optional"):
                        continue
                    raise NodeAgentError(f"key {item['key']!r} not in {obj_name}")
                target = path / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data[item["key"]])
                target.chmod(item.get("mode", default_mode) | (0o040 if fs_group is not None else 0))
            return path, True
        raise NodeAgentError(f"volume {name!r}: unsupported source {sorted(set(volume) - {'name'})}")

    def _apply_fs_group(self, path: Path, gid: int, recursive: bool) -> None:
        paths = [path]
        if recursive and path.is_dir():
            paths += [Path(root) / n for root, dirs, files in os.walk(path) for n in dirs + files]
        for p in paths:
            try:
                st = p.lstat()
                if p.is_symlink():
                    continue
                os.chown(p, -1, gid)
                mode = st.st_mode & 0o7777
                if p.is_dir():
                    p.chmod(mode | 0o2070)
                else:
                    p.chmod(mode | 0o060)
            except OSError:
                pass

    def _env(self, pod: dict, container: dict, ip: str, base: dict[str, str] | None = None) -> dict[str, str]:
        """The container's environment; ``base`` (image mode: the image's Env and HOME) replaces
        the venv's PATH and HOME=/tmp."""
        md, spec = pod["metadata"], pod["spec"]
        ns = md["namespace"]
        env: dict[str, str] = dict(base) if base is not None else {
            "PATH": f"{self.venv / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/tmp",
        }
        env["HOSTNAME"] = spec.get("hostname") or md["name"]
        resources = container.get("resources") or {}
        node = next(n for n in self.nodes if n.name == spec["nodeName"])
        node_alloc = {"cpu": node.cpu, "memory": node.memory, "ephemeral-storage": "100Gi"}

        def resource_value(ref: dict) -> str:
            kind, _, res = ref["resource"].partition(".")
            value = (resources.get(kind) or {}).get(res)
            if value is None and kind == "requests":
                value = (resources.get("limits") or {}).get(res)
            if value is None:
                value = node_alloc.get(res, "0") if kind == "limits" else "0"
            divisor = parse_quantity(ref.get("divisor", "1"))
            amount = parse_quantity(value) / divisor
            return str(int(-(-amount // 1)))  # ceil, like the kubelet

        def field_value(path: str) -> str:
            simple = {"metadata.name": md["name"], "metadata.namespace": ns, "metadata.uid": md["uid"],
                      "spec.nodeName": spec["nodeName"], "spec.serviceAccountName": spec.get("serviceAccountName", ""),
                      "status.hostIP": self.bridge_ip, "status.podIP": ip, "status.podIPs": ip}
            if path in simple:
                return simple[path]
            m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
            if m:
                return (md.get(m.group(1)) or {}).get(m.group(2), "")
            raise NodeAgentError(f"unsupported fieldRef {path!r}")

        def key_ref(ref: dict, secret: bool) -> str | None:
            from kubernetes.client.rest import ApiException
            import base64
            read = self.core.read_namespaced_secret if secret else self.core.read_namespaced_config_map
            try:
                obj = json.loads(read(ref["name"], ns, _preload_content=False).data)
            except ApiException as e:
                if e.status == 404 and ref.get("optional"):
                    return None
                raise
            value = (obj.get("data") or {}).get(ref["key"])
            if value is None:
                if ref.get("optional"):
                    return None
                raise NodeAgentError(f"key {ref['key']} not in {ref['name']}")
            return base64.b64decode(value).decode() if secret else value

        for src in container.get("envFrom") or []:
            from kubernetes.client.rest import ApiException
            import base64
            secret = "secretRef" in src
            ref = src.get("secretRef") or src.get("configMapRef")
            read = self.core.read_namespaced_secret if secret else self.core.read_namespaced_config_map
            try:
                obj = json.loads(read(ref["name"], ns, _preload_content=False).data)
            except ApiException as e:
                if e.status == 404 and ref.get("optional"):
                    continue
                raise
            for k, v in (obj.get("data") or {}).items():
                env[src.get("prefix", "") + k] = base64.b64decode(v).decode() if secret else v
        for item in container.get("env") or []:
            if "value" in item or "valueFrom" not in item:
                env[item["name"]] = _expand(item.get("value", ""), env)
                continue
            vf = item["valueFrom"]
            if "fieldRef" in vf:
                env[item["name"]] = field_value(vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                env[item["name"]] = resource_value(vf["resourceFieldRef"])
            elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
                value = key_ref(vf.get("secretKeyRef") or vf["configMapKeyRef"], "secretKeyRef" in vf)
                if value is not None:
                    env[item["name"]] = value
        return env

    def _start_pod(self, pod: dict) -> None:
        md, spec = pod["metadata"], pod["spec"]
        ns, name, uid = md["namespace"], md["name"], md["uid"]
        if len(spec["containers"]) != 1:
            raise NodeAgentError("the node agent runs pods with exactly one container")
        if spec.get("initContainers"):
            raise NodeAgentError("initContainers are not supported by the node agent")
        container = spec["containers"][0]
        psc = spec.get("securityContext") or {}
        csc = container.get("securityContext") or {}
        run_as_user = csc.get("runAsUser", psc.get("runAsUser"))
        run_as_group = csc.get("runAsGroup", psc.get("runAsGroup"))
        fs_group = psc.get("fsGroup")
        if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) and not run_as_user:
            raise NodeAgentError("container has runAsNonRoot and would run as root")
        image_id = ""
        if self.image_mode:
            image_id = self.images.image_id(container.get("image", "")) or ""
            if not image_id:
                self._report_never_pull(pod, container)
                raise _NotReady(f"image {container.get('image')!r} not present")
        pod_dir = self.dir / "pods" / ns / f"{name}-{uid[:8]}"
        vol_dir = pod_dir / "volumes"
        # volumes first: an unbound PVC / missing ConfigMap defers the start (_NotReady)
        sources: dict[str, tuple[Path, bool]] = {}
        for volume in spec.get("volumes") or []:
            sources[volume["name"]] = self._volume_source(pod, volume, vol_dir, fs_group)
        with self._lock:
            index = self._next_index
            self._next_index += 1
        netns = f"{NETNS_PREFIX}{self.id}-{index}"
        veth = f"{VETH_PREFIX}{self.id}{index}"
        ip = self._alloc_ip()
        run = PodRun(ns, name, uid, spec["nodeName"], spec.get("hostname") or name, spec.get("subdomain") or "",
                     netns, veth, ip, pod_dir, pod_dir / "container.log", container=container["name"],
                     image=container.get("image", ""), image_id=image_id)
        run.start_time = time.time()
        started = _now()
        run.started_at = started
        with self._lock:
            self.runs[uid] = run
        self._patch_status(ns, name, {
            "phase": "Pending", "hostIP": self.bridge_ip, "startTime": started,
            "conditions": [{"type": "PodScheduled", "status": "True"},
                           {"type": "Initialized", "status": "True", "lastTransitionTime": started}],
            "containerStatuses": [{"name": container["name"], "image": run.image, "imageID": "", "ready": False,
                                   "restartCount": 0, "started": False,
                                   "state": {"waiting": {"reason": "ContainerCreating"}}}]})
        try:
            self._setup_network(run)
            mounts = []
            for m in container.get("volumeMounts") or []:
                src, managed = sources[m["name"]]
                if fs_group is not None and not m.get("readOnly") and "hostPath" not in next(
                        v for v in spec["volumes"] if v["name"] == m["name"]):
                    self._apply_fs_group(src, int(fs_group), recursive=not managed)
                if m.get("subPath"):
                    src = src / m["subPath"]
                    src.mkdir(parents=True, exist_ok=True)
                mounts.append((m["mountPath"], src, bool(m.get("readOnly"))))
            mounts.sort(key=lambda t: t[0].rstrip("/").count("/"))
            if not self.image_mode:  # in image mode runc makes them inside the container's root
                self._make_mountpoints([t[0] for t in mounts])
            tmp = pod_dir / "tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            tmp.chmod(0o1777)
            if self.image_mode:
                self._start_container(run, pod, container, mounts, tmp)
                raise _Started
            env = self._env(pod, container, ip)
            command = [_expand(a, env) for a in (container.get("command") or []) + (container.get("args") or [])]
            if not container.get("command"):
                raise NodeAgentError("the node agent cannot read images: the container needs a command")
            script = ["set -e", f"hostname {shlex.quote(run.hostname)}"]
            for target, src, ro in mounts:
                t = shlex.quote(target)
                script += [f"mkdir -p {t}", f"mount --bind {shlex.quote(str(src))} {t}"]
                if ro:
                    script.append(f"mount -o remount,bind,ro {t}")
            # A private /tmp, mounted last (volume sources may live under the host's /tmp); not
            # when the pod mounts something at or under /tmp itself. A checkout and venv under
            # the host's /tmp are bound into it at their own paths, as a node's image would
            # simply ship the environment.
            if not any(t == "/tmp" or t.startswith("/tmp/") for t, _, _ in mounts):
                for kept in paths_under_tmp([REPO, self.venv]):
                    inside = shlex.quote(str(tmp / kept.relative_to("/tmp")))
                    script += [f"mkdir -p {inside}", f"mount --bind {shlex.quote(str(kept))} {inside}"]
                script.append(f"mount --rbind {shlex.quote(str(tmp))} /tmp")
            script.append(f"cd {shlex.quote(container.get('workingDir') or '/')}")
            user = []
            if run_as_user is not None and int(run_as_user) != 0 or run_as_group is not None:
                groups = [int(g) for g in psc.get("supplementalGroups") or []]
                if fs_group is not None:
                    groups.insert(0, int(fs_group))
                uid_ = int(run_as_user or 0)
                gid_ = int(run_as_group if run_as_group is not None else uid_)
                user = ["setpriv", f"--reuid={uid_}", f"--regid={gid_}",
                        f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"]
                if csc.get("allowPrivilegeEscalation") is False:
                    user.append("--no-new-privs")
                user.append("--")
            exec_cmd = [*user, "env", "-i", *(f"{k}={v}" for k, v in env.items()), *command]
            script.append("exec " + " ".join(shlex.quote(a) for a in exec_cmd))
            (pod_dir / "init.sh").write_text("\n".join(script) + "\n")
            run.log.parent.mkdir(parents=True, exist_ok=True)
            with open(run.log, "ab") as log:
                run.proc = subprocess.Popen(
                    ["ip", "netns", "exec", netns, "unshare", "--uts", "--mount", "--propagation", "private",
                     "--", "/bin/sh", str(pod_dir / "init.sh")],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                    cwd="/")
        except _Started:
            pass
        except BaseException:
            self._teardown(run)
            raise
        now = _now()
        container_id = f"runc://{run.runc_id}" if run.runc_id else f"node-agent://{netns}"
        self._patch_status(ns, name, {
            "phase": "Running", "hostIP": self.bridge_ip, "podIP": ip, "podIPs": [{"ip": ip}], "startTime": started,
            "conditions": [{"type": "Initialized", "status": "True", "lastTransitionTime": started},
                           {"type": "Ready", "status": "True", "lastTransitionTime": now},
                           {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                           {"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": container["name"], "image": run.image, "imageID": run.image_id,
                                   "containerID": container_id, "ready": True, "started": True,
                                   "restartCount": 0, "state": {"running": {"startedAt": now}}}]})

    def _report_never_pull(self, pod: dict, container: dict) -> None:
        """What a kubelet reports for imagePullPolicy Never and no such image: the pod stays
        Pending, its container waiting; it starts if the image appears later."""
        md = pod["metadata"]
        if md["uid"] in self._never_pulled:
            return
        self._never_pulled.add(md["uid"])
        image = container.get("image", "")
        self._patch_status(md["namespace"], md["name"], {
            "phase": "Pending", "hostIP": self.bridge_ip, "startTime": _now(),
            "conditions": [{"type": "PodScheduled", "status": "True"},
                           {"type": "Initialized", "status": "True"},
                           {"type": "Ready", "status": "False", "reason": "ContainersNotReady"},
                           {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady"}],
            "containerStatuses": [{"name": container["name"], "image": image, "imageID": "", "ready": False,
                                   "restartCount": 0, "started": False, "state": {"waiting": {
                                       "reason": "ErrImageNeverPull",
                                       "message": f'Container image "{image}" is not present with pull policy '
                                                  f'of Never'}}}]})

    def _start_container(self, run: PodRun, pod: dict, container: dict, mounts: list[tuple[str, Path, bool]],
                         tmp: Path) -> None:
        """Image mode: the container under runc, from its image, in the pod's namespaces."""
        images = self.images
        spec, ns = pod["spec"], pod["metadata"]["namespace"]
        psc = spec.get("securityContext") or {}
        csc = container.get("securityContext") or {}
        config = images.image_config(run.image_id)
        # A writable layer per pod over the shared, unpacked image (as a runtime's snapshotter).
        lower = images.rootfs(run.image_id)
        for sub in ("upper", "work", "rootfs"):
            (run.dir / sub).mkdir(parents=True, exist_ok=True)
        _run("mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={lower},upperdir={run.dir / 'upper'},workdir={run.dir / 'work'}", str(run.dir / "rootfs"))
        run.rootfs = str(run.dir / "rootfs")
        uid_ = int(csc.get("runAsUser", psc.get("runAsUser", _image_uid(config))))
        gid_ = int(csc.get("runAsGroup", psc.get("runAsGroup", _image_gid(config, uid_))))
        groups = [int(g) for g in psc.get("supplementalGroups") or []]
        if psc.get("fsGroup") is not None:
            groups.insert(0, int(psc["fsGroup"]))
        base = dict(item.split("=", 1) for item in config.get("Env") or [])
        base.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        base["HOME"] = _passwd_home(Path(lower), uid_)
        env = self._env(pod, container, run.ip, base=base)
        if container.get("command"):
            command = container["command"] + (container.get("args") or [])
        else:
            command = (config.get("Entrypoint") or []) + (container.get("args") or config.get("Cmd") or [])
        command = [_expand(a, env) for a in command]
        if not command:
            raise NodeAgentError(f"image {run.image} has no ENTRYPOINT/CMD and the container no command")
        caps = list(images.DEFAULT_CAPS)
        wanted = csc.get("capabilities") or {}
        drop = {c.upper() for c in wanted.get("drop") or []}
        caps = [] if "ALL" in drop else [c for c in caps if c.removeprefix("CAP_") not in drop]
        caps += [f"CAP_{c.upper()}" for c in wanted.get("add") or [] if f"CAP_{c.upper()}" not in caps]
        seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type", "Unconfined")
        if seccomp not in ("RuntimeDefault", "Unconfined"):
            raise NodeAgentError(f"seccompProfile {seccomp} is not supported by the node agent")
        binds = [(str(src), target, ro) for target, src, ro in mounts]
        binds.append((f"/etc/netns/{run.netns}/hosts", "/etc/hosts", True))
        if not any(t == "/tmp" or t.startswith("/tmp/") for t, _, _ in mounts):
            binds.insert(0, (str(tmp), "/tmp", False))
        oci = images.oci_spec(
            Path(run.rootfs), command, uid=uid_, gid=gid_, supplementary_gids=groups, env=[
                f"{k}={v}" for k, v in env.items()],
            cwd=container.get("workingDir") or config.get("WorkingDir") or "/",
            readonly_root=bool(csc.get("readOnlyRootFilesystem")), tmpfs=[], binds=binds, caps=caps,
            # Kubernetes' default: privilege escalation allowed unless the pod says otherwise.
            no_new_privileges=csc.get("allowPrivilegeEscalation") is False,
            seccomp=seccomp == "RuntimeDefault", netns=f"/run/netns/{run.netns}", hostname=run.hostname)
        run.runc_id = f"{run.netns}-{ns[:20]}"
        (run.dir / "oci-config.json").write_text(json.dumps(oci, indent=1))
        run.log.parent.mkdir(parents=True, exist_ok=True)
        with open(run.log, "ab") as log:
            run.proc = subprocess.Popen(images.runc_command(oci, run.dir / "bundle", run.runc_id),
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, cwd="/")

    def _make_mountpoints(self, targets: list[str]) -> None:
        """Create mount points that the host lacks (mkdir is not namespaced); removed at stop."""
        created = False
        for target in targets:
            path = Path(target)
            if any(path != Path(t) and Path(t) in path.parents for t in targets):
                continue  # made inside its parent volume, in the pod's namespace
            missing = [p for p in [path, *path.parents] if not p.exists()]
            for p in reversed(missing):
                p.mkdir()
                p.chmod(0o755)
                with self._lock:
                    self.mountpoints.append(str(p))
                created = True
        if created:
            self._save_state()
            _registry_update(self.mountpoints)

    def _setup_network(self, run: PodRun) -> None:
        peer = f"{VETH_PREFIX}{self.id}{run.netns.rsplit('-', 1)[1]}p"
        _run("ip", "netns", "add", run.netns)
        Path(f"/etc/netns/{run.netns}").mkdir(parents=True, exist_ok=True)
        self._write_hosts()
        _run("ip", "link", "add", run.veth, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", run.netns)
        _run("ip", "-n", run.netns, "link", "set", peer, "name", "eth0")
        _run("ip", "-n", run.netns, "addr", "add", f"{run.ip}/16", "dev", "eth0")
        _run("ip", "-n", run.netns, "link", "set", "lo", "up")
        _run("ip", "-n", run.netns, "link", "set", "eth0", "up")
        _run("ip", "-n", run.netns, "route", "add", "default", "via", self.bridge_ip)
        _run("ip", "link", "set", run.veth, "master", self.bridge)
        _run("ip", "link", "set", run.veth, "up")

    def _write_hosts(self) -> None:
        """Every pod's /etc/hosts, rewritten in place (it is bind-mounted into running pods)."""
        with self._lock:
            runs = [r for r in self.runs.values() if not r.torn_down]
            for run in runs:
                lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                         "fe00::0\tip6-localnet", "ff02::1\tip6-allnodes", "ff02::2\tip6-allrouters"]
                for other in sorted(runs, key=lambda r: (r is not run, r.ip)):
                    names = []
                    if other.subdomain:
                        fq = f"{other.hostname}.{other.subdomain}.{other.namespace}.svc"
                        if other.namespace == run.namespace:
                            names += [other.hostname, f"{other.hostname}.{other.subdomain}"]
                        names += [fq, f"{fq}.cluster.local"]
                    elif other is run:
                        names = [other.hostname]
                    if names:
                        lines.append(f"{other.ip}\t" + " ".join(names))
                path = Path(f"/etc/netns/{run.netns}/hosts")
                if path.parent.is_dir():
                    with open(path, "w") as f:  # same inode: the bind mount sees the update
                        f.write("\n".join(lines) + "\n")

    # ------------------------------------------------------------------ pod stop
    def _terminate(self, run: PodRun, pod: dict, reason: str) -> None:
        grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        if reason == "Deleted" and pod["metadata"].get("deletionGracePeriodSeconds") is not None:
            grace = pod["metadata"]["deletionGracePeriodSeconds"]
        run.stop_reason = reason
        now = time.monotonic()
        kill_at = now + min(float(grace), self.grace_cap)
        if run.kill_at is None or kill_at < run.kill_at:
            run.grace = min(float(grace), self.grace_cap)
        run.kill_at = kill_at if run.kill_at is None else min(run.kill_at, kill_at)
        if run.sigterm_at is None:
            run.sigterm_at = now
        try:
            os.kill(run.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def _log_tail(self, run: PodRun) -> str:
        try:
            with open(run.log, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 64 * 1024))
                data = f.read().decode(errors="replace")
        except OSError:
            return ""
        tail = "\n".join(data.rstrip("\n").splitlines()[-LOG_TAIL_LINES:])
        return tail[-LOG_TAIL_BYTES:]

    def _report_terminated(self, run: PodRun, exit_code: int) -> None:
        pod = json.loads(self.core.read_namespaced_pod(run.name, run.namespace, _preload_content=False).data)
        container = pod["spec"]["containers"][0]
        now = _now()
        term: dict[str, Any] = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                                "startedAt": run.started_at, "finishedAt": now,
                                "containerID": f"runc://{run.runc_id}" if run.runc_id
                                else f"node-agent://{run.netns}"}
        if exit_code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            term["message"] = self._log_tail(run)
        phase = "Succeeded" if exit_code == 0 and run.stop_reason != "DeadlineExceeded" else "Failed"
        done = "PodCompleted"
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "False", "reason": done, "lastTransitionTime": now},
                           {"type": "ContainersReady", "status": "False", "reason": done,
                            "lastTransitionTime": now}],
            "containerStatuses": [{"name": run.container, "image": run.image, "imageID": run.image_id,
                                   "containerID": term["containerID"], "ready": False, "started": False,
                                   "restartCount": 0, "state": {"terminated": term}}]}
        if run.stop_reason == "DeadlineExceeded":
            status["reason"] = "DeadlineExceeded"
            status["message"] = "Pod was active on the node longer than the specified deadline"
        self._patch_status(run.namespace, run.name, status)

    def _teardown(self, run: PodRun) -> None:
        with self._lock:
            if run.torn_down:
                return
            run.torn_down = True
        _kill_netns(run.netns)
        if run.runc_id:
            _run("runc", "--root", str(RUNC_ROOT), "delete", "--force", run.runc_id, check=False)
        if run.rootfs:
            _run("umount", "--lazy", run.rootfs, check=False)
        _run("ip", "netns", "del", run.netns, check=False)
        _run("ip", "link", "del", run.veth, check=False)
        shutil.rmtree(f"/etc/netns/{run.netns}", ignore_errors=True)
        with self._lock:
            self._used_ips.discard(run.ip)
            self.runs.pop(run.uid, None)
            self.finished[run.uid] = run
        self._write_hosts()


class _NotReady(Exception):
    """A volume's source is not there yet: try again on the next sync."""


class _Started(Exception):
    """Image mode: the container was started by _start_container (skip the venv path)."""


def _images_module():
    """docker/images.py (the image store, rootfs and OCI spec helpers), loaded by path."""
    import importlib.util
    name = "finetune_tests_images"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "docker" / "images.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _image_uid(config: dict) -> int:
    user = (config.get("User") or "0").split(":")[0]
    if not user.isdigit():
        raise NodeAgentError(f"image USER {user!r} is not numeric; set runAsUser")
    return int(user)


def _image_gid(config: dict, uid: int) -> int:
    user = config.get("User") or ""
    return int(user.split(":")[1]) if ":" in user and user.split(":")[1].isdigit() else uid


def _passwd_home(root: Path, uid: int) -> str:
    """HOME as a runtime sets it: the image's /etc/passwd entry for the uid, else /."""
    try:
        for line in (root / "etc" / "passwd").read_text().splitlines():
            fields = line.split(":")
            if len(fields) >= 6 and fields[2] == str(uid):
                return fields[5] or "/"
    except OSError:
        pass
    return "/"


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - manual use
    import argparse
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from control_plane import ControlPlane
    ap = argparse.ArgumentParser(description="control plane + node agent, until Ctrl-C")
    ap.add_argument("--node", action="append", default=[], metavar="NAME[:CPU:MEM[:GPUS]]")
    args = ap.parse_args(argv)
    specs = []
    for spec in args.node or ["node-0"]:
        name, *rest = spec.split(":")
        cpu, mem, gpus = (rest + ["4", "16Gi", "0"][len(rest):])[:3]
        specs.append(NodeSpec(name, cpu, mem, int(gpus)))
    with ControlPlane() as cp, NodeAgent(cp, specs) as agent:
        print(f"export KUBECONFIG={cp.kubeconfig}\nnode agent {agent.id}: bridge {agent.bridge} "
              f"{agent.bridge_ip}/16, work dir {agent.dir}", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
