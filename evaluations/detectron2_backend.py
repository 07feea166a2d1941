"""The detectron2 backend of the ``coco`` and ``voc`` evaluations (``backend: detectron2``).

The papers' COCO and VOC numbers come from detectron2 with MoCo's detection configs
(facebookresearch/moco@5df3287:detection/configs; mmselfsup ``configs/benchmarks/detectron2``):
``mask_rcnn_R_50_FPN_1x`` for COCO, ``faster_rcnn_R_50_C4`` with ``Res5ROIHeadsExtraNorm`` (an extra
BatchNorm after res5) for VOC, all stages trained (``FREEZE_AT 0``), torchvision-style bottlenecks
(``STRIDE_IN_1X1 False``), RGB input with torchvision's mean / std, PreciseBN. This module builds that
configuration from the same ``Settings`` the torchvision path reads, loads our exported ``.pkl``
(``cropbench export --format detectron2``, checked to have reached every backbone parameter), trains
with ``DefaultTrainer`` and scores with detectron2's own ``COCOEvaluator`` /
``PascalVOCDetectionEvaluator``.

detectron2 is not on PyPI: install it from the vendored source (README, *detectron2*). Backbones:
torchvision ResNet-18/34/50/101 through detectron2's own ResNet, and ``resnet_micro`` (CIFAR stem,
BasicBlocks) through a small registered builder so the micro checkpoints run on both backends.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cropbench.errors import ConfigError, CropbenchError

INSTALL_HINT = (
    "install it from the vendored source: tar xzf ../shared/vendor/detectron2-02b5c4e2.tar.gz -C $TMPDIR && "
    'pip install --no-build-isolation "$TMPDIR/detectron2" (or: tox -e detectron2)'
)
DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}
MICRO = "resnet_micro"
# MoCo's _moco overlays: torchvision-style bottlenecks, RGB input, torchvision's mean / std (0-255)
MOCO_INPUT = {
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
    "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
    "MODEL.BACKBONE.FREEZE_AT": 0,
    "TEST.PRECISE_BN.ENABLED": True,
}


def available() -> bool:
    """Whether detectron2 can be imported (checked without importing it)."""
    return importlib.util.find_spec("detectron2") is not None


def resolve_backend(backend: str, dataset: str, field: str) -> str:
    """``auto`` -> detectron2 on real datasets (small / paper scale) when it is installed, else
    torchvision (always at micro: the ``synth_*`` sets); ``detectron2`` without it is an error."""
    if backend == "auto":
        return "detectron2" if available() and not dataset.startswith("synth_") else "torchvision"
    if backend == "detectron2" and not available():
        raise ConfigError(f"{field}: 'detectron2' is not installed; {INSTALL_HINT}; or set {field}=torchvision")
    return backend


def ensure_installed() -> None:
    """Raise a clear error when the detectron2 backend is asked for but not installed."""
    _import()


def _import() -> Any:
    try:
        import detectron2  # noqa: F401
    except ImportError as e:
        raise CropbenchError(
            f"backend 'detectron2' requested but detectron2 is not importable ({e}); {INSTALL_HINT}"
        ) from e
    _register()
    return detectron2


_REGISTERED = False


def _register() -> None:
    """Register the micro backbones and MoCo's ``Res5ROIHeadsExtraNorm`` once per process (here,
    not at import: this module is imported by the registry whether detectron2 is installed or not)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY
    from detectron2.modeling.roi_heads import Res5ROIHeads

    BACKBONE_REGISTRY.register(build_cropbench_micro_backbone)
    BACKBONE_REGISTRY.register(build_cropbench_micro_fpn_backbone)

    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        """MoCo's C4 head: ``Res5ROIHeads`` with a BatchNorm after res5 ("there is an extra BN layer
        following the res5 stage", facebookresearch/moco@5df3287:detection/train_net.py); res5 of
        BasicBlocks for ResNet-18/34 and ``resnet_micro`` (detectron2 builds bottlenecks only)."""

        @classmethod
        def _build_res5_block(cls, cfg: Any) -> tuple[nn.Module, int]:
            seq, out_channels = _basic_res5(cfg) or super()._build_res5_block(cfg)
            from detectron2.layers import get_norm

            seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
            return seq, out_channels

    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)
    _REGISTERED = True


