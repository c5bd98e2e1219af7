"""Kubernetes-shaped status helpers: phases, conditions, pod outcomes, human-readable fields.

All functions are pure (they take ``now`` instead of reading the clock) so the state machine
in ``reconcile.py`` is unit-testable.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
from typing import Any, Iterable, Mapping

from finetune.config import FREEZE_AUTO, FREEZE_AUTO_MARGIN

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

# What a failed worker means for the run (spec.failurePolicy's actions): FailFineTune ends it,
# Restart starts every worker again from last.pt (counted against spec.backoffLimit), Ignore
# does too but counts as a disruption (spec.maxDisruptions), as the cluster's doing.
FAIL_FINETUNE, RESTART, IGNORE = "FailFineTune", "Restart", "Ignore"
# Kubeflow's ExitCode restart policy, the default: 1-127 are the program's own verdict
# (permanent), 128-255 are 128 + a signal (SIGKILL from the OOM killer, SIGABRT from the NCCL
# watchdog, SIGTERM from a deletion: retryable).
RETRYABLE_EXIT_CODES = frozenset(range(128, 256))
# Pod-level reasons the node gives when it, not the program, ended the pod (kubelet eviction,
# node loss or shutdown, admission on a node that changed, kubelet preemption): disruptions.
DISRUPTION_POD_REASONS = frozenset({
    "Evicted", "NodeLost", "Shutdown", "Terminated", "NodeShutdown",
    "UnexpectedAdmissionError", "Preempting", "OutOfcpu", "OutOfmemory", "OutOfpods",
})
# The node enforcing a pod's activeDeadlineSeconds: retryable, not a disruption.
RETRYABLE_POD_REASONS = frozenset({"DeadlineExceeded"})
# Kubernetes >= 1.26 marks a pod it is about to delete or fail for the cluster's reasons.
DISRUPTION_TARGET = "DisruptionTarget"
SIGNAL_NAMES = {130: "SIGINT", 137: "SIGKILL", 143: "SIGTERM", 139: "SIGSEGV", 134: "SIGABRT"}


def timestamp(now: dt.datetime) -> str:
    return now.astimezone(dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(value: str | None) -> dt.datetime | None:
    """An RFC 3339 time from the API (None if absent or not one)."""
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


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
    # Failed (or deleted) for the cluster's reasons, not the program's: counts as a disruption.
    disruption: bool = False
    # When it failed (the container's finishedAt, the deletion time); None if unknown.
    at: dt.datetime | None = None

    @property
    def cause(self) -> str:
        """How a failure counts: 'disruption', 'retryable' or 'permanent'."""
        return "disruption" if self.disruption else "retryable" if self.retryable else "permanent"

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


def exit_code_action(code: int, failure_policy: Mapping[str, Any] | None = None) -> str:
    """What a worker's non-zero exit code means (FAIL_FINETUNE, RESTART or IGNORE): the first
    of spec.failurePolicy.rules that matches it (like a Job's podFailurePolicy), else Kubeflow's
    default (RETRYABLE_EXIT_CODES restart, the rest fail the run)."""
    for rule in (failure_policy or {}).get("rules") or []:
        on = rule.get("onExitCodes") or {}
        values = set(on.get("values") or [])
        if (code in values) == (on.get("operator", "In") == "In"):
            return str(rule["action"])
    return RESTART if code in RETRYABLE_EXIT_CODES else FAIL_FINETUNE


def classify_exit_code(code: int, failure_policy: Mapping[str, Any] | None = None) -> str:
    """'succeeded', 'retryable' (continue from last.pt), 'disruption' (ditto, not counted
    against backoffLimit) or 'permanent'."""
    if code == 0:
        return "succeeded"
    return {RESTART: "retryable", IGNORE: "disruption"}.get(exit_code_action(code, failure_policy), "permanent")


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


def disruption_target(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The pod's DisruptionTarget condition if it is True (Kubernetes >= 1.26)."""
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == DISRUPTION_TARGET and condition.get("status") == "True":
            return condition
    return None


def deletion_time(pod: Mapping[str, Any]) -> dt.datetime | None:
    """When a terminating pod was deleted: its deletionTimestamp is that plus the grace period."""
    meta = pod.get("metadata") or {}
    deleted = parse_timestamp(meta.get("deletionTimestamp"))
    if deleted is None:
        return None
    return deleted - dt.timedelta(seconds=int(meta.get("deletionGracePeriodSeconds") or 0))


def deleted_by_others(pod: Mapping[str, Any]) -> PodOutcome:
    """A worker pod of the running attempt that someone other than the operator deleted (the
    scheduler preempting it, the Eviction API, a drain, the pod garbage collector after its
    Node went): a disruption, at the time of the deletion."""
    target = disruption_target(pod)
    reason = str(target.get("reason") or DISRUPTION_TARGET) if target else "Deleted"
    detail = (_last_line(target.get("message")) if target else "") or (
        "deleted by someone other than the operator (preemption, eviction, a drain or its node's removal)")
    return PodOutcome(pod["metadata"]["name"], "failed", True, reason=reason, detail=detail, disruption=True,
                      at=deletion_time(pod))


def classify_pod(pod: Mapping[str, Any], failure_policy: Mapping[str, Any] | None = None) -> PodOutcome:
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    terminated = _trainer_terminated(pod)
    if phase == "Succeeded":
        return PodOutcome(name, "succeeded", exit_code=0)
    if phase == "Failed":
        pod_reason = status.get("reason") or ""
        target = disruption_target(pod)
        disruption = pod_reason in DISRUPTION_POD_REASONS or target is not None
        if target is not None and not pod_reason:
            pod_reason = str(target.get("reason") or DISRUPTION_TARGET)
        if terminated is not None and terminated.get("exitCode") is not None:
            code = int(terminated["exitCode"])
            detail = _last_line(terminated.get("message")) or _last_line(status.get("message"))
            reason = terminated.get("reason") or ""
            if reason in ("Error", "Completed", ""):
                reason = pod_reason  # the container's says nothing the exit code does not
            kind = classify_exit_code(code, failure_policy)
            retryable = kind != "permanent" or pod_reason in RETRYABLE_POD_REASONS or disruption
            return PodOutcome(name, "failed", retryable, code, reason, detail,
                              disruption=disruption or kind == "disruption",
                              at=parse_timestamp(terminated.get("finishedAt")))
        # No exit code: the pod never ran or the node went away; an infrastructure failure
        # unless the kubelet said otherwise.
        retryable = pod_reason in RETRYABLE_POD_REASONS or disruption or not pod_reason
        return PodOutcome(name, "failed", retryable, None, pod_reason, _last_line(status.get("message")),
                          disruption=disruption)
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


# Scraped feature-cache figures (scrape._RUN_GAUGES) -> status.featureCache fields.
FEATURE_CACHE_FIELDS = {"featureCacheBytes": "bytes", "featureCacheBuildSeconds": "buildSeconds",
                        "featureCacheViews": "views"}


def freeze_status(previous: Mapping[str, Any] | None, spec_freeze: Any, depth: int | None,
                  budget: int | None, probes: list[dict[str, int]] | None) -> dict[str, Any]:
    """status.freeze: what spec.freeze asked for, the depth the trainer trains at, and with
    freeze auto the budget and each probe's peak (``fits``: within the budget less the margin)."""
    new = dict(previous or {})
    if spec_freeze is not None:
        new["requested"] = str(spec_freeze)
    elif probes and "requested" not in new:
        new["requested"] = FREEZE_AUTO
    if depth is not None:
        new["chosen"] = int(depth)
    if budget is not None:
        new["budgetBytes"], new["budget"] = int(budget), human_bytes(budget)
    if probes:
        new["probes"] = [{"depth": p["depth"], "peakBytes": p["peakBytes"], "peak": human_bytes(p["peakBytes"])}
                         for p in probes]
    if "budgetBytes" in new:
        usable = new["budgetBytes"] * (1 - FREEZE_AUTO_MARGIN)
        for p in new.get("probes", []):
            p["fits"] = p["peakBytes"] <= usable
    return new


def apply_trainer_metrics(status: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Status with the latest scraped trainer metrics (see scrape.TrainerMetrics.as_status)."""
    new = copy.deepcopy(dict(status))
    if not metrics:
        return new
    current = {k: v for k, v in metrics.items() if v is not None}
    depth = current.pop("freezeDepth", None)
    budget = current.pop("freezeBudgetBytes", None)
    probes = current.pop("freezeProbes", None)
    if depth is not None or probes:
        # The depth trained at (freeze auto: chosen from the probes' measured peaks).
        new["freeze"] = freeze_status(new.get("freeze"), (new.get("appliedSpec") or {}).get("freeze"), depth, budget,
                                      probes)
    cache = {FEATURE_CACHE_FIELDS[k]: current.pop(k) for k in list(current) if k in FEATURE_CACHE_FIELDS}
    if cache:
        # --cache features: its size and build time, beside the images/s it trains at.
        new["featureCache"] = {**(new.get("featureCache") or {}), **cache}
        if "bytes" in new["featureCache"]:
            new["featureCache"]["size"] = human_bytes(new["featureCache"]["bytes"])
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
