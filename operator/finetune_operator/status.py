"""Kubernetes-shaped status helpers: phases, conditions, pod outcomes, human-readable fields.

All functions are pure (they take ``now`` instead of reading the clock) so the state machine
in ``reconcile.py`` is unit-testable.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
from typing import Any, Iterable, Mapping

PENDING = "Pending"
RUNNING = "Running"
RESTARTING = "Restarting"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
PHASES = (PENDING, RUNNING, RESTARTING, SUCCEEDED, FAILED, SUSPENDED)
TERMINAL_PHASES = (SUCCEEDED, FAILED)

# Condition types. Each phase but Pending has its own; Created marks that pods were made.
CREATED = "Created"
SPEC_CHANGE_REJECTED = "SpecChangeRejected"
# Conditions that describe the current activity: at most one of them is True at a time.
ACTIVITY_CONDITIONS = (RUNNING, RESTARTING, SUSPENDED)

# Exit codes the trainer uses for "killed by a signal" (128 + SIGINT/SIGKILL/SIGTERM): the node
# or the kubelet stopped it, the run can continue from last.pt.
RETRYABLE_EXIT_CODES = frozenset({130, 137, 143})
# Pod-level reasons for infrastructure failures (kubelet eviction, node loss or shutdown, the
# node enforcing a pod deadline, admission on a node that changed).
RETRYABLE_POD_REASONS = frozenset({
    "Evicted", "NodeLost", "DeadlineExceeded", "Shutdown", "Terminated", "NodeShutdown",
    "UnexpectedAdmissionError", "Preempting", "OutOfcpu", "OutOfmemory", "OutOfpods",
})
SIGNAL_NAMES = {130: "SIGINT", 137: "SIGKILL", 143: "SIGTERM", 139: "SIGSEGV", 134: "SIGABRT"}


def timestamp(now: dt.datetime) -> str:
    return now.astimezone(dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


def get_condition(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    for condition in conditions or ():
        if condition.get("type") == type_:
            return condition
    return None


def condition_is_true(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> bool:
    condition = get_condition(conditions, type_)
    return bool(condition and condition.get("status") == "True")


def set_condition(
    conditions: Iterable[Mapping[str, Any]] | None,
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    now: dt.datetime,
) -> list[dict[str, Any]]:
    """A new condition list with ``type_`` set; lastTransitionTime moves only when status does."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    result = [dict(c) for c in conditions or ()]
    for condition in result:
        if condition.get("type") == type_:
            if condition.get("status") != value:
                condition["lastTransitionTime"] = timestamp(now)
            condition.update(status=value, reason=reason, message=message)
            return result
    result.append({
        "type": type_, "status": value, "reason": reason, "message": message,
        "lastTransitionTime": timestamp(now),
    })
    return result


def enter_phase(
    status: Mapping[str, Any], phase: str, reason: str, message: str, now: dt.datetime
) -> dict[str, Any]:
    """Status moved to ``phase``: its condition True, the other activity conditions False."""
    new = copy.deepcopy(dict(status))
    new["phase"] = phase
    new["message"] = message
    conditions = new.get("conditions") or []
    if phase in (RUNNING, RESTARTING, SUSPENDED, SUCCEEDED, FAILED):
        conditions = set_condition(conditions, phase, True, reason, message, now)
    for other in ACTIVITY_CONDITIONS:
        if other != phase and get_condition(conditions, other) is not None:
            conditions = set_condition(conditions, other, False, reason, message, now)
    new["conditions"] = conditions
    return new


@dataclasses.dataclass(frozen=True)
class PodOutcome:
    """What one worker pod means for the run."""

    name: str
    state: str  # "pending", "running", "succeeded", "failed"
    retryable: bool = False
    exit_code: int | None = None
    reason: str = ""
    detail: str = ""  # last line of the termination message, or the pod's status message

    def describe(self) -> str:
        """"pod x-worker-1 failed with exit code 2 (error: ...)" — for status.message."""
        if self.exit_code is not None:
            signal = SIGNAL_NAMES.get(self.exit_code)
            text = f"worker pod {self.name} failed with exit code {self.exit_code}"
            if signal:
                text += f" ({signal})"
        else:
            text = f"worker pod {self.name} failed"
        if self.reason:
            text += f", reason {self.reason}"
        if self.detail:
            text += f": {self.detail}"
        return text