def _micro_resnet(cfg: Any, stages: int) -> nn.Module:
    """detectron2 ``ResNet`` shaped as ``resnet_micro``: 3x3 stride-1 stem without max-pool, one
    BasicBlock per stage, widths ``MODEL.CROPBENCH_MICRO.WIDTHS``; the names detectron2 gives
    (``stem.conv1``, ``res2.0.conv1.norm``, ``shortcut``) are the ones our export writes."""
    from detectron2.layers import CNNBlockBase, Conv2d, get_norm
    from detectron2.modeling.backbone.resnet import BasicBlock, ResNet

    norm, widths = cfg.MODEL.RESNETS.NORM, list(cfg.MODEL.CROPBENCH_MICRO.WIDTHS)
    depths = list(cfg.MODEL.CROPBENCH_MICRO.DEPTHS)

    class Stem(CNNBlockBase):
        def __init__(self) -> None:
            super().__init__(3, widths[0], 1)
            self.conv1 = Conv2d(3, widths[0], 3, 1, 1, bias=False, norm=get_norm(norm, widths[0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu_(self.conv1(x))

    blocks, inp = [], widths[0]
    for i, (w, d) in enumerate(zip(widths[:stages], depths, strict=False)):
        strides = [2 if i else 1] + [1] * (d - 1)  # torchvision: stride 2 on each stage's first block after res2
        blocks.append(
            ResNet.make_stage(BasicBlock, d, in_channels=inp, out_channels=w, stride_per_block=strides, norm=norm)
        )
        inp = w
    return ResNet(Stem(), blocks, out_features=list(cfg.MODEL.RESNETS.OUT_FEATURES), freeze_at=0)


def build_cropbench_micro_backbone(cfg: Any, input_shape: Any) -> nn.Module:
    """C4: stem + res2..res4 (res5 lives in the RoI head)."""
    return _micro_resnet(cfg, 3)


def build_cropbench_micro_fpn_backbone(cfg: Any, input_shape: Any) -> nn.Module:
    """FPN over the micro ResNet's ``FPN.IN_FEATURES``, with P6 by max-pool (detectron2's
    ``build_resnet_fpn_backbone`` with the micro ResNet as bottom-up)."""
    from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

    bottom_up, top = _micro_resnet(cfg, 4), LastLevelMaxPool()
    last = list(cfg.MODEL.FPN.IN_FEATURES)[-1]
    top.in_feature = f"p{int(math.log2(bottom_up.output_shape()[last].stride))}"  # P6 from the top level
    return FPN(
        bottom_up=bottom_up,
        in_features=list(cfg.MODEL.FPN.IN_FEATURES),
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


def _basic_res5(cfg: Any) -> tuple[nn.Module, int] | None:
    """res5 of BasicBlocks for the micro ResNet (1 block) and ResNet-18/34 (2 / 3 blocks); None
    for bottleneck ResNets (detectron2's own res5)."""
    from detectron2.modeling.backbone.resnet import BasicBlock, ResNet

    norm = cfg.MODEL.RESNETS.NORM
    if cfg.MODEL.BACKBONE.NAME == "build_cropbench_micro_backbone":
        widths = list(cfg.MODEL.CROPBENCH_MICRO.WIDTHS)
        n, inp, out = cfg.MODEL.CROPBENCH_MICRO.DEPTHS[3], widths[2], widths[3]
    elif cfg.MODEL.RESNETS.DEPTH in (18, 34):
        n, inp, out = {18: 2, 34: 3}[cfg.MODEL.RESNETS.DEPTH], 256, 512
    else:
        return None
    blocks = ResNet.make_stage(
        BasicBlock, n, in_channels=inp, out_channels=out, stride_per_block=[2] + [1] * (n - 1), norm=norm
    )
    return nn.Sequential(*blocks), out


def _levels(arch: str, layers: tuple[int, ...]) -> list[tuple[str, int]]:
    """(detectron2 stage name, stride) of torchvision ``layer{k}``: res{k+1}, stride 2**(k+1)
    (``resnet_micro``: CIFAR stem without max-pool, stride 2**(k-1))."""
    shift = -1 if arch == MICRO else 1
    return [(f"res{k + 1}", 2 ** (k + shift)) for k in layers]


def _model_cfg(arch: str, s: Any, num_classes: int, widths: list[int], depths: list[int]) -> dict[str, Any]:
    """The model part of the config: backbone, FPN / C4 wiring, anchors and head sizes from ``s``."""
    out: dict[str, Any] = {"MODEL.ROI_HEADS.NUM_CLASSES": num_classes, "MODEL.MASK_ON": bool(s.masks)}
    if arch == MICRO:
        out["MODEL.CROPBENCH_MICRO.WIDTHS"], out["MODEL.CROPBENCH_MICRO.DEPTHS"] = widths, depths
    else:
        out["MODEL.RESNETS.DEPTH"] = DEPTHS[arch]
        out["MODEL.RESNETS.RES2_OUT_CHANNELS"] = 64 if DEPTHS[arch] < 50 else 256
    if s.arch == "c4":
        out.update(
            {
                "MODEL.BACKBONE.NAME": "build_cropbench_micro_backbone" if arch == MICRO else "build_resnet_backbone",
                "MODEL.RESNETS.OUT_FEATURES": ["res4"],
                "MODEL.RPN.IN_FEATURES": ["res4"],
                "MODEL.ROI_HEADS.IN_FEATURES": ["res4"],
                "MODEL.ROI_HEADS.NAME": "Res5ROIHeadsExtraNorm",
                "MODEL.ANCHOR_GENERATOR.SIZES": [list(s.anchor_sizes)],
            }
        )
        return out
    levels = _levels(arch, tuple(s.returned_layers))
    fpn = [f"p{int(math.log2(stride))}" for _, stride in levels]
    fpn_all = [*fpn, f"p{int(math.log2(levels[-1][1])) + 1}"]  # + LastLevelMaxPool
    if len(s.anchor_sizes) != len(fpn_all):
        raise ConfigError(f"anchor_sizes: {len(s.anchor_sizes)} sizes for {len(fpn_all)} FPN levels {fpn_all}")
    out.update(
        {
            "MODEL.BACKBONE.NAME": "build_cropbench_micro_fpn_backbone"
            if arch == MICRO
            else "build_resnet_fpn_backbone",
            "MODEL.RESNETS.OUT_FEATURES": [name for name, _ in levels],
            "MODEL.FPN.IN_FEATURES": [name for name, _ in levels],
            "MODEL.FPN.OUT_CHANNELS": s.fpn_channels,
            "MODEL.RPN.IN_FEATURES": fpn_all,
            "MODEL.ROI_HEADS.IN_FEATURES": fpn,
            "MODEL.ANCHOR_GENERATOR.SIZES": [[a] for a in s.anchor_sizes],
            "MODEL.ROI_BOX_HEAD.FC_DIM": s.box_head_dim,
            "MODEL.ROI_MASK_HEAD.CONV_DIM": s.mask_head_channels,
        }
    )
    return out


def _solver_cfg(s: Any, device: torch.device, distributed: bool) -> dict[str, Any]:
    """Schedule, input sizes, sampling and test limits from ``s``; BatchNorm as the papers (SyncBN)
    on CUDA across processes, per-process BN otherwise (torch has no SyncBN on CPU)."""
    from cropbench.evaluations.detection import scaled_lr

    norm = "SyncBN" if device.type == "cuda" and distributed else "BN"
    return {
        "MODEL.RESNETS.NORM": norm,
        "MODEL.FPN.NORM": norm,
        "SOLVER.IMS_PER_BATCH": s.batch_size,
        "SOLVER.BASE_LR": scaled_lr(s.lr, s.batch_size, s.lr_batch),
        "SOLVER.MAX_ITER": s.iterations,
        "SOLVER.STEPS": [x for x in s.steps if x < s.iterations],  # later steps never act; fvcore refuses them
        "SOLVER.GAMMA": s.gamma,
        "SOLVER.MOMENTUM": s.momentum,
        "SOLVER.WEIGHT_DECAY": s.weight_decay,
        "SOLVER.WEIGHT_DECAY_NORM": 0.0,
        "SOLVER.WARMUP_ITERS": s.warmup_iters,
        "SOLVER.WARMUP_FACTOR": s.warmup_factor,
        "SOLVER.CHECKPOINT_PERIOD": 10**9,  # no intermediate checkpoints
        "INPUT.MIN_SIZE_TRAIN": list(s.train_min_sizes),
        "INPUT.MIN_SIZE_TEST": s.test_min_size,
        "INPUT.MAX_SIZE_TRAIN": s.max_size,
        "INPUT.MAX_SIZE_TEST": s.max_size,
        "INPUT.RANDOM_FLIP": "horizontal" if s.hflip else "none",
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [list(s.aspect_ratios)],
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE": s.rpn_batch_per_image,
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN": s.rpn_pre_nms_train,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": s.rpn_post_nms_train,
        "MODEL.RPN.PRE_NMS_TOPK_TEST": s.rpn_pre_nms_test,
        "MODEL.RPN.POST_NMS_TOPK_TEST": s.rpn_post_nms_test,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": s.roi_batch_per_image,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST": s.score_thresh,
        "TEST.DETECTIONS_PER_IMAGE": s.detections_per_image,
        "TEST.PRECISE_BN.NUM_ITER": max(1, min(s.precise_bn_iters, s.iterations)),
        "TEST.PRECISE_BN.ENABLED": s.precise_bn_iters > 0,
        "MODEL.DEVICE": device.type,
    }


def zoo_config(s: Any) -> str:
    """The detectron2 model-zoo file the papers' configs inherit from."""
    task = "COCO-InstanceSegmentation/mask_rcnn" if s.masks else "COCO-Detection/faster_rcnn"
    return f"{task}_R_50_{'C4' if s.arch == 'c4' else 'FPN'}_1x.yaml"


def _zoo_file(name: str) -> Path:
    """A config file shipped inside the detectron2 package (``model_zoo.get_config_file`` without
    its ``pkg_resources`` import, which new setuptools no longer provide)."""
    import detectron2

    path = Path(detectron2.__file__).parent / "model_zoo" / "configs" / name
    if not path.is_file():
        raise CropbenchError(f"detectron2 installation has no model-zoo config {name} ({path})")
    return path


def _depths(encoder: nn.Module) -> list[int]:
    """Blocks per stage of a torchvision-named ResNet (``layer1``..``layer4``)."""
    return [len(getattr(encoder, f"layer{i}", ())) for i in range(1, 5)]


def build_cfg(encoder: nn.Module, s: Any, num_classes: int, device: torch.device, distributed: bool = False) -> Any:
    """The detectron2 ``CfgNode`` for ``encoder`` (its ``arch``) under settings ``s``."""
    _import()
    from detectron2.config import get_cfg

    arch = getattr(encoder, "arch", "")
    if arch not in DEPTHS and arch != MICRO:
        raise ConfigError(
            f"backend: detectron2 builds ResNets {', '.join([*DEPTHS, MICRO])}; the encoder is {arch!r} "
            "(set backend=torchvision)"
        )
    cfg = get_cfg()
    cfg.MODEL.CROPBENCH_MICRO = type(cfg)({"WIDTHS": [16, 32, 64, 128], "DEPTHS": [1, 1, 1, 1]})
    cfg.merge_from_file(str(_zoo_file(zoo_config(s))))
    merged = {
        **MOCO_INPUT,
        **_model_cfg(arch, s, num_classes, list(getattr(encoder, "stage_channels", [])), _depths(encoder)),
        **_solver_cfg(s, device, distributed),
    }
    cfg.merge_from_list([x for kv in merged.items() for x in kv])
    return cfg


def export_encoder(encoder: nn.Module, out: Path) -> dict[str, np.ndarray]:
    """Write ``encoder`` as the detectron2 ``.pkl`` ``cropbench export`` writes; returns its arrays."""
    from cropbench.export import save_detectron2, to_detectron2

    sd = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    save_detectron2(sd, out)
    return to_detectron2(sd)


def load_backbone(model: nn.Module, pkl: Path, arrays: dict[str, np.ndarray]) -> int:
    """Load ``pkl`` into ``model`` with detectron2's ``DetectionCheckpointer`` (its name-matching
    heuristics, as ``MODEL.WEIGHTS``), then check that every exported array reached a parameter or
    buffer with the same values: detectron2 only *logs* a key it could not place. Returns the count."""
    from detectron2.checkpoint import DetectionCheckpointer

    DetectionCheckpointer(model).load(str(pkl))
    state = model.state_dict()
    missing, differ = [], []
    for name, value in sorted(arrays.items()):
        hits = [k for k in state if k == name or k.endswith("." + name)]
        if len(hits) != 1:
            missing.append(f"{name} ({len(hits)} matches)")
        elif not np.array_equal(state[hits[0]].detach().cpu().numpy(), value):
            differ.append(name)
    if missing or differ:
        raise CropbenchError(
            f"detectron2 did not load {pkl.name} fully: not placed {missing[:8]}, different values {differ[:8]}"
        )
    return len(arrays)


def train_and_test(
    encoder: nn.Module, s: Any, cfg: Any, train_names: list[str], test_name: str, data: Any, evaluator: Any
) -> dict[str, dict[str, float]]:
    """``DefaultTrainer`` on ``train_names`` from our exported backbone, then ``evaluator`` on
    ``test_name``; returns detectron2's result dict (``{"bbox": {...}, "segm": {...}}``)."""
    from detectron2.data import build_detection_test_loader
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import inference_on_dataset

    out = Path(tempfile.mkdtemp(prefix="cropbench-d2-"))
    try:
        cfg.defrost()
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = tuple(train_names), ()
        cfg.DATALOADER.NUM_WORKERS = data.num_workers
        cfg.SEED, cfg.OUTPUT_DIR = int(data.seed), str(out)
        cfg.freeze()
        arrays = export_encoder(encoder, out / "backbone.pkl")
        trainer = DefaultTrainer(cfg)
        n = load_backbone(trainer.model, out / "backbone.pkl", arrays)
        data.log(f"[d2] loaded {n} backbone tensors from the exported .pkl; {s.iterations} iterations")
        trainer.train()
        model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
        res = inference_on_dataset(model, build_detection_test_loader(cfg, test_name), evaluator(out))
        return _on_every_rank(res)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _on_every_rank(res: dict) -> dict:
    """detectron2's evaluators return results on the main process only; every rank returns them."""
    from detectron2.utils import comm

    if comm.get_world_size() == 1:
        return res
    return next((r for r in comm.all_gather(res) if r), {})
