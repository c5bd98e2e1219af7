"""What a person (or a log collector) sees while a run trains.

On a terminal: a tqdm progress bar per epoch with loss, mAP and memory. Otherwise (a pod's
log): one structured line per epoch, as text or JSON (`--log-format json`), which is what
log pipelines parse. Only rank 0 speaks; other ranks log warnings only.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("finetune")


def configure_logging(log_format: str, rank: int) -> None:
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {"time": round(record.created, 3), "level": record.levelname.lower(), "msg": record.getMessage()}
        payload.update(getattr(record, "fields", {}))
        return json.dumps(payload)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1024
    return f"{n:.1f}TiB"


class RunLogger:
    def __init__(self, cfg, info):
        configure_logging(cfg.log_format, info.rank)
        self.main = info.is_main
        self.json = cfg.log_format == "json"
        self.use_bar = self.main and (cfg.progress if cfg.progress is not None else sys.stderr.isatty())
        self._bar = None
        self._last_map = None

    def info(self, message: str, **fields) -> None:
        if self.main:
            log.info(message, extra={"fields": fields} if fields else None)

    def step_callback(self, epoch: int, epochs: int, metrics):
        """Returns a per-iteration callback updating the bar (and live loss metrics)."""
        if not self.main:
            return None
        start = time.perf_counter()
        if self.use_bar:
            self._bar = tqdm(total=None, desc=f"epoch {epoch + 1}/{epochs}", leave=True, dynamic_ncols=True,
                             file=sys.stderr, unit="batch")

        def on_step(i: int, n: int, mean_losses, images: int) -> None:
            if self._bar is not None:
                self._bar.total = n
                post = {"box": f"{mean_losses[0]:.3f}", "obj": f"{mean_losses[1]:.3f}", "cls": f"{mean_losses[2]:.3f}"}
                if self._last_map is not None:
                    post["mAP50-95"] = f"{self._last_map:.3f}"
                self._bar.set_postfix(post, refresh=False)
                self._bar.update(1)
            if metrics is not None:
                elapsed = time.perf_counter() - start
                losses = {"box": float(mean_losses[0]), "obj": float(mean_losses[1]), "cls": float(mean_losses[2])}
                # live throughput of this rank scaled by world size is close enough mid-epoch
                metrics.set_progress(epoch, losses, images / elapsed if elapsed > 0 else 0.0)

        return on_step

    def epoch_end(self, epoch: int, epochs: int, stats: dict, val: dict, peak: int, memory_kind: str,
                  epoch_time: float) -> None:
        self._last_map = val["map50_95"]
        mem_label = "gpu_mem" if memory_kind == "cuda" else "cpu_mem"
        if self._bar is not None:
            self._bar.set_postfix({"box": f"{stats['box']:.3f}", "obj": f"{stats['obj']:.3f}",
                                   "cls": f"{stats['cls']:.3f}", "mAP50": f"{val['map50']:.3f}",
                                   "mAP50-95": f"{val['map50_95']:.3f}", mem_label: human_bytes(peak)})
            self._bar.close()
            self._bar = None
            return
        fields = {
            "event": "epoch", "epoch": epoch, "epochs": epochs,
            "box_loss": round(stats["box"], 5), "obj_loss": round(stats["obj"], 5), "cls_loss": round(stats["cls"], 5),
            "map50": round(val["map50"], 5), "map50_95": round(val["map50_95"], 5),
            "precision": round(val["precision"], 5), "recall": round(val["recall"], 5),
            "images_per_second": round(stats["images_per_second"], 2), f"{mem_label}_peak_bytes": peak,
            "epoch_time_s": round(epoch_time, 2),
        }
        if self.json:
            self.info(f"epoch {epoch}/{epochs}", **fields)
        else:
            self.info(f"epoch {epoch}/{epochs}  loss box {stats['box']:.4f} obj {stats['obj']:.4f} "
                      f"cls {stats['cls']:.4f}  mAP50 {val['map50']:.4f}  mAP50-95 {val['map50_95']:.4f}  "
                      f"P {val['precision']:.3f} R {val['recall']:.3f}  {stats['images_per_second']:.1f} img/s  "
                      f"{mem_label} {human_bytes(peak)}  {epoch_time:.1f}s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
