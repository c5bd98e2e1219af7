"""The operator's own Prometheus metrics (served on :8080 by main's startup handler).

Per-FineTune gauges are set from status, not from the trainer, so they survive after the
trainer pods are gone; they are removed when the FineTune is deleted.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from . import status as st


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.registry = registry
        self.finetunes = Gauge("finetune_operator_finetunes", "FineTunes by phase (count).",
                               ["phase"], registry=registry)
        self.created = Counter("finetune_operator_created", "FineTunes whose workers were created.",
                               registry=registry)
        self.succeeded = Counter("finetune_operator_succeeded", "FineTunes that succeeded.",
                                 registry=registry)
        self.failed = Counter("finetune_operator_failed", "FineTunes that failed.", registry=registry)
        self.restarts = Counter("finetune_operator_restarts", "Restarts of all workers after a retryable failure.",
                                registry=registry)
        self.disruptions = Counter("finetune_operator_disruptions",
                                   "Restarts of all workers after the cluster took one away (preemption, eviction, "
                                   "drain, node loss).", registry=registry)
        self.reconcile_duration = Histogram(
            "finetune_operator_reconcile_duration_seconds", "Time spent in one reconcile, by what asked for it (seconds).",
            ["handler"], registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.queue_depth = Gauge("finetune_operator_work_queue_depth",
                                 "FineTunes waiting for a reconcile (count).", registry=registry)
        labels = ["namespace", "finetune"]
        self.map50 = Gauge("finetune_operator_map50", "Latest validation mAP@0.5 (ratio 0-1).", labels, registry=registry)
        self.map50_95 = Gauge("finetune_operator_map50_95", "Latest validation mAP@0.5:0.95 (ratio 0-1).",
                              labels, registry=registry)
        self.best_map50 = Gauge("finetune_operator_best_map50", "mAP@0.5 of the best epoch (ratio 0-1).",
                                labels, registry=registry)
        self.best_map50_95 = Gauge("finetune_operator_best_map50_95", "Best mAP@0.5:0.95 (ratio 0-1).",
                                   labels, registry=registry)
        self.gpu_memory_peak = Gauge("finetune_operator_gpu_memory_peak_bytes",
                                     "Peak accelerator (or CPU) memory of the largest rank (bytes).",
                                     labels, registry=registry)
        self._per_finetune = (self.map50, self.map50_95, self.best_map50, self.best_map50_95, self.gpu_memory_peak)
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        for phase in st.PHASES:
            self.finetunes.labels(phase=phase).set(0)

    @contextmanager
    def time_handler(self, handler: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.reconcile_duration.labels(handler=handler).observe(time.monotonic() - started)

    def observe(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Copy one FineTune's status into the gauges."""
        key = (namespace, name)
        with self._lock:
            phase = status.get("phase")
            if phase:
                self._phases[key] = phase
            self._refresh_phase_counts()
        metrics = status.get("metrics") or {}
        best = status.get("bestMetrics") or {}
        for gauge, value in ((self.map50, metrics.get("map50")), (self.map50_95, metrics.get("map50_95")),
                             (self.best_map50, best.get("map50")), (self.best_map50_95, best.get("map50_95")),
                             (self.gpu_memory_peak, metrics.get("gpuMemoryPeakBytes"))):
            if value is not None:
                gauge.labels(namespace=namespace, finetune=name).set(float(value))

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._phases.pop((namespace, name), None)
            self._refresh_phase_counts()
        for gauge in self._per_finetune:
            try:
                gauge.remove(namespace, name)
            except KeyError:
                pass

    def _refresh_phase_counts(self) -> None:
        counts = {phase: 0 for phase in st.PHASES}
        for phase in self._phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            self.finetunes.labels(phase=phase).set(count)

    def count_transition(self, kind: str) -> None:
        counter = {"created": self.created, "succeeded": self.succeeded,
                   "failed": self.failed, "restarts": self.restarts,
                   "disruptions": self.disruptions}.get(kind)
        if counter is not None:
            counter.inc()

