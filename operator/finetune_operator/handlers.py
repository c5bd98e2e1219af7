"""kopf wiring only: indexes of what the operator watches, and handlers that forward to ``runtime``.

The indexes (kopf keeps them from its watches) are all the reconciler reads: a reconcile makes
no GET or LIST, only the writes it decides on. Services are not watched: a run's Service (and
its other objects) are created with its first pods (see runtime.observe). Every function here
is async and quick (an index entry, or a FineTune put on runtime's work queue): nothing in
kopf's event loop or its thread pool waits on the API.
"""

from __future__ import annotations

from typing import Any

import kopf

from . import manifests as m
from . import runtime

# Pods the operator made (also the server-side label selector of their watch, set in main's
# startup handler).
OWNED_LABELS = {m.LABEL_MANAGED_BY: m.MANAGED_BY, m.LABEL_FINETUNE: kopf.PRESENT}


# kubectl apply's copy of the whole manifest (kopf reads it only for diff bases, which this
# operator does not keep: main.NoDiffBase).
LAST_APPLIED_ANNOTATION = "kubectl.kubernetes.io/last-applied-configuration"


def _drop_unread_fields(body: kopf.Body) -> None:
    """Drop ``metadata.managedFields`` and kubectl's last-applied annotation from the copy kopf
    holds (the cluster's object keeps them).

    kopf keeps each listed object's body until every index is complete: its event handlers wait
    for that. So an operator restarted over 1000 FineTunes holds all 3000 bodies at once, and
    managedFields are nearly half of a worker pod's (2.9 of 6.5 KB). The memory of that peak
    stays with the process (CPython's arenas stay fragmented), while nothing here reads these
    fields, nor does kopf without diff bases (main.NoDiffBase). ``body["metadata"]`` is the
    parsed dict itself, not a copy."""
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        metadata.pop("managedFields", None)
        annotations = metadata.get("annotations")
        if isinstance(annotations, dict):
            annotations.pop(LAST_APPLIED_ANNOTATION, None)


# The index functions only return entries. kopf stores an entry after its function returns and
# calls the event handlers after that: the handlers, not these, tell the runtime that the watch has
# caught up (runtime.LatestCopies, RecentPods), so that no reconcile thread ever finds the
# operator's own copy dropped while the index still holds the older one.
@kopf.index(m.GROUP, m.VERSION, m.PLURAL)
async def finetunes_by_name(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[runtime.Key, Any]:
    _drop_unread_fields(body)
    return {(namespace, name): runtime.finetune_entry(body)}


@kopf.index("", "v1", "pods", labels=OWNED_LABELS)
async def worker_pods_by_finetune(namespace: str, labels: kopf.Labels, body: kopf.Body,
                                  **_: Any) -> dict[runtime.Key, Any]:
    _drop_unread_fields(body)
    return {(namespace, labels[m.LABEL_FINETUNE]): runtime.pod_entry(body)}


# A plain event handler rather than kopf's create/update/resume handlers: those record their
# progress and the last handled spec in annotations, one more write per FineTune and a new
# resourceVersion after every reconcile. The reconcile is level-triggered, so every change of
# the FineTune (the first listing after a restart included) simply reconciles it, except the
# operator's own last write (see runtime.finetune_changed).
@kopf.on.event(m.GROUP, m.VERSION, m.PLURAL)
async def finetune_changed(type: str, namespace: str, name: str, body: kopf.Body, memo: kopf.Memo,  # noqa: A002
                     finetunes_by_name: kopf.Index, worker_pods_by_finetune: kopf.Index, **_: Any) -> None:
    cache = runtime.Cache(finetunes_by_name, worker_pods_by_finetune)
    if type == "DELETED":
        # No finalizer: the pods and Service go by garbage collection, and what the operator
        # keeps per FineTune (metrics, copies, its clock in the work queue) goes once it is gone.
        runtime.finetune_deleted(memo.runtime, (namespace, name), cache)
        return
    runtime.finetune_changed(memo.runtime, (namespace, name), cache, body)


@kopf.on.event("", "v1", "pods", labels=OWNED_LABELS)
async def worker_pod_event(namespace: str, labels: kopf.Labels, body: kopf.Body, memo: kopf.Memo,
                     finetunes_by_name: kopf.Index, worker_pods_by_finetune: kopf.Index, **_: Any) -> None:
    cache = runtime.Cache(finetunes_by_name, worker_pods_by_finetune)
    runtime.worker_pod_changed(memo.runtime, (namespace, labels[m.LABEL_FINETUNE]), body, cache)
