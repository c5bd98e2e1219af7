"""Model configs, architecture, state-dict compatibility and the forward pass."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.models import config as mc
from finetune.models.yolo import DetectionModel, build_model

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "yolov5s_state_dict.json"

# Ultralytics' printed counts at nc=80: unfused ("YOLOv5s summary: 214 layers, 7235389
# parameters") and after Conv+BN fusion ("157 layers, 7225885 parameters"); fusion trades
# each BatchNorm's weight+bias (2c) for one conv bias (c).
UNFUSED = {"yolov5n": 1_872_157, "yolov5s": 7_235_389, "yolov5m": 21_190_557,
           "yolov5l": 46_563_709, "yolov5x": 86_749_405}
FUSED = {"yolov5n": 1_867_405, "yolov5s": 7_225_885, "yolov5m": 21_172_173,
         "yolov5l": 46_533_693, "yolov5x": 86_705_005}

ULTRALYTICS_KEYS = [
    "model.0.conv.weight", "model.0.bn.weight", "model.0.bn.bias", "model.0.bn.running_mean",
    "model.0.bn.running_var", "model.0.bn.num_batches_tracked", "model.2.m.0.cv1.conv.weight",
    "model.2.cv3.conv.weight", "model.8.m.0.cv2.bn.running_var", "model.9.cv1.conv.weight",
    "model.9.cv2.bn.weight", "model.13.m.0.cv1.conv.weight", "model.23.cv3.bn.bias",
    "model.24.anchors", "model.24.m.0.weight", "model.24.m.0.bias", "model.24.m.2.weight",
]

TINY_YAML = """
nc: 4
depth_multiple: 1.0
width_multiple: 1.0
anchors:
  - [10,13, 16,30, 33,23]
  - [30,61, 62,45, 59,119]
  - [116,90, 156,198, 373,326]
backbone:
  [[-1, 1, Conv, [8, 3, 2]],
   [-1, 1, Conv, [16, 3, 2]],
   [-1, 1, Conv, [16, 3, 2]],
   [-1, 2, C3, [16]],
   [-1, 1, Conv, [32, 3, 2]],
   [-1, 1, Conv, [32, 3, 2]],
   [-1, 1, SPPF, [32, 5]],
  ]
head:
  [[-1, 1, Conv, [16, 1, 1]],
   [-1, 1, Upsample, [None, 2, 'nearest']],
   [[-1, 4], 1, Concat, [1]],
   [[3, 4, 6], 1, Detect, [nc, anchors]],
  ]