def classify_exit_code(code: int) -> str:
    """'succeeded', 'retryable' (signals: continue from last.pt) or 'permanent'."""
    if code == 0:
        return "succeeded"
    return "retryable" if code in RETRYABLE_EXIT_CODES else "permanent"


def _last_line(text: str | None) -> str:
    """The line that explains a failure: the trainer's last `error: ...` line (the
    launcher prints its own summary after it), else the last line."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "] error:" in line]
    chosen = errors[-1] if errors else (lines[-1] if lines else "")
    return chosen[:300]


def _trainer_terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for container in statuses:
        if container.get("name") == "trainer" or len(statuses) == 1:
            state = container.get("state") or {}
            if "terminated" in state:
                return state["terminated"]
            last = container.get("lastState") or {}
            if "terminated" in last:
                return last["terminated"]
    return None


def classify_pod(pod: Mapping[str, Any]) -> PodOutcome:
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    terminated = _trainer_terminated(pod)
    if phase == "Succeeded":
        return PodOutcome(name, "succeeded", exit_code=0)
    if phase == "Failed":
        pod_reason = status.get("reason") or ""
        if terminated is not None and terminated.get("exitCode") is not None:
            code = int(terminated["exitCode"])
            detail = _last_line(terminated.get("message")) or _last_line(status.get("message"))
            reason = terminated.get("reason") or pod_reason
            if reason in ("Error", "Completed"):
                reason = ""  # says nothing the exit code does not
            retryable = classify_exit_code(code) == "retryable" or pod_reason in RETRYABLE_POD_REASONS
            return PodOutcome(name, "failed", retryable, code, reason, detail)
        # No exit code: the pod never ran or the node went away; an infrastructure failure
        # unless the kubelet said otherwise.
        retryable = pod_reason in RETRYABLE_POD_REASONS or not pod_reason
        return PodOutcome(name, "failed", retryable, None, pod_reason, _last_line(status.get("message")))
    if phase == "Running":
        return PodOutcome(name, "running")
    return PodOutcome(name, "pending", detail=waiting_reason(pod))


def waiting_reason(pod: Mapping[str, Any]) -> str:
    """Why a pending pod is not running yet ("ImagePullBackOff: ...", "Unschedulable: ...")."""
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "ContainerCreating"):
            return f"{waiting.get('reason')}: {_last_line(waiting.get('message'))}".rstrip(": ")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"{condition.get('reason') or 'Unschedulable'}: {_last_line(condition.get('message'))}".rstrip(": ")
    return ""


def human_bytes(value: float | int | None) -> str:
    """3325549363 -> '3.1Gi' (binary units, like kubectl quantities)."""
    if value is None:
        return ""
    amount = float(value)
    for unit in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(amount) < 1024 or unit == "Ti":
            if unit == "":
                return f"{int(amount)}"
            return f"{amount:.1f}{unit}"
        amount /= 1024
    return f"{amount:.1f}Ti"  # pragma: no cover - loop always returns


def progress(epoch: int | None, epochs: int | None) -> str:
    return f"{epoch or 0}/{epochs}" if epochs else ""


def apply_trainer_metrics(status: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Status with the latest scraped trainer metrics (see scrape.TrainerMetrics.as_status)."""
    new = copy.deepcopy(dict(status))
    if not metrics:
        return new
    current = {k: v for k, v in metrics.items() if v is not None}
    epoch = current.get("epoch")
    epochs = current.pop("epochs", None)
    if epoch is not None:
        new["epoch"] = int(epoch)
    if epochs:
        new["epochs"] = int(epochs)
    new["progress"] = progress(new.get("epoch"), new.get("epochs"))
    merged = dict(new.get("metrics") or {})
    merged.update(current)
    new["metrics"] = merged
    if merged.get("gpuMemoryPeakBytes") is not None:
        new["gpuMemory"] = human_bytes(merged["gpuMemoryPeakBytes"])
    best = new.get("bestMetrics") or {}
    score = merged.get("map50_95")
    if score is not None and (best.get("map50_95") is None or score > best["map50_95"]):
        new["bestMetrics"] = {k: v for k, v in merged.items()
                              if k in ("epoch", "map50", "map50_95", "precision", "recall")}
    return new
