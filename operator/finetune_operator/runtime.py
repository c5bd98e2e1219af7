"""What the kopf handlers call: plain functions around ``reconcile`` plus the shared state
(API client, metrics, settings) that main's startup handler configures once.

Errors are translated for kopf here: API trouble is "not yet" (``kopf.TemporaryError``), an
invalid spec is "never" (``kopf.PermanentError``, after the Failed condition was written).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import kopf
import urllib3.exceptions

from . import kube as kube_
from . import metrics as metrics_
from . import reconcile
from . import validation

logger = logging.getLogger(__name__)

RETRY_DELAY_SECONDS = 5.0


@dataclasses.dataclass
class Runtime:
    kube: kube_.Kube
    metrics: metrics_.OperatorMetrics
    default_image: str | None = None
    scrape_timeout: float = 2.0
    allowed_volume_types: tuple[str, ...] = validation.DEFAULT_ALLOWED_VOLUME_TYPES
    # None: no NetworkPolicy per FineTune; else the peers that may reach the metrics port.
    network_policy_metrics_from: list[dict[str, Any]] | None = None


_runtime: Runtime | None = None


def configure(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def get() -> Runtime:
    global _runtime
    if _runtime is None:  # handlers fired before startup finished (or a test imported them)
        _runtime = Runtime(kube=kube_.shared(), metrics=metrics_.default(),
                           default_image=os.environ.get("FINETUNE_TRAINER_IMAGE") or None)
    return _runtime


def post_event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """A Kubernetes Event on the FineTune (via kopf's poster, which honours posting.level)."""
    try:
        if type_ == "Warning":
            kopf.warn(dict(body), reason=reason, message=message[:1000])
        else:
            kopf.info(dict(body), reason=reason, message=message[:1000])
    except LookupError:  # outside kopf's context (unit tests): the log line is enough
        pass


def _reconcile(handler: str, namespace: str, name: str) -> reconcile.Plan | None:
    runtime = get()
    with runtime.metrics.time_handler(handler):
        try:
            return reconcile.reconcile(
                runtime.kube, namespace, name,
                post_event=post_event, operator_metrics=runtime.metrics,
                default_image=runtime.default_image, scrape_timeout=runtime.scrape_timeout,
                allowed_volume_types=runtime.allowed_volume_types,
                network_policy_metrics_from=runtime.network_policy_metrics_from,
            )
        except kube_.KubeError as e:
            raise kopf.TemporaryError(f"API error while reconciling {namespace}/{name}: {e}",
                                      delay=RETRY_DELAY_SECONDS) from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise kopf.TemporaryError(f"API unreachable while reconciling {namespace}/{name}: {e}",
                                      delay=RETRY_DELAY_SECONDS) from e


def reconcile_change(handler: str, namespace: str, name: str) -> None:
    """create/resume/update: like the timer, but an invalid spec fails the handler for good."""
    result = _reconcile(handler, namespace, name)
    # Only when this call made the transition: later events on a failed FineTune stay quiet.
    if result is not None and result.validation_failed and "failed" in result.counters:
        raise kopf.PermanentError(result.status.get("message") or "invalid spec")


def reconcile_periodically(namespace: str, name: str) -> None:
    _reconcile("timer", namespace, name)


def reconcile_owner_of_pod(namespace: str, finetune_name: str) -> None:
    """A worker pod changed: its FineTune's status may have to follow at once."""
    try:
        _reconcile("pod-event", namespace, finetune_name)
    except kopf.TemporaryError as e:
        logger.warning("%s (the timer will retry)", e)


def forget_finetune(namespace: str, name: str) -> None:
    """The FineTune is being deleted: its pods and Service go by garbage collection."""
    get().metrics.forget(namespace, name)
    reconcile.forget(namespace, name)