"""


def fused_count(model: torch.nn.Module) -> int:
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    return sum(p.numel() for p in model.parameters()) - bn_channels


@pytest.fixture(scope="module")
def v5n() -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel("yolov5n")


@pytest.fixture
def tiny_cfg_path(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


# ----------------------------------------------------------------------------- configs

def test_config_module_imports_without_torch():
    code = ("import sys, finetune.models, finetune.models.config as c; "
            "cfg = c.load_model_config('yolov5s'); c.resolve_freeze('backbone', cfg); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.parametrize("name,depth,width", [
    ("yolov5n", 0.33, 0.25), ("yolov5s", 0.33, 0.50), ("yolov5m", 0.67, 0.75),
    ("yolov5l", 1.0, 1.0), ("yolov5x", 1.33, 1.25),
])
def test_builtin_configs(name, depth, width):
    cfg = mc.load_model_config(name)
    assert (cfg["depth_multiple"], cfg["width_multiple"]) == (depth, width)
    assert cfg["nc"] == 80
    assert cfg["anchors"] == [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119],
                              [116, 90, 156, 198, 373, 326]]
    assert mc.module_count(cfg) == 25
    assert mc.freeze_presets(cfg) == {"backbone": 10, "all-but-detect": 24}
    assert cfg["head"][-1] == [[17, 20, 23], 1, "Detect", ["nc", "anchors"]]
    assert mc.load_model_config(f"{name}.yaml") == cfg
    assert name in mc.BUILTIN_MODELS


def test_load_model_config_errors(tmp_path):
    with pytest.raises(FinetuneError, match=r"unknown model 'yolov5q'.*yolov5n"):
        mc.load_model_config("yolov5q")
    with pytest.raises(FinetuneError, match="not found"):
        mc.load_model_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("nc: [1, 2\nbackbone: {")
    with pytest.raises(FinetuneError, match="not valid YAML"):
        mc.load_model_config(bad)
    bad.write_text("nc: 3\nbackbone: []\n")
    with pytest.raises(FinetuneError, match="missing key"):
        mc.load_model_config(bad)
    cfg = mc.load_model_config("yolov5n")
    cfg["backbone"][1] = [-1, 1, "Focus", [64]]
    with pytest.raises(FinetuneError, match="'Focus'; supported"):
        mc.load_model_config(cfg)
    cfg = mc.load_model_config("yolov5n")
    cfg["head"][2] = [[-1, 30], 1, "Concat", [1]]
    with pytest.raises(FinetuneError, match="invalid 'from'"):
        mc.load_model_config(cfg)


def test_resolve_freeze():
    cfg = mc.load_model_config("yolov5s")
    assert mc.resolve_freeze(0, cfg) == 0
    assert mc.resolve_freeze(10, cfg) == 10
    assert mc.resolve_freeze("7", cfg) == 7
    assert mc.resolve_freeze(" 24 ", cfg) == 24
    assert mc.resolve_freeze("backbone", cfg) == 10
    assert mc.resolve_freeze("all-but-detect", cfg) == 24
    assert mc.resolve_freeze(None, cfg) == 0
    for bad in (25, 26, -1, "-3", "everything", "", 2.5, True):
        with pytest.raises(FinetuneError) as e:
            mc.resolve_freeze(bad, cfg)
        assert "0 to 24" in str(e.value) and "backbone (= 10)" in str(e.value)
        assert "all-but-detect (= 24)" in str(e.value)


def test_custom_yaml_presets_and_build(tiny_cfg_path):
    cfg = mc.load_model_config(tiny_cfg_path)
    assert mc.module_count(cfg) == 11
    assert mc.freeze_presets(cfg) == {"backbone": 7, "all-but-detect": 10}
    assert mc.resolve_freeze("backbone", cfg) == 7
    with pytest.raises(FinetuneError, match="0 to 10"):
        mc.resolve_freeze(11, cfg)
    model = build_model(str(tiny_cfg_path), nc=2)
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    assert model.nc == 2 and model.yaml["nc"] == 2
    outs = model.train()(torch.zeros(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 3, 8, 8, 7), (1, 3, 4, 4, 7), (1, 3, 2, 2, 7)]


# ------------------------------------------------------------------------- architecture

@pytest.mark.parametrize("name", ["yolov5n", "yolov5s"])
def test_parameter_counts_full_build(name):
    model = DetectionModel(name)
    assert sum(p.numel() for p in model.parameters()) == UNFUSED[name]
    assert fused_count(model) == FUSED[name]


@pytest.mark.parametrize("name", list(UNFUSED))
def test_parameter_counts_meta_build(name):
    """All five sizes, on the meta device (shapes only: instant even for yolov5x)."""
    with torch.device("meta"):
        model = DetectionModel(name)
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    assert sum(p.numel() for p in model.parameters()) == UNFUSED[name]
    assert fused_count(model) == FUSED[name]
    assert len(model.model) == 25


def test_state_dict_matches_golden():
    with torch.device("meta"):
        model = DetectionModel("yolov5s")
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    if os.environ.get("FINETUNE_UPDATE_GOLDEN") == "1":
        lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in shapes.items())
        GOLDEN.write_text("{\n" + lines + "\n}\n")
    golden = json.loads(GOLDEN.read_text())
    assert list(shapes) == list(golden), "state-dict keys (or their order) changed"
    assert shapes == golden
    for key in ULTRALYTICS_KEYS:
        assert key in shapes
    assert shapes["model.0.conv.weight"] == [32, 3, 6, 6]
    assert shapes["model.24.anchors"] == [3, 3, 2]
    assert shapes["model.24.m.0.weight"] == [255, 128, 1, 1]
    assert len(shapes) == 349
    assert not any(k.endswith(".stride") or "grid" in k for k in shapes)


def test_module_metadata_and_batchnorm(v5n):
    for i, m in enumerate(v5n.model):
        assert m.i == i
    assert v5n.model[0].f == -1 and v5n.model[12].f == [-1, 6] and v5n.model[24].f == [17, 20, 23]
    bns = [m for m in v5n.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(bn.eps == 1e-3 and bn.momentum == 0.03 for bn in bns)
    assert all(int(bn.num_batches_tracked) == 0 for bn in bns), "building must not touch BN stats"
    assert v5n.model[0].conv.bias is None and v5n.model[0].conv.padding == (2, 2)


def test_detect_anchors_strides_biases(v5n):
    detect = v5n.model[-1]
    assert v5n.stride.tolist() == [8.0, 16.0, 32.0]
    pixels = torch.tensor(v5n.yaml["anchors"], dtype=torch.float32).view(3, 3, 2)
    assert torch.allclose(detect.anchors * v5n.stride.view(-1, 1, 1), pixels)
    assert "model.24.anchors" in dict(v5n.named_buffers()) and "model.24.anchors" in v5n.state_dict()
    assert "model.24.stride" in dict(v5n.named_buffers()) and "model.24.stride" not in v5n.state_dict()
    for conv, s in zip(detect.m, (8, 16, 32)):
        b = conv.bias.detach().view(3, -1)
        w = conv.weight.shape[1] ** -0.5  # default Conv2d bias init is U(-1/sqrt(fan_in), ..)
        assert ((b[:, 4] - math.log(8 / (640 / s) ** 2)).abs() <= w + 1e-6).all()
        assert ((b[:, 5:] - math.log(0.6 / (80 - 0.99))).abs() <= w + 1e-6).all()


def test_nc_override_and_names():
    model = DetectionModel("yolov5n", nc=3)
    assert model.nc == 3 and model.yaml["nc"] == 3
    assert model.model[-1].m[0].weight.shape == (24, 64, 1, 1)
    assert model.names == ["0", "1", "2"]
    model.names = ["cat", "dog", "bird"]
    assert model.names == ["cat", "dog", "bird"]
    assert mc.load_model_config("yolov5n")["nc"] == 80, "the built-in config must not change"
    with pytest.raises(FinetuneError):
        DetectionModel("yolov5n", nc=0)


def test_unbuildable_custom_config_is_a_user_error(tiny_cfg_path):
    cfg = mc.load_model_config(tiny_cfg_path)
    cfg["head"][2] = [[-1, 3], 1, "Concat", [1]]  # 4x4 upsampled map with an 8x8 map
    with pytest.raises(FinetuneError, match="cannot be built"):
        DetectionModel(cfg)
    cfg = mc.load_model_config(tiny_cfg_path)
    cfg["backbone"][0] = [-1, 1, "Conv", [8, 3, 2, 1, 1, 1, 1]]  # too many args
    with pytest.raises(FinetuneError, match="cannot be built"):
        DetectionModel(cfg)


def test_upsample_spellings_give_same_model():
    cfg = mc.load_model_config("yolov5n")
    cfg["head"][1][2] = "Upsample"
    with torch.device("meta"):
        a = DetectionModel(cfg)
        b = DetectionModel("yolov5n")
    assert list(a.state_dict()) == list(b.state_dict())
    assert isinstance(a.model[11], torch.nn.Upsample) and isinstance(b.model[15], torch.nn.Upsample)


# ----------------------------------------------------------------------------- forward

def test_train_forward_shapes(v5n):
    v5n.train()
    outs = v5n(torch.rand(2, 3, 64, 64))
    assert isinstance(outs, list)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 8, 8, 85), (2, 3, 4, 4, 85), (2, 3, 2, 2, 85)]


def test_eval_decoding(v5n):
    v5n.eval()
    with torch.no_grad():
        pred, raw = v5n(torch.rand(2, 3, 64, 96))
    assert pred.shape == (2, 3 * (8 * 12 + 4 * 6 + 2 * 3), 85)
    assert [tuple(r.shape) for r in raw] == [(2, 3, 8, 12, 85), (2, 3, 4, 6, 85), (2, 3, 2, 3, 85)]
    # Decode level 1 by hand: xy = (2*sig - 0.5 + cell) * stride, wh = (2*sig)^2 * anchor px.
    r = raw[1]
    s = r.sigmoid()
    gy, gx = torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij")
    cell = torch.stack((gx, gy), -1).view(1, 1, 4, 6, 2)
    anchors_px = torch.tensor([[30, 61], [62, 45], [59, 119]], dtype=torch.float32).view(1, 3, 1, 1, 2)
    expected = torch.cat(((s[..., :2] * 2 - 0.5 + cell) * 16, (s[..., 2:4] * 2) ** 2 * anchors_px,
                          s[..., 4:]), -1).view(2, -1, 85)
    start = 3 * 8 * 12
    assert torch.allclose(pred[:, start:start + expected.shape[1]], expected, atol=1e-5)
    assert (pred[..., 4:] >= 0).all() and (pred[..., 4:] <= 1).all()
    cache = v5n.model[-1]._grid_cache
    assert len(cache) == 3
    with torch.no_grad():
        v5n(torch.rand(1, 3, 64, 96))
    assert len(cache) == 3, "grids are cached per feature size"
