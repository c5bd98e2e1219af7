"""The YOLOv5 detection model: config parsing, the Detect head and DetectionModel.

Module ``i`` of the config is ``model.model[i]`` (state-dict prefix ``model.{i}.``), which
is what makes Ultralytics YOLOv5 checkpoints load unchanged and what ``--freeze N``
counts. Each module records its index ``.i`` and its input(s) ``.f``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.errors import FinetuneError
from finetune.models.common import C3, SPPF, Bottleneck, Concat, Conv
from finetune.models.config import load_model_config

STRIDE_PROBE_SIZE = 256  # input side used to measure each level's stride at build time


class Detect(nn.Module):
    """Per-level 1x1 convs predicting ``na * (nc + 5)`` channels, plus box decoding.

    ``anchors`` is a persistent buffer (it is in Ultralytics' state dict) of shape
    ``(nl, na, 2)``, in grid units once the model has measured its strides.
    """

    def __init__(self, nc: int = 80, anchors: list | tuple = (), ch: list | tuple = ()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5  # outputs per anchor: x, y, w, h, objectness, classes
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        # Not in the state dict (as in Ultralytics); a buffer so it follows .to(device).
        self.register_buffer("stride", torch.ones(self.nl), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self._grid_cache: dict[tuple, torch.Tensor] = {}

    def forward(self, xs: list[torch.Tensor]):
        """Train mode: raw maps ``(bs, na, ny, nx, no)`` per level; eval: ``(pred, raw)``."""
        raw = []
        for conv, x in zip(self.m, xs):
            y = conv(x)
            bs, _, ny, nx = y.shape
            # Channels (anchor-major, then outputs) last, from either memory layout: a
            # channels-last map (how the trainer runs the model) needs no copy here.
            y = y.permute(0, 2, 3, 1).reshape(bs, ny, nx, self.na, self.no)
            raw.append(y.permute(0, 3, 1, 2, 4).contiguous())
        if self.training:
            return raw
        return torch.cat([self._decode(i, p) for i, p in enumerate(raw)], 1), raw

    def _decode(self, i: int, p: torch.Tensor) -> torch.Tensor:
        """Boxes as xywh in input pixels, sigmoid objectness and class scores."""
        bs, na, ny, nx, no = p.shape
        stride = self.stride[i].to(p.dtype)
        anchor_px = (self.anchors[i] * self.stride[i]).view(1, na, 1, 1, 2).to(p.dtype)
        s = p.sigmoid()
        xy = (s[..., :2] * 2 + self._grid(ny, nx, p.device, p.dtype)) * stride
        wh = (s[..., 2:4] * 2) ** 2 * anchor_px
        return torch.cat((xy, wh, s[..., 4:]), -1).view(bs, -1, no)

    def _grid(self, ny: int, nx: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Cell offsets minus 0.5, shape ``(1, 1, ny, nx, 2)``; cached per size/device/dtype.

        The key holds strings, not device/dtype objects, so a pickled model stays plain.
        """
        key = (ny, nx, str(device), str(dtype))
        grid = self._grid_cache.get(key)
        if grid is None:
            ys = torch.arange(ny, device=device, dtype=dtype)
            xs = torch.arange(nx, device=device, dtype=dtype)
            yv, xv = torch.meshgrid(ys, xs, indexing="ij")
            grid = (torch.stack((xv, yv), 2) - 0.5).view(1, 1, ny, nx, 2)
            self._grid_cache[key] = grid
        return grid


def make_divisible(x: float, divisor: int = 8) -> int:
    """Round channel counts up to a multiple of ``divisor`` (hardware-friendly widths)."""
    return int(math.ceil(x / divisor) * divisor)


_MODULES: dict[str, type[nn.Module]] = {
    "Conv": Conv, "Bottleneck": Bottleneck, "C3": C3, "SPPF": SPPF, "Concat": Concat,
    "Detect": Detect, "Upsample": nn.Upsample, "nn.Upsample": nn.Upsample,
}
_SCALED = ("Conv", "Bottleneck", "C3", "SPPF")  # modules whose args[0] is an output width


def _resolve_arg(a: Any, cfg: dict) -> Any:
    """YAML args may name top-level config values ('nc', 'anchors') or spell None."""
    if isinstance(a, str):
        if a in ("nc", "anchors"):
            return cfg[a]
        if a == "None":
            return None
    return a


def parse_model(cfg: dict, ch: int) -> tuple[nn.Sequential, list[int]]:
    """Build the module list from a config; also return indices whose outputs are reused."""
    gd, gw = cfg["depth_multiple"], cfg["width_multiple"]
    widths: list[int] = []  # output channels of each module built so far
    layers, save = [], set()
    for i, (f, n, name, args) in enumerate(cfg["backbone"] + cfg["head"]):
        args = [_resolve_arg(a, cfg) for a in args]
        n = max(round(n * gd), 1) if n > 1 else n
        sources = f if isinstance(f, list) else [f]
        source_widths = [ch if (j == -1 and i == 0) else widths[j] for j in sources]
        c1 = source_widths[0]
        if name in _SCALED:
            c2 = make_divisible(args[0] * gw)
            args = [c1, c2, *args[1:]]
            if name == "C3":  # C3 repeats its bottlenecks internally
                args.insert(2, n)
                n = 1
        elif name == "Concat":
            c2 = sum(source_widths)
        elif name == "Detect":
            args = [args[0], args[1], source_widths]
            c2 = 0
        else:  # Upsample keeps the width
            c2 = c1
        cls = _MODULES[name]
        module = nn.Sequential(*(cls(*args) for _ in range(n))) if n > 1 else cls(*args)
        module.i, module.f = i, f
        save.update(j % i for j in sources if j != -1)
        layers.append(module)
        widths.append(c2)
    return nn.Sequential(*layers), sorted(save)


def run_layers(layers: nn.Sequential, save: list[int], x: torch.Tensor, frozen_depth: int = 0,
               frozen_outputs: Mapping[int, torch.Tensor] | None = None):
    """Run modules in order, feeding each its ``.f`` input(s); keep outputs in ``save``.

    Modules below ``frozen_depth`` run without autograd: nothing before them trains, so
    their activations are never needed for backward (saves memory and time). Their
    outputs reach later modules, including through skip connections, as plain tensors.

    With ``frozen_outputs`` (module index -> output, the :func:`prefix_outputs_needed` of
    ``frozen_depth``, e.g. from the feature cache) the frozen modules do not run at all:
    their stored outputs stand in for them and ``x`` is ignored.
    """
    outputs: list[torch.Tensor | None] = []
    for m in layers:
        if frozen_outputs is not None and m.i < frozen_depth:
            x = frozen_outputs.get(m.i)
            outputs.append(x)
            continue
        if m.f != -1:
            x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
        with torch.no_grad() if m.i < frozen_depth else nullcontext():
            x = m(x)
        outputs.append(x if m.i in save else None)
    return x


def _sources(m: nn.Module) -> list[int]:
    """The indices of the modules whose outputs module ``m`` reads (``-1`` = the one before)."""
    return [j if j >= 0 else m.i + j for j in (m.f if isinstance(m.f, list) else [m.f])]


def prefix_outputs_needed(layers: nn.Sequential, depth: int) -> list[int]:
    """The modules below ``depth`` whose outputs modules ``depth..`` read: everything the
    trainable part needs from the frozen prefix (its last output and any skip connections)."""
    return sorted({j for m in layers[depth:] for j in _sources(m) if j < depth})


@torch.no_grad()
def run_prefix(layers: nn.Sequential, x: torch.Tensor, depth: int) -> dict[int, torch.Tensor]:
    """Run modules ``0..depth-1`` and return the outputs :func:`prefix_outputs_needed` names."""
    needed = set(prefix_outputs_needed(layers, depth))
    kept = needed | {j for m in layers[:depth] for j in _sources(m)}
    outputs: dict[int, torch.Tensor] = {}
    for m in layers[:depth]:
        if m.f != -1:
            x = outputs[_sources(m)[0]] if isinstance(m.f, int) else [outputs[j] for j in _sources(m)]
        x = m(x)
        if m.i in kept:
            outputs[m.i] = x
    return {i: outputs[i] for i in sorted(needed)}


class DetectionModel(nn.Module):
    """YOLOv5 detector built from a config dict, built-in name or YAML path.

    ``frozen_depth`` (set by ``finetune.freeze.freeze_modules``) makes forward run modules
    ``0..frozen_depth-1`` without autograd and, when ``freeze_bn`` is true, keeps their
    BatchNorm layers in eval mode through every ``train()`` call.
    """

    def __init__(self, cfg: dict | str = "yolov5s", nc: int | None = None, ch: int = 3):
        super().__init__()
        self.yaml = load_model_config(cfg)
        if nc is not None:
            if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
                raise FinetuneError(f"number of classes must be a positive integer, got {nc!r}")
            self.yaml["nc"] = nc
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        try:
            self.model, self.save = parse_model(self.yaml, ch)
            self.stride = self._measure_strides(ch)
        except (TypeError, ValueError, IndexError, RuntimeError) as e:
            # A custom YAML with wrong args or incompatible shapes fails here, not mid-run.
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            name = cfg if isinstance(cfg, str) else "the model config"
            raise FinetuneError(
                f"model config {name} cannot be built ({reason}); fix its module arguments "
                "or 'from' indices (see the built-in yolov5s.yaml)"
            ) from None
        self.nc = self.yaml["nc"]
        self.names = [str(i) for i in range(self.nc)]
        self.frozen_depth = 0
        self.freeze_bn = True
        detect = self.detect
        detect.stride.copy_(self.stride.to(detect.stride.device))
        detect.anchors.div_(detect.stride.view(-1, 1, 1))
        self._initialize_biases()

    @property
    def detect(self) -> Detect:
        return self.model[-1]

    def forward(self, x: torch.Tensor | Mapping[int, torch.Tensor]):
        """Train mode: list of raw maps per level; eval mode: ``(pred, raw)``.

        ``x`` is an image batch, or the frozen prefix's outputs for one (module index ->
        tensor, as :meth:`frozen_outputs` returns them): then only the modules from
        ``frozen_depth`` on run.
        """
        if isinstance(x, Mapping):
            if not self.frozen_depth:
                raise ValueError("stored prefix outputs need a frozen prefix (frozen_depth > 0)")
            return run_layers(self.model, self.save, None, self.frozen_depth, frozen_outputs=x)
        return run_layers(self.model, self.save, x, self.frozen_depth)

    def frozen_outputs(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """The outputs of the frozen modules that the trainable ones read, for images ``x``
        (no autograd; the frozen BatchNorm layers as the model's mode has them)."""
        return run_prefix(self.model, x, self.frozen_depth)

    def _measure_strides(self, ch: int) -> torch.Tensor:
        """Each level's stride = probe size / its output-map size.

        The probe runs through a shape-only twin of the layers built on the meta device:
        free even for yolov5x, and this model's weights and BN statistics are untouched.
        """
        with torch.device("meta"):
            layers, save = parse_model(self.yaml, ch)
            raw = run_layers(layers.train(), save, torch.zeros(1, ch, STRIDE_PROBE_SIZE, STRIDE_PROBE_SIZE))
        return torch.tensor([STRIDE_PROBE_SIZE / r.shape[2] for r in raw],
                            dtype=torch.float32, device="cpu")

    def _initialize_biases(self) -> None:
        """Objectness prior ~8 objects per 640px image; class prior ~0.6/nc."""
        detect = self.detect
        with torch.no_grad():
            for conv, s in zip(detect.m, self.stride.tolist()):
                b = conv.bias.view(detect.na, -1)
                b[:, 4] += math.log(8 / (640 / s) ** 2)
                b[:, 5:] += math.log(0.6 / (detect.nc - 0.99))

    def train(self, mode: bool = True) -> "DetectionModel":
        """Like nn.Module.train, but frozen BatchNorm layers stay in eval mode when asked.

        YOLOv5 lets frozen layers' running statistics drift during fine-tuning; with
        ``freeze_bn`` they stay exactly as pretrained.
        """
        super().train(mode)
        if mode and self.freeze_bn and self.frozen_depth:
            for m in self.model[: self.frozen_depth]:
                for sub in m.modules():
                    if isinstance(sub, _BatchNorm):
                        sub.eval()
        return self


def build_model(name_or_cfg: str | dict, nc: int | None = None, ch: int = 3) -> DetectionModel:
    """Build a model from a built-in name, a YAML path or a config dict."""
    return DetectionModel(name_or_cfg, nc=nc, ch=ch)
