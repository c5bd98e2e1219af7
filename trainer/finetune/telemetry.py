"""Prometheus metrics served by rank 0, and per-process memory probes.

Every metric carries `finetune` (from FINETUNE_NAME, default the run name) and `rank`
labels. Rank-local figures (memory, utilisation) are gathered to rank 0 at each logging
point, so one endpoint describes the whole job — the operator and the PodMonitor only
need to scrape worker 0.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry, Gauge, start_http_server

LOSS_COMPONENTS = ("box", "obj", "cls")


def read_peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM) in bytes.

    psutil exposes the current RSS but not the high-water mark; Linux keeps it in
    /proc/self/status, and `reset_peak_rss()` lets us measure one epoch at a time.
    """
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


@dataclass
class MemorySample:
    """One rank's memory figures in bytes (GPU on CUDA, process RSS on CPU)."""

    rank: int
    device_type: str
    allocated: int = 0
    reserved: int = 0
    peak: int = 0
    utilization: float | None = None

    @classmethod
    def take(cls, rank: int, device: torch.device) -> "MemorySample":
        if device.type == "cuda":
            try:
                util = torch.cuda.utilization(device) / 100.0
            except Exception:  # NVML missing in the container: utilisation is optional
                util = None
            return cls(rank, "cuda", torch.cuda.memory_allocated(device),
                       torch.cuda.memory_reserved(device), torch.cuda.max_memory_allocated(device), util)
        return cls(rank, "cpu", peak=read_peak_rss_bytes())


class TrainingMetrics:
    """The trainer's Prometheus metrics (a private registry, served by rank 0 only)."""

    def __init__(self, finetune_name: str):
        self.name = finetune_name
        self.registry = CollectorRegistry()
        r = self.registry
        labels = ("finetune", "rank")

        def gauge(metric: str, help_text: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(metric, help_text, labels + extra, registry=r)

        self.epoch = gauge("finetune_epoch", "Training epochs completed (count).")
        self.epochs_total = gauge("finetune_epochs_total", "Training epochs requested for the run (count).")
        self.map50 = gauge("finetune_map50", "Validation COCO mAP at IoU 0.5 of the latest epoch (ratio 0-1).")
        self.map50_95 = gauge("finetune_map50_95", "Validation COCO mAP at IoU 0.5:0.95 of the latest epoch (ratio 0-1).")
        self.precision = gauge("finetune_precision", "Validation precision at IoU 0.5 and the max-F1 confidence (ratio 0-1).")
        self.recall = gauge("finetune_recall", "Validation recall at IoU 0.5 and the max-F1 confidence (ratio 0-1).")
        self.train_loss = gauge("finetune_train_loss", "Mean training loss of the current epoch by component (unitless).",
                                ("component",))
        self.images_per_second = gauge("finetune_images_per_second",
                                       "Training throughput of the whole job, all ranks (images per second).")
        self.frozen_parameters = gauge("finetune_frozen_parameters", "Parameters frozen (requires_grad=False) (count).")
        self.trainable_parameters = gauge("finetune_trainable_parameters", "Parameters being trained (count).")
        self.gpu_allocated = gauge("finetune_gpu_memory_allocated_bytes", "GPU memory held by tensors on this rank (bytes).")
        self.gpu_reserved = gauge("finetune_gpu_memory_reserved_bytes", "GPU memory reserved by the caching allocator on this rank (bytes).")
        self.gpu_peak = gauge("finetune_gpu_memory_peak_bytes", "Peak GPU memory held by tensors on this rank during the epoch (bytes).")
        self.gpu_util = gauge("finetune_gpu_utilization_ratio", "GPU utilisation of this rank's device as reported by NVML (ratio 0-1).")
        self.cpu_peak = gauge("finetune_cpu_memory_peak_bytes", "Peak resident memory of this rank's process during the epoch (bytes).")
        self.feature_cache_bytes = gauge("finetune_feature_cache_bytes",
                                         "Size of the frozen-prefix feature cache, all views and splits (bytes).")
        self.feature_cache_build = gauge("finetune_feature_cache_build_seconds",
                                         "Time to build (or find and open) the feature cache in this run (seconds).")
        self.feature_cache_views = gauge("finetune_feature_cache_views",
                                         "Views per training image in the feature cache (count).")
        self.freeze_depth = gauge("finetune_freeze_depth",
                                  "Modules frozen (0..N-1) in this run: the --freeze depth, or the one --freeze auto chose (count).")
        self.freeze_probe_peak = gauge("finetune_freeze_probe_peak_bytes",
                                       "--freeze auto: the peak memory measured at each candidate freeze depth (bytes).",
                                       ("depth",))
        self.freeze_budget = gauge("finetune_freeze_memory_budget_bytes",
                                   "--freeze auto: the memory one training process may use, before the 10% margin (bytes).")
        self._server = None

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        self._server, _thread = start_http_server(port, addr=addr, registry=self.registry)

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _l(self, **extra: str):
        return {"finetune": self.name, "rank": "0", **extra}

    def set_run(self, epochs_total: int, frozen: int, trainable: int) -> None:
        self.epochs_total.labels(**self._l()).set(epochs_total)
        self.frozen_parameters.labels(**self._l()).set(frozen)
        self.trainable_parameters.labels(**self._l()).set(trainable)

    def set_progress(self, epoch: int, losses: dict[str, float], images_per_second: float) -> None:
        self.epoch.labels(**self._l()).set(epoch)
        for comp in LOSS_COMPONENTS:
            if comp in losses:
                self.train_loss.labels(**self._l(component=comp)).set(losses[comp])
        self.images_per_second.labels(**self._l()).set(images_per_second)

    def set_feature_cache(self, size_bytes: int, build_seconds: float, views: int) -> None:
        self.feature_cache_bytes.labels(**self._l()).set(size_bytes)
        self.feature_cache_build.labels(**self._l()).set(build_seconds)
        self.feature_cache_views.labels(**self._l()).set(views)

    def set_freeze(self, depth: int, choice=None) -> None:
        """The depth trained at; with --freeze auto (a finetune.autofreeze.Choice) the budget and each probe."""
        self.freeze_depth.labels(**self._l()).set(depth)
        if choice is None:
            return
        if choice.budget_bytes:
            self.freeze_budget.labels(**self._l()).set(choice.budget_bytes)
        for p in choice.probes:
            if p.peak_bytes is not None:
                self.freeze_probe_peak.labels(**self._l(depth=str(p.depth))).set(p.peak_bytes)

    def set_validation(self, metrics: dict[str, float]) -> None:
        self.map50.labels(**self._l()).set(metrics["map50"])
        self.map50_95.labels(**self._l()).set(metrics["map50_95"])
        self.precision.labels(**self._l()).set(metrics["precision"])
        self.recall.labels(**self._l()).set(metrics["recall"])

    def set_memory(self, samples: list[MemorySample]) -> None:
        for s in samples:
            lab = {"finetune": self.name, "rank": str(s.rank)}
            if s.device_type == "cuda":
                self.gpu_allocated.labels(**lab).set(s.allocated)
                self.gpu_reserved.labels(**lab).set(s.reserved)
                self.gpu_peak.labels(**lab).set(s.peak)
                if s.utilization is not None:
                    self.gpu_util.labels(**lab).set(s.utilization)
            else:
                self.cpu_peak.labels(**lab).set(s.peak)


def finetune_name(run_name: str) -> str:
    return os.environ.get("FINETUNE_NAME") or run_name
