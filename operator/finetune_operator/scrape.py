"""Reads rank 0's Prometheus endpoint (docs/trainer-contract.md) into status-shaped numbers.

Scraping is best effort: a trainer that is still starting, or a network policy in the way,
only means the status shows older numbers.
"""

from __future__ import annotations

import dataclasses
import urllib.request
from typing import Any, Mapping

from prometheus_client.parser import text_string_to_metric_families

# Sample name -> status.metrics field. Per-run gauges are read from rank 0's series.
_RUN_GAUGES = {
    "finetune_epoch": "epoch",
    "finetune_epochs_total": "epochs",
    "finetune_map50": "map50",
    "finetune_map50_95": "map50_95",
    "finetune_precision": "precision",
    "finetune_recall": "recall",
    "finetune_images_per_second": "imagesPerSecond",
}
# Per-rank peak memory: the largest rank is the one that runs out first.
_PEAK_MEMORY = ("finetune_gpu_memory_peak_bytes", "finetune_cpu_memory_peak_bytes")
_INTEGER_FIELDS = ("epoch", "epochs", "gpuMemoryPeakBytes")


@dataclasses.dataclass
class TrainerMetrics:
    values: dict[str, float] = dataclasses.field(default_factory=dict)

    def as_status(self) -> dict[str, Any]:
        """The fields status.apply_trainer_metrics expects (ints where the CRD says integer)."""
        result: dict[str, Any] = {}
        for key, value in self.values.items():
            result[key] = int(value) if key in _INTEGER_FIELDS else round(float(value), 6)
        return result


def parse_metrics(text: str, finetune: str | None = None) -> TrainerMetrics:
    """Parse the exposition text; ``finetune`` restricts to series with that label (if present)."""
    values: dict[str, float] = {}
    peak: float | None = None
    losses: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if finetune and labels.get("finetune") not in (None, finetune):
                continue
            if sample.name in _PEAK_MEMORY:
                peak = sample.value if peak is None else max(peak, sample.value)
                continue
            if labels.get("rank", "0") != "0":
                continue
            if sample.name in _RUN_GAUGES:
                values[_RUN_GAUGES[sample.name]] = sample.value
            elif sample.name == "finetune_train_loss":
                losses[labels.get("component", "")] = sample.value
    if peak is not None:
        values["gpuMemoryPeakBytes"] = peak
    if losses:
        values["trainLoss"] = sum(losses.values())
    return TrainerMetrics(values)


def metrics_url(pod: Mapping[str, Any], port: int) -> str | None:
    """http://<pod IP>:<port>/metrics, or None while the pod has no IP."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/metrics"


def fetch(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http only by construction
        return response.read().decode("utf-8", errors="replace")


def scrape(url: str, finetune: str | None = None, timeout: float = 2.0) -> TrainerMetrics | None:
    """Metrics from ``url``, or None if the endpoint cannot be read or parsed."""
    try:
        return parse_metrics(fetch(url, timeout), finetune)
    except (OSError, ValueError):
        return None
