"""Headless training of FocusNetv2 (paper sections 3.2-3.3, 4.2).

The schedule is a sequence of stages, each a number of iterations from the
configuration:

    snet          S-Net with L_seg (focal + Dice)
    solnet        SOL-Net heat maps (L2), S-Net frozen
    aae_pretrain  the shape autoencoder on ground-truth small-organ masks
    sos           SOS-Net heads and the autoencoder, alternating:
                  G: L_seg + 5 L_shape;  D: L_rec - 0.001 L_shape
    finetune      everything together (S-Net, SOL-Net, SOS-Net), D alternating

Adam, lr 5e-4, batch 1 (``lr_schedule: cosine`` lowers the rate within
each stage; the paper keeps it constant). Every iteration draws its sample
from a random generator seeded by (seed, stage, iteration, rank), so a
resumed run sees exactly the data an uninterrupted one would, and ends with
the same weights.
Under ``torchrun`` each process trains on its own samples and
DistributedDataParallel averages the gradients; on a GPU the forward passes
run under bf16 autocast.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.distributed as dist
from torch import nn

from . import losses, postprocess, precision
from .data import AugmentConfig, CachedCase, discover_cases, heatmaps, load_training_cases, sample_chunk
from .metrics import nanmean, organ_metrics
from .networks import FocusNetConfig, FocusNetV2, ShapeAutoencoder, roi_pool, roi_start

# "snet_fixed_bn" (optional, after "snet"): S-Net trained on with its
# BatchNorm statistics fixed (see Trainer.fix_snet_batchnorm).
STAGES = ("snet", "snet_fixed_bn", "solnet", "aae_pretrain", "sos", "finetune")
LR_SCHEDULES = ("constant", "cosine")
HEATMAP_LOSSES = ("l2", "cross_entropy")


@dataclass(frozen=True)
class TrainConfig:
    network: FocusNetConfig = field(default_factory=FocusNetConfig)
    stages: Tuple[Tuple[str, int], ...] = (("snet", 2000), ("solnet", 500), ("aae_pretrain", 500),
                                           ("sos", 1000), ("finetune", 500))
    seed: int = 0
    lr: float = 5e-4
    # How Adam's rate moves within each stage: "constant" (the paper) or
    # "cosine" (from the stage's rate down towards 0 at its last iteration,
    # half a cosine). A pure function of the iteration, so --resume is exact.
    lr_schedule: str = "constant"
    # Each stage's own rate and schedule, where it is not ``lr`` /
    # ``lr_schedule``: ((stage, rate, schedule), ...); in YAML a mapping
    # ``stage_lr: {finetune: 5.0e-5, solnet: {lr: 2.0e-3, schedule: cosine}}``.
    # Each stage starts a fresh Adam, whose first steps move every weight by
    # about its rate whatever the gradient: at 5e-4 the joint fine-tune undid
    # the SOS stage and cost S-Net 0.2-0.3 Dice on some organs in short CPU
    # runs, hence its own lower rate.
    stage_lr: Tuple[Tuple[str, float, str], ...] = ()
    focal_gamma: float = 2.0
    # SOL-Net's heat-map L2 with each voxel weighed by 1 + w * target (0 =
    # the paper's plain L2; see losses.heatmap_loss).
    heatmap_foreground_weight: float = 0.0
    # SOL-Net's heat-map loss: "l2" (the paper) or "cross_entropy" (binary
    # cross-entropy against the same Gaussians, which keeps a gradient where
    # a head's sigmoid has fallen to 0; see losses.heatmap_cross_entropy).
    heatmap_loss: str = "l2"
    dice_weight: float = 1.0
    alpha_power: float = 1.0  # 1 = the paper: alpha inversely proportional to organ size
    shape_weight: float = 5.0
    adversarial_weight: float = 0.001
    adversarial: bool = True  # False: FocusNetv1 (no autoencoder)
    shape_loss_normalized: bool = False  # True: unit-length codes in L_shape (bounded; see losses.shape_loss)
    # Slices of a training crop; 0 = the network's chunk (the paper's 40).
    # Fewer slices make each CPU iteration cheaper; the network is fully
    # convolutional and still runs 40-slice chunks at inference.
    train_crop_slices: int = 0
    # Share of S-Net / SOL-Net / fine-tune crops drawn to hold one organ chosen
    # uniformly (data.choose_z_on_organ); 0 = uniform crops, the paper's 40
    # slices holding most organs anyway. Short crops need it for rare organs.
    organ_crop_fraction: float = 0.0
    autoencoder_width: float = 1.0
    # Training crops over which the snet_fixed_bn stage recomputes S-Net's
    # BatchNorm statistics before it holds them fixed.
    precise_bn_crops: int = 200
    sos_jitter: Tuple[int, int, int] = (1, 3, 3)  # voxels of ROI-centre noise while training SOS
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    validation_cases: int = 2
    # Cases held out of everything (training, every choice made on the
    # validation cases, the best checkpoint) and scored once at the end by
    # the finished bundle through the Segmenter users run (test/evaluation.md).
    test_cases: int = 0
    # The split: cases in name order (None), or shuffled with this seed; the
    # test cases are the last test_cases, the validation cases the
    # validation_cases before them. Written to the run's splits.json (or
    # given with --splits); a resumed run keeps its splits.json.
    split_seed: Optional[int] = None
    validate_every: int = 500
    checkpoint_every: int = 100
    # "auto": bfloat16 autocast where the hardware computes it natively (GPUs
    # of compute capability 8.0 on, CPUs with AMX / AVX512-BF16); on older GPUs
    # float16 with loss scaling (7.0 on) or float32; or "float32" /
    # "bfloat16" / "float16" (precision.choose_for_training; the log and the
    # bundle say which and why).
    precision: str = "auto"
    # Written into the bundle: the model's name and what it may be used for.
    model_name: str = "FocusNetv2"
    intended_use: str = ""

    def __post_init__(self):
        for name, count in self.stages:
            if name not in STAGES:
                raise ValueError(f"unknown stage {name!r}; stages are {STAGES}")
            if count < 0:
                raise ValueError(f"stage {name} has a negative length {count}")
        names = [name for name, _ in self.stages]
        if "snet_fixed_bn" in names:
            fixed = names.index("snet_fixed_bn")
            if "snet" not in names or names.index("snet") > fixed:
                raise ValueError("stage snet_fixed_bn trains on from the snet stage: list it after snet")
            readers = [name for name in names[:fixed] if STAGES.index(name) > STAGES.index("snet_fixed_bn")]
            if readers:
                raise ValueError(f"stage snet_fixed_bn changes the S-Net features that {', '.join(readers)} "
                                 "learn from: list it before them")
        if self.precise_bn_crops < 1:
            raise ValueError(f"precise_bn_crops must be 1 or more, got {self.precise_bn_crops}")
        if not 0.0 <= self.organ_crop_fraction <= 1.0:
            raise ValueError(f"organ_crop_fraction must be between 0 and 1, got {self.organ_crop_fraction}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not (self.heatmap_foreground_weight >= 0 and math.isfinite(self.heatmap_foreground_weight)):
            raise ValueError(f"heatmap_foreground_weight must be 0 or more, got {self.heatmap_foreground_weight}")
        if self.heatmap_loss not in HEATMAP_LOSSES:
            raise ValueError(f"heatmap_loss must be one of {HEATMAP_LOSSES}, got {self.heatmap_loss!r}")
        if self.heatmap_loss == "cross_entropy" and self.heatmap_foreground_weight:
            raise ValueError("heatmap_foreground_weight weighs the L2 heat-map loss; "
                             "it cannot be used with heatmap_loss: cross_entropy")
        seen = set()
        for stage, rate, schedule in self.stage_lr:
            if stage not in STAGES:
                raise ValueError(f"stage_lr: unknown stage {stage!r}; stages are {STAGES}")
            if stage in seen:
                raise ValueError(f"stage_lr: stage {stage} is given twice")
            seen.add(stage)
            if not (isinstance(rate, (int, float)) and rate > 0 and math.isfinite(rate)):
                raise ValueError(f"stage_lr: {stage}'s rate must be a positive number, got {rate!r}")
            if schedule not in LR_SCHEDULES:
                raise ValueError(f"stage_lr: {stage}'s schedule must be one of {LR_SCHEDULES}, got {schedule!r}")

    def rate_of(self, stage: str) -> Tuple[float, str]:
        """The stage's Adam rate and schedule."""
        for name, rate, schedule in self.stage_lr:
            if name == stage:
                return rate, schedule
        return self.lr, self.lr_schedule

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        from .configdict import from_dict

        def stages(value):
            items = value.items() if isinstance(value, dict) else value
            return tuple((str(k), int(v)) for k, v in items)

        augment = lambda value: from_dict(AugmentConfig, value, "augment", tuples=("scale",))  # noqa: E731
        data = dict(data)
        schedule = data.get("lr_schedule", "constant")
        rates = dict(data.get("stage_lr") or {}) if not isinstance(data.get("stage_lr"), (list, tuple)) else \
            {row[0]: {"lr": row[1], "schedule": row[2]} for row in data["stage_lr"]}
        # The settings stage_lr replaced, as configurations, checkpoints and
        # bundles written before it hold them: the same rates.
        for old, stages_of in (("sos_lr", ("aae_pretrain", "sos")), ("finetune_lr", ("finetune",))):
            value = data.pop(old, None)
            if value is not None:
                for stage in stages_of:
                    rates.setdefault(stage, value)

        def stage_lr(value):
            out = []
            for stage, rate in value.items():
                if isinstance(rate, dict):
                    unknown = set(rate) - {"lr", "schedule"}
                    if unknown:
                        raise ValueError(f"stage_lr: {stage} takes lr and schedule, not {sorted(unknown)}")
                    out.append((str(stage), rate.get("lr", data.get("lr", cls.lr)), rate.get("schedule", schedule)))
                else:
                    out.append((str(stage), rate, schedule))
            return tuple(out)

        if rates:
            data["stage_lr"] = rates
        return from_dict(cls, data, "training configuration", tuples=("sos_jitter",),
                         nested={"network": FocusNetConfig.from_dict, "stages": stages, "augment": augment,
                                 "stage_lr": stage_lr})

    def to_dict(self) -> dict:
        data = asdict(self)
        data["network"] = self.network.to_dict()
        data["stages"] = {k: v for k, v in self.stages}
        data["stage_lr"] = {stage: {"lr": rate, "schedule": schedule} for stage, rate, schedule in self.stage_lr}
        return data


def load_config(path) -> TrainConfig:
    """A YAML training configuration. ``base: other.yaml`` (relative to this
    file) starts from another configuration and overrides what this one sets
    (nested mappings merge key by key)."""
    data = _read_config(Path(path), ())
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def _read_config(path: Path, seen: tuple) -> dict:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such training configuration")
    if path.resolve() in seen:
        raise ValueError(f"{path}: 'base' configurations form a cycle")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a training configuration is a mapping of settings")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _merge(_read_config(path.parent / str(base), seen + (path.resolve(),)), data)
    stages = merged.get("stages")
    if isinstance(stages, dict) and isinstance(data.get("stages"), dict):
        # A stage the override adds goes to its place in the schedule, not after the base's last stage.
        order = {name: k for k, name in enumerate(STAGES)}
        merged["stages"] = dict(sorted(stages.items(), key=lambda item: order.get(item[0], len(STAGES))))
    return merged


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# --------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------

def distributed_setup(device: str):
    """(rank, world size, device) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
    return rank, world, device


def _batchnorms(module: nn.Module) -> List[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _wrap(module: nn.Module, world: int, device: str) -> nn.Module:
    if world <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


# --------------------------------------------------------------------------
# Stage steps: each an nn.Module returning the loss, so DDP can wrap it
# --------------------------------------------------------------------------

class SNetStep(nn.Module):
    def __init__(self, model: FocusNetV2, alpha, config: TrainConfig):
        super().__init__()
        self.model, self.config = model, config
        self.register_buffer("alpha", alpha)

    def forward(self, ct, labels, present):
        logits, _ = self.model.snet(ct)
        return losses.segmentation_loss(logits, labels, self.alpha, self.config.focal_gamma,
                                        self.config.dice_weight, present)


def solnet_loss(solnet: nn.Module, features, target_maps, config: TrainConfig) -> torch.Tensor:
    """SOL-Net's heat-map loss on S-Net's features, in the configured form."""
    logits = solnet.logits(features)
    if config.heatmap_loss == "cross_entropy":
        return losses.heatmap_cross_entropy(logits, target_maps)
    return losses.heatmap_loss(torch.sigmoid(logits), target_maps, config.heatmap_foreground_weight)


class SOLNetStep(nn.Module):
    def __init__(self, model: FocusNetV2, config: TrainConfig):
        super().__init__()
        self.model, self.config = model, config

    def forward(self, ct, target_maps):
        with torch.no_grad():
            _, features = self.model.snet(ct)
        return solnet_loss(self.model.solnet, features, target_maps, self.config)


def _roi_targets(labels: torch.Tensor, starts, small_labels, roi):
    """Ground-truth masks (B, 1, *roi) per small organ at ``starts``."""
    return [roi_pool((labels == lab).unsqueeze(1).float(), s, roi) for lab, s in zip(small_labels, starts)]


class AAEPretrainStep(nn.Module):
    def __init__(self, aae: ShapeAutoencoder):
        super().__init__()
        self.aae = aae

    def forward(self, masks: torch.Tensor):
        recon, _, _ = self.aae(masks)
        return torch.nn.functional.mse_loss(recon.float(), masks.float())


class GeneratorStep(nn.Module):
    """SOS-Net (and in fine-tuning S-Net and SOL-Net) with L_G = L_seg + 5 L_shape."""

    def __init__(self, model: FocusNetV2, aae: Optional[ShapeAutoencoder], alpha, config: TrainConfig,
                 joint: bool):
        super().__init__()
        self.model, self.config, self.joint = model, config, joint
        # Held outside the module tree: the autoencoder is trained by its own
        # step (and its own DDP wrapper), not by the generator's optimiser.
        self._aae = (aae,)
        self.register_buffer("alpha", alpha)

    @property
    def aae(self):
        return self._aae[0]

    def forward(self, ct, labels, present, target_maps, starts, valid):
        small_labels = self.model.config.organs.small_labels
        roi = self.model.config.roi_size
        if self.joint:
            logits, features = self.model.snet(ct)
            loss = losses.segmentation_loss(logits, labels, self.alpha, self.config.focal_gamma,
                                            self.config.dice_weight, present)
            loss = loss + solnet_loss(self.model.solnet, features, target_maps, self.config)
        else:
            with torch.no_grad():
                _, features = self.model.snet(ct)
            loss = ct.new_zeros(())
        truths = _roi_targets(labels, starts, small_labels, roi)
        preds = []
        for k, (head, start) in enumerate(zip(self.model.sosnet.heads, starts)):
            pred = head(self.model.sos_roi(ct, features, start))  # as inference pools it (air past the crop)
            preds.append(pred)
            # An organ outside this chunk adds nothing, but stays in the graph
            # so every DDP process reduces the same parameters.
            loss = loss + (losses.binary_segmentation_loss(pred, truths[k]) if valid[k] else 0.0 * pred.sum())
        if self.aae is not None:
            keep = [k for k, v in enumerate(valid) if v] or list(range(len(valid)))
            batch_t = torch.cat([truths[k] for k in keep])
            batch_p = torch.cat([preds[k] for k in keep])
            z_t, f_t, z_p, f_p = _encode_pairs(self.aae, batch_t, batch_p)
            shape = losses.shape_loss([z_t.detach()] + [f.detach() for f in f_t], [z_p] + f_p,
                                      self.config.shape_loss_normalized)
            loss = loss + self.config.shape_weight * shape * float(any(valid))
        return loss, [p.detach() for p in preds], truths


def _encode_pairs(aae: ShapeAutoencoder, truths: torch.Tensor, preds: torch.Tensor):
    """The autoencoder's codes of the true and the predicted masks from one
    batch: in training mode its BatchNorm then normalises both by the same
    statistics (two batches would each be normalised by their own, which can
    hide the very difference the shape loss is to see)."""
    _, z, f = aae(torch.cat([truths, preds.to(truths.dtype)]))
    n = truths.shape[0]
    return z[:n], [x[:n] for x in f], z[n:], [x[n:] for x in f]


class DiscriminatorStep(nn.Module):
    """The autoencoder with L_D = L_rec - 0.001 L_shape."""

    def __init__(self, aae: ShapeAutoencoder, config: TrainConfig):
        super().__init__()
        self.aae, self.config = aae, config

    def forward(self, truths: torch.Tensor, preds: torch.Tensor):
        rec, z, f = self.aae(torch.cat([truths, preds.to(truths.dtype)]))
        n = truths.shape[0]
        rec_t, z_t, f_t, rec_p, z_p, f_p = rec[:n], z[:n], [x[:n] for x in f], rec[n:], z[n:], [x[n:] for x in f]
        rec = losses.reconstruction_loss(rec_t, truths, rec_p, preds)
        shape = losses.shape_loss([z_t] + f_t, [z_p] + f_p, self.config.shape_loss_normalized)
        return losses.autoencoder_loss(rec, shape, self.config.adversarial_weight)


# --------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------

# Steps in a row with a non-finite loss or gradient before training stops.
MAX_BAD_STEPS_IN_A_ROW = 5


def choose_splits(names: List[str], config: "TrainConfig", run_dir: Path, given=None, rank: int = 0,
                  world: int = 1, log=print) -> Dict[str, List[str]]:
    """{"train", "validation", "test": [case names]}: from ``given`` (a
    splits.json the user wrote), else the run's own splits.json (a resumed
    run), else made from the configuration (name order or ``split_seed``).
    Written to the run folder by rank 0; a case in two parts, or named but
    not found, is an error naming the file."""
    path = Path(run_dir) / "splits.json"
    source = Path(given) if given is not None else path if path.is_file() else None
    if source is not None:
        try:
            splits = json.loads(source.read_text())
        except OSError as error:
            raise ValueError(f"{source}: cannot read the splits file ({error.strerror or error})") from None
        except ValueError as error:
            raise ValueError(f"{source}: not a splits file (not JSON: {error})") from None
        if not isinstance(splits, dict) or not all(
                isinstance(splits.get(part, []), list) and all(isinstance(n, str) for n in splits.get(part, []))
                for part in ("train", "validation", "test")):
            raise ValueError(f"{source}: not a splits file: expected {{\"train\": [case names], "
                             "\"validation\": [...], \"test\": [...]}, each a list of strings")
        splits = {part: list(splits.get(part, [])) for part in ("train", "validation", "test")}
        seen: Dict[str, str] = {}
        for part, members in splits.items():
            for name in members:
                if name in seen:
                    raise ValueError(f"{source}: case {name!r} is in both {seen[name]} and {part}")
                seen[name] = part
        unknown = sorted(set(seen) - set(names))
        if unknown:
            raise ValueError(f"{source}: {len(unknown)} case(s) not in the data: {', '.join(unknown[:5])}")
        if source == path:  # a resumed run, or a new start in the folder of one that failed early: said
            log(f"{path}: the splits of the run already in this folder are used (delete the file, or pass "
                "--splits, for others)")
        left_out = sorted(set(names) - set(seen))
        if left_out:
            log(f"{source}: {len(left_out)} case(s) of the data are in no split and are left out: "
                  f"{', '.join(left_out[:5])}")
    else:
        order = sorted(names)
        if config.split_seed is not None:
            order = [order[k] for k in np.random.default_rng(config.split_seed).permutation(len(order))]
        n_test = min(config.test_cases, max(len(order) - 2, 0))
        if n_test < config.test_cases:
            log(f"warning: test_cases is {config.test_cases} but {len(order)} case(s) leave room for {n_test} "
                  "(at least 1 training and 1 validation case come first): the run's figures will come from "
                  "validation only" if n_test == 0 else f"warning: only {n_test} of the {config.test_cases} test "
                  f"cases asked for fit among {len(order)} case(s)")
        n_val = min(config.validation_cases, max(len(order) - n_test - 1, 0))
        test = order[len(order) - n_test:] if n_test else []
        rest = order[:len(order) - n_test]
        splits = {"train": sorted(rest[:len(rest) - n_val]), "validation": sorted(rest[len(rest) - n_val:]),
                  "test": sorted(test)}
    if rank == 0 and source != path:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**splits, "counts": {k: len(v) for k, v in splits.items()}}, indent=1))
        tmp.replace(path)
    return splits


def default_workers(world: int = 1) -> int:
    """Crop workers per rank: the CPU cores a rank has, less one for it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(min(cores // max(world, 1) - 1, 8), 0)


def _without_sigchld_handler(loader):
    """Iterate a DataLoader with workers, then take back the SIGCHLD handler
    it installs for good in this process: left in place, the next child
    process to exit (a subprocess long after training) crashed the process
    with SIGSEGV (reproduced: test_openvino_backend after a run with crop
    workers)."""
    import signal

    from torch.utils.data._utils import signal_handling

    previous = signal.getsignal(signal.SIGCHLD) if hasattr(signal, "SIGCHLD") else None
    installed_before = signal_handling._SIGCHLD_handler_set
    try:
        yield from loader
    finally:
        if previous is not None and not installed_before:
            signal.signal(signal.SIGCHLD, previous)
            signal_handling._SIGCHLD_handler_set = False


def _as_is(crop):
    return crop


class Crops(torch.utils.data.Dataset):
    """A stage's training crops, by iteration: crop ``step`` is drawn with
    the generator seeded by (seed, stage, step, rank), in whichever process
    draws it. Around a small organ for the small-organ stages and the joint
    fine-tune (SOS-Net and the autoencoder learn complete shapes; a crop
    without one would give their Adam a zero loss to step on). Heat maps
    only for the stages whose loss uses them (SOL-Net's and the fine-tune's),
    the small organs' centres for those that place ROIs."""

    MAPS = ("solnet", "finetune")
    CENTRES = ("aae_pretrain", "sos", "finetune")

    def __init__(self, cases, config: "TrainConfig", organs, stage: str, stage_index: int, rank: int):
        self.cases, self.config, self.organs = cases, config, organs
        self.stage, self.stage_index, self.rank = stage, stage_index, rank

    def __len__(self):
        return self.config.stages[self.stage_index][1] if self.stage_index < len(self.config.stages) else 0

    def __getitem__(self, step: int) -> dict:
        return self.draw(np.random.default_rng([self.config.seed, self.stage_index, int(step), self.rank]))

    def draw(self, rng: np.random.Generator) -> dict:
        config, organs = self.config, self.organs
        case = self.cases[int(rng.integers(len(self.cases)))]
        small = list(organs.small_labels)
        depth = config.train_crop_slices or config.network.preprocess.chunk_slices
        around_small = self.stage in ("aae_pretrain", "sos", "finetune")
        image, labels, present = sample_chunk(case, depth, rng, config.augment, small, around_small,
                                              config.organ_crop_fraction, organs.mirror_labels,
                                              config.network.preprocess.spacing)
        # Tensors: a worker hands them over in shared memory (numpy arrays would be pickled, tens of MB
        # a crop); the heat maps, the largest, are written straight into it.
        in_worker = torch.utils.data.get_worker_info() is not None
        shared = lambda a: torch.from_numpy(np.ascontiguousarray(a)).share_memory_() if in_worker \
            else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        maps, centres = None, None
        if self.stage in self.MAPS or self.stage in self.CENTRES:
            with_maps = self.stage in self.MAPS
            maps = torch.zeros((len(small),) + labels.shape) if with_maps else None
            if maps is not None and in_worker:
                maps.share_memory_()
            _, centres = heatmaps(labels, small, with_maps=with_maps, out=None if maps is None else maps.numpy())
        return {"image": shared(image), "labels": shared(labels), "present": torch.from_numpy(np.asarray(present)),
                "maps": maps, "centres": centres, "rng_state": rng.bit_generator.state}


class TrainingDiverged(RuntimeError):
    """Training produced non-finite values; the message names the stage and iteration."""


class Trainer:
    def __init__(self, config: TrainConfig, data_dir, run_dir, device: str = "cpu", log=print,
                 workers: Optional[int] = None, splits=None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.rank, self.world, self.device = distributed_setup(device)
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        net = config.network
        self.organs = net.organs
        # Every rank preprocesses its share of the cache (with ``workers``
        # processes), then all open every case from it, memory-mapped.
        self.workers = default_workers(self.world) if workers is None else int(workers)
        sources, _ = discover_cases(data_dir)
        self.splits = choose_splits([s.name for s in sources], config, self.run_dir, splits, self.rank, self.world,
                                    self.log)
        self.test_sources = [s for s in sources if s.name in set(self.splits["test"])]
        wanted = set(self.splits["train"]) | set(self.splits["validation"])  # the test cases are never preprocessed
        cases, self.problems = load_training_cases(data_dir, self.run_dir / "cache", net.preprocess, self.organs,
                                                   self.log, workers=max(self.workers, 1), rank=self.rank,
                                                   world=self.world,
                                                   barrier=dist.barrier if self.world > 1 else None, only=wanted)
        by_name = {case.name: case for case in cases}
        self.train_cases: List[CachedCase] = [by_name[n] for n in self.splits["train"] if n in by_name]
        self.val_cases: List[CachedCase] = [by_name[n] for n in self.splits["validation"] if n in by_name]
        if not self.train_cases or not self.val_cases:
            raise ValueError(f"{data_dir}: need at least 1 usable training and 1 validation case, found "
                             f"{len(self.train_cases)} and {len(self.val_cases)} (splits: {self.run_dir / 'splits.json'})")
        self.data_dir = str(data_dir)
        torch.manual_seed(config.seed)
        self.precision, self.precision_reason = precision.choose_for_training(config.precision, self.device)
        self.log(f"training precision: {self.precision} ({self.precision_reason})")
        # float16 needs loss scaling; bfloat16 and float32 do not.
        self.scaler = (torch.amp.GradScaler("cuda" if self.device.startswith("cuda") else "cpu")
                       if self.precision == "float16" else None)
        self.model = precision.training_layout(FocusNetV2(net).to(self.device), self.device)
        self.aae = precision.training_layout(ShapeAutoencoder(net.roi_size, config.autoencoder_width).to(self.device),
                                             self.device)
        self.alpha = self._class_weights().to(self.device)
        self.precision_probe = self._decide_precision()
        self.bad_steps = {"total": 0, "in_a_row": 0}
        self.history: List[dict] = []
        self.position = (0, 0)  # (stage index, iteration within it)
        self.optimizers: Dict[str, torch.optim.Optimizer] = {}
        self.runners: Dict[str, nn.Module] = {}
        self.stage: Optional[str] = None
        self.lr_scale = 1.0  # the schedule's factor for the iteration being run
        self.postprocess_plan: Optional[dict] = None  # chosen at the end; the final validation applies it
        self.report_errors: List[str] = []  # steps after training that failed (the model is written anyway)
        self.best = {"mean_dice": float("-inf"), "step": 0}  # checkpoint-best.pt's validation
        self.iterations: Optional[IterationLog] = None
        self.seconds_before = 0.0  # training time of the run's earlier sessions (from the checkpoint)
        self.d_loss = float("nan")

    # -- data --------------------------------------------------------------
    def _class_weights(self) -> torch.Tensor:
        counts = np.zeros(self.organs.num_classes)
        seen = np.zeros(self.organs.num_classes)
        for case in self.train_cases:
            counts += case.label_counts(self.organs.num_classes)
            seen += case.present
        mean = counts / np.maximum(seen, 1)
        return losses.organ_weights(mean, self.config.alpha_power)

    def crops(self, stage: str, stage_index: int) -> "Crops":
        """The stage's training crops by iteration (what the workers run)."""
        return Crops(self.train_cases, self.config, self.organs, stage, stage_index, self.rank)

    def _loader(self, stage: str, stage_index: int, first: int, length: int):
        """The crops of iterations first..length-1, made ahead by ``workers``
        processes (none: in this process). A crop depends only on the seed,
        the stage, the iteration and the rank, so every worker count gives
        the same run, and a resumed run the same crops."""
        crops = self.crops(stage, stage_index)
        if self.workers <= 0:
            return (crops[step] for step in range(first, length))
        return _without_sigchld_handler(torch.utils.data.DataLoader(crops, batch_size=None, sampler=range(first, length),
                                                num_workers=self.workers, prefetch_factor=4,
                                                collate_fn=_as_is, persistent_workers=False))

    def _sample(self, rng, around_small: bool):
        """One crop drawn in this process (the BatchNorm re-estimation)."""
        stage = "sos" if around_small else "snet"
        crop = Crops(self.train_cases, self.config, self.organs, stage, 0, self.rank).draw(rng)
        return self._tensors(crop)[:4] + (crop["centres"],)

    def _tensors(self, crop: dict):
        to = lambda a, dtype=torch.float32: torch.as_tensor(a, dtype=dtype, device=self.device)  # noqa: E731
        maps = crop["maps"]
        return (to(crop["image"])[None, None], to(crop["labels"], torch.long)[None], to(crop["present"], torch.bool)[None],
                None if maps is None else to(maps)[None])

    def _starts(self, centres, rng):
        """ROI corners at the true centres plus noise (the localisation error
        SOS-Net must tolerate); absent organs get a dummy ROI and no loss."""
        jitter = self.config.sos_jitter
        starts, valid = [], []
        for c in centres:
            if c is None:
                starts.append((0, 0, 0))
                valid.append(False)
                continue
            noisy = tuple(int(v + rng.integers(-j, j + 1)) for v, j in zip(c, jitter))
            starts.append(roi_start(noisy, self.config.network.roi_size))
            valid.append(True)
        return starts, valid

    # -- stages --------------------------------------------------------------
    def _set_trainable(self, stage: str):
        self.stage = stage
        model = self.model
        for p in model.parameters():
            p.requires_grad_(False)
        parts = {"snet": [model.snet], "snet_fixed_bn": [model.snet], "solnet": [model.solnet],
                 "aae_pretrain": [], "sos": [model.sosnet],
                 "finetune": [model.snet, model.solnet, model.sosnet]}[stage]
        for part in parts:
            for p in part.parameters():
                p.requires_grad_(True)
        model.train()
        for module in (model.snet, model.solnet, model.sosnet):
            if module not in parts:
                module.eval()  # frozen BatchNorm statistics too
        if self._snet_batchnorm_fixed(stage):
            for norm in _batchnorms(model.snet):
                norm.eval()  # S-Net's weights may train; its statistics stay as fixed
        for p in self.aae.parameters():
            p.requires_grad_(stage in ("aae_pretrain", "sos", "finetune") and self.config.adversarial)
        self.aae.train()

    def _snet_batchnorm_fixed(self, stage: str) -> bool:
        """Whether S-Net's BatchNorm statistics are held in ``stage``: from
        the snet_fixed_bn stage on (the joint fine-tune included)."""
        names = [name for name, _ in self.config.stages]
        return "snet_fixed_bn" in names and names.index(stage) >= names.index("snet_fixed_bn")

    @torch.no_grad()
    def fix_snet_batchnorm(self, stage_index: int) -> None:
        """Precise BatchNorm (Wu & Johnson, "Rethinking 'batch' in
        BatchNorm", 2021): S-Net's running statistics recomputed as the
        plain average over ``precise_bn_crops`` training crops, drawn as the
        S-Net stage draws them. Trained one crop at a time, each BatchNorm
        normalised by that crop's statistics, which differ between a crop of
        the cranium and one of the neck; the running averages it kept
        followed the last few dozen crops (the joint fine-tune's, all around
        the small organs; what that cost is measured in
        configs/phantom-cpu-fixed-bn.yaml). The crops are the same on every
        process, so DDP ranks agree."""
        snet = self.model.snet
        norms = _batchnorms(snet)
        saved = [(m, m.momentum) for m in norms]
        was_training = snet.training
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.train()
        rng = np.random.default_rng([self.config.seed, stage_index, 0xB4])
        depth = self.config.train_crop_slices or self.config.network.preprocess.chunk_slices
        try:
            for _ in range(self.config.precise_bn_crops):
                case = self.train_cases[int(rng.integers(len(self.train_cases)))]
                image, _, _ = sample_chunk(case, depth, rng, self.config.augment, None, False,
                                           self.config.organ_crop_fraction, self.organs.mirror_labels,
                                           self.config.network.preprocess.spacing)
                with self._autocast():
                    snet(torch.as_tensor(image, device=self.device)[None, None])
        finally:
            for m, momentum in saved:
                m.momentum = momentum
            snet.train(was_training)
        from .bundle import non_finite_tensors

        bad = non_finite_tensors(snet.state_dict(), "snet.")
        if bad:
            raise TrainingDiverged(f"S-Net's recomputed BatchNorm statistics are not finite: {', '.join(bad[:5])}")
        self.log(f"S-Net's BatchNorm statistics recomputed over {self.config.precise_bn_crops} training crops "
                 "and held fixed from here on")

    def _runner(self, key: str, factory) -> nn.Module:
        """The stage's step module, wrapped in DDP once per stage."""
        if key not in self.runners:
            self.runners[key] = _wrap(factory(), self.world, self.device)
        return self.runners[key]

    # Which stage each optimiser belongs to (its rate and schedule).
    OPTIMIZER_STAGE = {"snet": "snet", "snet_fixed_bn": "snet_fixed_bn", "solnet": "solnet", "aae": "aae_pretrain",
                       "sos_g": "sos", "sos_d": "sos", "finetune_g": "finetune", "finetune_d": "finetune"}

    def _optimizer(self, key: str, params) -> torch.optim.Optimizer:
        """The stage's Adam (created at its first use), at the rate the
        stage's schedule gives the current iteration."""
        lr, _ = self.config.rate_of(self.OPTIMIZER_STAGE[key])
        if key not in self.optimizers:
            self.optimizers[key] = torch.optim.Adam([p for p in params if p.requires_grad], lr=lr)
        for group in self.optimizers[key].param_groups:
            group["lr"] = lr * self.lr_scale
        return self.optimizers[key]

    def _schedule(self, stage_index: int, step: int) -> float:
        """The factor on the stage's learning rate at this iteration."""
        name, length = self.config.stages[stage_index]
        if self.config.rate_of(name)[1] == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * step / length))

    def _autocast(self):
        return precision.autocast(self.precision, self.device)

    def _decide_precision(self) -> Dict[str, str]:
        """bfloat16 only where it measured right on this machine: one forward
        and backward of each network on a fixed training crop, in float32 and
        in bfloat16 (precision.probe_bfloat16). The FocusNetv2 networks falling
        back turn autocast off; the autocoder alone computes in float32 inside it."""
        if self.precision != "bfloat16":
            return {"focusnet": self.precision, "autoencoder": self.precision}
        ct, labels, _, _, centres = self._sample(np.random.default_rng(self.config.seed), around_small=True)
        roi = self.config.network.roi_size
        model = self.model

        class SNetAndSOLNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.snet, self.solnet = model.snet, model.solnet

            def forward(self, x):
                logits, features = self.snet(x)
                return logits, self.solnet(features)

        with torch.no_grad():
            features = model.snet(ct)[1]
        # The ROI at the first small organ the crop holds (or the crop's corner).
        start = roi_start(centres[0], roi) if centres and centres[0] is not None else (0, 0, 0)
        sos_input = roi_pool(model.sos_input(ct, features), start, roi)
        mask = roi_pool((labels[:, None] > 0).float(), start, roi)
        checks = {"focusnet": [(SNetAndSOLNet(), [ct]), (model.sosnet.heads[0], [sos_input])],
                  "autoencoder": [(self.aae, [mask])]}
        decision = {}
        for network, probes in checks.items():
            reason = next((r for r in (precision.probe_bfloat16(m, x, self.device, backward=True)
                                       for m, x in probes) if r), "")
            decision[network] = "bfloat16" if not reason else f"float32 ({reason})"
            if reason:
                self.log(f"bfloat16 measured wrong for the {network} networks on this machine ({reason}): "
                         "they train in float32")
        if decision["focusnet"] != "bfloat16":
            self.precision = "float32"
        elif decision["autoencoder"] != "bfloat16":
            self.aae.float32_only = True
        return decision

    def _apply(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, stage: str, step: int) -> float:
        """One optimiser step, skipped when the loss or a gradient is not
        finite (counted; after MAX_BAD_STEPS_IN_A_ROW such steps the run stops
        with an error). The check is on gradients after backward, which DDP
        has averaged, so every process decides alike."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            return self._apply_scaled(optimizer, loss, stage, step)
        loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = bool(torch.isfinite(loss.detach()).all()) and all(bool(torch.isfinite(p.grad).all()) for p in params)
        if finite:
            optimizer.step()
            self.bad_steps["in_a_row"] = 0
            return float(loss.detach())
        return self._bad_step(optimizer, stage, step)

    def _apply_scaled(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, stage: str, step: int) -> float:
        """float16: the loss scaled up for backward, the gradients unscaled
        before the check. Gradients that overflowed at the current scale are
        the GradScaler's business (it skips the step and lowers the scale),
        not a sign of divergence; a non-finite loss is."""
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        finite_loss = bool(torch.isfinite(loss.detach()).all())
        self.scaler.step(optimizer)  # skipped by the scaler when a gradient is inf or NaN
        self.scaler.update()
        if finite_loss:
            self.bad_steps["in_a_row"] = 0
            return float(loss.detach())
        return self._bad_step(optimizer, stage, step)

    def _bad_step(self, optimizer: torch.optim.Optimizer, stage: str, step: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        self.bad_steps["total"] += 1
        self.bad_steps["in_a_row"] += 1
        self.log(f"{stage} iteration {step + 1}: non-finite loss or gradient, step skipped "
                 f"({self.bad_steps['total']} so far)")
        if self.bad_steps["in_a_row"] >= MAX_BAD_STEPS_IN_A_ROW:
            raise TrainingDiverged(f"training stopped in stage {stage} at iteration {step + 1}: "
                                   f"{self.bad_steps['in_a_row']} steps in a row had a non-finite loss or gradient "
                                   f"(precision {self.precision}; try precision: float32 or a lower learning rate)")
        return float("nan")

    def run(self, resume: bool = False, progress: bool = True, stop_after: Optional[int] = None,
            max_minutes: Optional[float] = None):
        """Train to the end of the schedule (or, with ``stop_after``, save a
        checkpoint after that many iterations and return None, as an
        interrupted run would leave it; with ``max_minutes``, the same once
        that much time has passed: ``stopped_early`` is then set)."""
        if resume:
            self._load_checkpoint()
        total = sum(n for _, n in self.config.stages)
        done_before = sum(n for _, n in self.config.stages[: self.position[0]]) + self.position[1]
        self.resumed_finished = resume and done_before >= total  # nothing left to train
        bar = _progress(total, done_before, enabled=progress and self.rank == 0)
        self.iterations = IterationLog(self.run_dir, done_before, enabled=self.rank == 0)
        start_time = time.perf_counter()
        self._run_started = start_time
        self.stopped_early = False
        for stage_index in range(self.position[0], len(self.config.stages)):
            stage, length = self.config.stages[stage_index]
            first = self.position[1] if stage_index == self.position[0] else 0
            if stage in ("aae_pretrain",) and not self.config.adversarial:
                first = length  # FocusNetv1 has no autoencoder
            if stage == "snet_fixed_bn" and first == 0 and length:
                self.fix_snet_batchnorm(stage_index)
            self._set_trainable(stage)
            loader = self._loader(stage, stage_index, first, length)
            for step in range(first, length):
                waited = time.perf_counter()
                crop = next(loader)
                stepped = time.perf_counter()
                self.d_loss = float("nan")
                loss = self._step(stage, stage_index, step, crop)
                self.position = (stage_index, step + 1)
                global_step = sum(n for _, n in self.config.stages[:stage_index]) + step + 1
                bar.update(stage, loss)
                self.iterations.add(step=global_step, stage=stage, iteration=step + 1, loss=loss, d_loss=self.d_loss,
                                    lr=self.config.rate_of(stage)[0] * self.lr_scale, data_s=stepped - waited,
                                    step_s=time.perf_counter() - stepped,
                                    wall_s=self.seconds_before + time.perf_counter() - start_time)
                if self.rank == 0 and global_step % self.config.checkpoint_every == 0:
                    self._save_checkpoint()
                out_of_time = max_minutes is not None and time.perf_counter() - start_time > 60 * max_minutes
                if self.world > 1 and max_minutes is not None:  # every rank stops at the same iteration
                    flag = torch.tensor([float(out_of_time)], device=self.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    out_of_time = bool(flag.item())
                if (stop_after is not None and global_step >= stop_after) or out_of_time:
                    if self.rank == 0:
                        self._save_checkpoint()
                    self.plot_progress()
                    if out_of_time:
                        self.stopped_early = True
                        self.log(f"stopped after {max_minutes:g} minutes at {stage} iteration {step + 1} of "
                                 f"{length} ({global_step} of {total}); --resume continues the run")
                    bar.close()
                    return None
                if global_step % self.config.validate_every == 0:
                    self.validate(global_step, stage)
            self.position = (stage_index + 1, 0)
            self.optimizers.clear()  # each stage starts its own Adam
            self.runners.clear()
            if self.rank == 0:
                self._save_checkpoint()
                if stage == "solnet":  # where ablations branch off (Trainer.branch_from)
                    shutil.copyfile(self._checkpoint_path(), self.run_dir / "checkpoint-after-solnet.pt")
        bar.close()
        self.plot_progress()
        self.training_seconds = self.seconds_before + time.perf_counter() - start_time
        # Trained: what follows tunes and reports. A failure in any of it is
        # logged and recorded, and the model is written all the same with the
        # configuration's values for what could not be tuned: a long run never
        # loses its result to a reporting step.
        for what, step in (("presence threshold", self.calibrate_heatmap_threshold),
                           ("SOS-Net thresholds", self.calibrate_sos_thresholds),
                           ("S-Net small organs", self.calibrate_snet_small),
                           ("post-processing", lambda: setattr(self, "postprocess_plan", self.plan_postprocessing()))):
            self._after_training(what, step)
        return self._after_training("final validation", lambda: self.validate(total, "final"))

    def _after_training(self, what: str, step):
        try:
            return step()
        except Exception as error:  # noqa: BLE001  (any failure: the trained weights must be written)
            self.report_errors.append(f"{what}: {type(error).__name__}: {error}")
            self.log(f"{what} failed after training ({type(error).__name__}: {error}); the model is written "
                     "without it")
            return None

    def _step(self, stage: str, stage_index: int, step: int, crop: Optional[dict] = None) -> float:
        crop = crop if crop is not None else self.crops(stage, stage_index)[step]
        # The crop's generator goes on where drawing the crop left it (the ROI jitter below).
        rng = np.random.default_rng()
        rng.bit_generator.state = crop["rng_state"]
        self.lr_scale = self._schedule(stage_index, step)
        model = self.model
        ct, labels, present, maps = self._tensors(crop)
        centres = crop["centres"]
        if stage in ("snet", "snet_fixed_bn"):
            opt = self._optimizer(stage, model.snet.parameters())
            runner = self._runner(stage, lambda: SNetStep(model, self.alpha, self.config))
            with self._autocast():
                loss = runner(ct, labels, present)
            return self._apply(opt, loss, stage, step)
        if stage == "solnet":
            opt = self._optimizer("solnet", model.solnet.parameters())
            runner = self._runner("solnet", lambda: SOLNetStep(model, self.config))
            with self._autocast():
                loss = runner(ct, maps)
            return self._apply(opt, loss, stage, step)
        starts, valid = self._starts(centres, rng)
        if stage == "aae_pretrain":
            opt = self._optimizer("aae", self.aae.parameters())
            targets = _roi_targets(labels, starts, self.organs.small_labels, self.config.network.roi_size)
            keep = [k for k, v in enumerate(valid) if v] or list(range(len(valid)))
            runner = self._runner("aae", lambda: AAEPretrainStep(self.aae))
            with self._autocast():
                loss = runner(torch.cat([targets[k] for k in keep])) * float(any(valid))
            return self._apply(opt, loss, stage, step)
        # sos / finetune: G step then D step
        joint = stage == "finetune"
        parts = [model.sosnet] + ([model.snet, model.solnet] if joint else [])
        opt_g = self._optimizer(f"{stage}_g", [p for part in parts for p in part.parameters()])
        aae = self.aae if self.config.adversarial else None
        runner = self._runner("g", lambda: GeneratorStep(model, aae, self.alpha, self.config, joint))
        with self._autocast():
            loss, preds, truths = runner(ct, labels, present, maps, starts, valid)
        value = self._apply(opt_g, loss, stage, step)
        if aae is not None:
            opt_d = self._optimizer(f"{stage}_d", self.aae.parameters())
            d_runner = self._runner("d", lambda: DiscriminatorStep(self.aae, self.config))
            keep = [k for k, v in enumerate(valid) if v] or list(range(len(valid)))
            t = torch.cat([truths[k] for k in keep])
            p = torch.cat([preds[k] for k in keep]).float()
            with self._autocast():
                d_loss = d_runner(t, p) * float(any(valid))
            self.d_loss = self._apply(opt_d, d_loss, stage, step)
        return value

    # -- validation ----------------------------------------------------------
    @torch.no_grad()
    def validate(self, global_step: int, stage: str) -> Dict[str, Dict[str, float]]:
        if self.rank != 0:
            return {}
        self.model.eval()
        # Before SOS-Net has trained, the S-Net's own labels are what there is.
        branch = self._sos_trained()
        spacing = tuple(reversed(self.config.network.preprocess.spacing))
        per_organ: Dict[str, List[dict]] = {}
        for case in self.val_cases:
            volume = torch.as_tensor(case.image, device=self.device)[None, None]
            with self._autocast():
                out = self.model.segment(volume, small_organ_branch=branch)
            labels = out["labels"][0].cpu().numpy()
            if branch:
                labels = postprocess.apply(labels.astype(np.uint8), self.postprocess_plan, self.organs)
            present = [lab for lab in range(1, self.organs.num_classes) if case.present[lab]]
            truth = case.labels  # (from the cache on disk: read once per case)
            found = organ_metrics(labels, truth, present, spacing)
            found.update({lab: {**found.get(lab, {}), **values} for lab, values in
                          localisation_metrics(out["heatmaps"][0], truth, self.organs.small_labels, spacing,
                                               self.model.config.heatmap_threshold).items()})
            for lab, values in found.items():
                per_organ.setdefault(self.organs.name_of(lab), []).append(values)
        summary = {name: {k: nanmean([v.get(k, float("nan")) for v in vals]) for k in dict.fromkeys(k for v in vals for k in v)}
                   for name, vals in per_organ.items()}
        rows = [{"step": global_step, "stage": stage, "organ": name, **vals} for name, vals in summary.items()]
        self.history.extend(rows)
        self._write_metrics()
        mean_dice = np.mean([v["dice"] for v in summary.values()]) if summary else float("nan")
        small = [summary[n]["dice"] for n in self.organs.small_names if n in summary]
        # An organ the prediction drew but the truth lacks has a Dice and no
        # localisation error (issue 47: a KeyError here lost a whole run).
        errors = [summary[n]["peak_error_mm"] for n in self.organs.small_names
                  if "peak_error_mm" in summary.get(n, {})]
        if stage != "final" and np.isfinite(mean_dice) and mean_dice > self.best["mean_dice"]:
            self.best = {"mean_dice": float(mean_dice), "step": int(global_step), "stage": stage}
            self._save_checkpoint()
            shutil.copyfile(self._checkpoint_path(), self.run_dir / "checkpoint-best.pt")
        self.log(f"validation at step {global_step} ({stage}): mean Dice {mean_dice:.3f}, "
                 f"small organs {np.mean(small) if small else float('nan'):.3f}, SOL-Net peak error "
                 f"{np.median(errors) if errors else float('nan'):.1f} mm (median over small organs)")
        if self.stage is not None:
            self._set_trainable(self.stage)  # back to training mode
        return summary

    @torch.no_grad()
    def calibrate_heatmap_threshold(self) -> float:
        """Set the bundle's small-organ presence threshold from the data: half
        the lowest heat-map peak of a small organ that is present in a
        validation case (a scan without the organ should peak far lower)."""
        import dataclasses

        self.model.eval()
        peaks = []
        small = self.organs.small_labels
        for case in self.val_cases:
            volume = torch.as_tensor(case.image, device=self.device)[None, None]
            heat = self.model.segment(volume, small_organ_branch=False)["heatmaps"][0]
            truth = case.labels
            for k, label in enumerate(small):
                if (truth == label).any():
                    peaks.append(float(heat[k].max()))
        if peaks:
            threshold = 0.5 * min(peaks)
            if not math.isfinite(threshold):
                raise TrainingDiverged(f"the small-organ presence threshold came out {threshold} (non-finite "
                                       "heat maps on the validation cases); nothing was written")
            self.model.config = dataclasses.replace(self.model.config, heatmap_threshold=threshold)
            self.log(f"small-organ presence threshold: {threshold:.3f} (half the lowest peak of {len(peaks)})")
        if self.stage is not None:
            self._set_trainable(self.stage)
        return self.model.config.heatmap_threshold

    @torch.no_grad()
    def calibrate_sos_thresholds(self) -> Tuple[float, ...]:
        """Set SOS-Net's probability threshold per small organ from the
        validation cases (postprocess.choose_sos_thresholds), stored in the
        bundle's network configuration."""
        import dataclasses

        if self.rank != 0:
            return self.model.config.sos_thresholds
        self.model.eval()
        with self._autocast():
            samples = sos_samples(self.model, self.val_cases, self.device)
        thresholds, report = postprocess.choose_sos_thresholds(samples, self.organs.small_names)
        self.model.config = dataclasses.replace(self.model.config, sos_thresholds=thresholds)
        self.sos_threshold_report = report
        self.log("SOS-Net thresholds: " + ", ".join(f"{n} {r['threshold']} (Dice {r['dice_at_0.5']:.3f} at 0.5, "
                                                    f"{r['dice']:.3f})" for n, r in report.items()))
        if self.stage is not None:
            self._set_trainable(self.stage)
        return thresholds

    @torch.no_grad()
    def calibrate_snet_small(self) -> Tuple[str, ...]:
        """Which small organs keep S-Net's own contour (S-Net alone beat the
        small-organ branch on the validation cases by more than chance,
        postprocess.choose_snet_small), stored in the bundle's network
        configuration."""
        import dataclasses

        if self.rank != 0 or not self._sos_trained():
            return self.model.config.snet_small
        self.model.eval()
        with self._autocast():
            branch, snet = branch_and_snet_labels(self.model, self.val_cases, self.device)
        chosen, report = postprocess.choose_snet_small(branch, snet, self.organs)
        self.model.config = dataclasses.replace(self.model.config, snet_small=chosen)
        self.log("small organs drawn by S-Net alone: " + (", ".join(chosen) or "none") + " (validation Dice, branch / "
                 "S-Net: " + ", ".join(f"{n} {r['branch']:.3f} / {r['snet']:.3f}" for n, r in report.items()) + ")")
        if self.stage is not None:
            self._set_trainable(self.stage)
        return chosen

    @torch.no_grad()
    def plan_postprocessing(self) -> Optional[dict]:
        """Which post-processing steps help each organ on the validation
        cases (FocusNetCore.postprocess.choose); stored in the bundle."""
        if self.rank != 0:
            return None
        self.model.eval()
        pairs = []
        for case in self.val_cases:
            volume = torch.as_tensor(case.image, device=self.device)[None, None]
            with self._autocast():
                labels = self.model.segment(volume, small_organ_branch=self._sos_trained())["labels"]
            pairs.append((labels[0].cpu().numpy().astype(np.uint8), case.labels))
        plan = postprocess.choose(pairs, self.organs)
        self.log(f"post-processing on {len(pairs)} validation case(s): largest component for "
                 f"{len(plan['largest_component'])} organs, hole filling for {len(plan['fill_holes'])}")
        if self.stage is not None:
            self._set_trainable(self.stage)
        return plan

    def _sos_trained(self) -> bool:
        if getattr(self, "started_from", None):
            return True  # a model bundle's SOS-Net has had its stages
        for index, (name, length) in enumerate(self.config.stages):
            if name in ("sos", "finetune") and length:
                if index < self.position[0] or (index == self.position[0] and self.position[1] > 0):
                    return True
        return False

    def _write_metrics(self):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "validation.csv"
        fields = ["step", "stage", "organ", "dice", "hd95_paper", "hd95_symmetric", "surface_dice", "peak_error_mm",
                  "detected"]
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.history)
        tmp.replace(path)
        _plot_history(self.history, self.run_dir / "validation.png", self.organs.small_names)

    # -- checkpoints ---------------------------------------------------------
    def _checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def _save_checkpoint(self):
        from .bundle import non_finite_tensors

        bad = non_finite_tensors(self.model.state_dict()) + non_finite_tensors(self.aae.state_dict(), "autoencoder.")
        if bad:
            raise TrainingDiverged(f"not writing a checkpoint with non-finite weights ({', '.join(bad[:5])}"
                                   f"{' ...' if len(bad) > 5 else ''}) at stage {self.stage}, position "
                                   f"{self.position}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {"model": self.model.state_dict(), "aae": self.aae.state_dict(),
                 "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                 "position": list(self.position), "history": self.history,
                 "config": json.dumps(self.config.to_dict()),
                 "started_from": getattr(self, "started_from", None), "best": self.best,
                 "training_seconds": self.seconds_before + (time.perf_counter() - self._run_started
                                                            if getattr(self, "_run_started", None) else 0.0),
                 **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {})}
        tmp = self._checkpoint_path().with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self._checkpoint_path())
        if getattr(self, "iterations", None) is not None:
            self.iterations.flush()  # history.csv holds what the checkpoint holds
            self.plot_progress(force=False)

    def plot_progress(self, force: bool = True) -> None:
        """progress.png, at most every 30 s unless ``force``."""
        if self.rank != 0 or (not force and time.monotonic() - getattr(self, "_plotted", 0.0) < 30):
            return
        self._plotted = time.monotonic()
        _plot_progress(self.run_dir / "history.csv", self.history, self.run_dir / "progress.png")

    def _load_checkpoint(self):
        path = self._checkpoint_path()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no checkpoint to resume from")
        state = torch.load(path, map_location=self.device, weights_only=True)
        if _stored_config(state) != _as_json(self.config):
            raise ValueError(f"{path}: the checkpoint was made with another configuration")
        self.model.load_state_dict(state["model"])
        self.aae.load_state_dict(state["aae"])
        self.position = tuple(state["position"])
        self.history = state["history"]
        self.started_from = state.get("started_from")
        self.best = state.get("best", self.best)
        self.seconds_before = float(state.get("training_seconds", 0.0))  # earlier sessions of this run
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        stage = self.config.stages[self.position[0]][0] if self.position[0] < len(self.config.stages) else None
        if stage is not None:
            self._set_trainable(stage)
            model = self.model
            params = {"snet": model.snet.parameters, "snet_fixed_bn": model.snet.parameters,
                      "solnet": model.solnet.parameters, "aae": self.aae.parameters,
                      f"{stage}_g": lambda: [p for part in ([model.sosnet] + ([model.snet, model.solnet]
                                                                              if stage == "finetune" else []))
                                             for p in part.parameters()],
                      f"{stage}_d": self.aae.parameters}
            for key, opt_state in state["optimizers"].items():
                self._optimizer(key, params[key]()).load_state_dict(opt_state)

    # Settings that act only from the autoencoder stage on: runs differing in
    # them share their S-Net and SOL-Net stages (the table 6 ablation).
    BRANCH_FREE = ("adversarial", "shape_weight", "adversarial_weight", "shape_loss_normalized", "autoencoder_width",
                   "sos_jitter", "model_name", "intended_use", "validate_every", "checkpoint_every")

    def branch_from(self, checkpoint, fresh_sos: bool = False) -> None:
        """Start from another run's checkpoint taken after its S-Net and SOL-Net
        stages: its network weights, position and validation history; the
        rest of the schedule follows this run's configuration (e.g.
        ``adversarial: false`` for FocusNetv1, or a longer solnet stage, which
        then continues training SOL-Net from where the other run stopped).
        Refuses a checkpoint whose network, data settings or S-Net stage
        differ from this run's, or that was taken before its SOL-Net was done.
        ``fresh_sos``: SOS-Net starts from new weights (seeded as a run from
        scratch), not the checkpoint's; for ablations branched from a run
        whose SOS-Net had already trained (the autoencoder is never taken
        from the checkpoint)."""
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no checkpoint to branch from")
        state = torch.load(path, map_location=self.device, weights_only=True)
        theirs, ours = _stored_config(state), _as_json(self.config)
        stage_index, step = state["position"]
        stages, their_stages = list(ours["stages"].items()), list(theirs["stages"].items())
        names = [name for name, _ in stages]
        aae_index = names.index("aae_pretrain") if "aae_pretrain" in names else len(names)
        sol = aae_index - 1  # the solnet stage
        done = stage_index == aae_index or (stage_index == sol and step >= their_stages[sol][1])
        same_prefix = their_stages[:sol] == stages[:sol] and their_stages[sol][0] == stages[sol][0]
        if not done or not same_prefix or stages[sol][1] < their_stages[sol][1]:
            raise ValueError(f"{path}: can branch only after the snet and solnet stages, before sos, with the same "
                             f"snet stage and a solnet stage at least as long (checkpoint at stage {stage_index}, "
                             f"step {step})")
        # Rates matter for the shared stages only (the rest is this run's).
        their_config = TrainConfig.from_dict(theirs)
        for name in names[:aae_index]:
            if their_config.rate_of(name) != self.config.rate_of(name):
                raise ValueError(f"{path}: made with a different rate for the {name} stage "
                                 f"({their_config.rate_of(name)} vs {self.config.rate_of(name)})")
        for key in set(theirs) | set(ours):
            if key in self.BRANCH_FREE or key in ("stages", "lr", "lr_schedule", "stage_lr"):
                continue
            if theirs.get(key) != ours.get(key):
                raise ValueError(f"{path}: made with a different {key!r} ({theirs.get(key)!r} vs {ours.get(key)!r})")
        self.model.load_state_dict(state["model"])
        if fresh_sos:
            torch.manual_seed(self.config.seed)
            for module in self.model.sosnet.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()  # PyTorch's default initialisation, as FocusNetV2 is built
        extra = stages[sol][1] - their_stages[sol][1]
        self.position = (sol, their_stages[sol][1]) if extra else (aae_index, 0)
        self.history = [row for row in state["history"] if row["stage"] in names[:aae_index]]
        self._save_checkpoint()

    def start_from_model(self, bundle, stage: str) -> None:
        """Start from a model bundle's weights (its networks and shape
        autoencoder) at ``stage``: the stages before it count as done by the
        bundle, ``stage`` and those after it train on from its weights (e.g.
        a new SOL-Net rate on the shipped model's S-Net, or a model trained
        on phantoms fine-tuned on one's own cases). The bundle's network must
        be this configuration's (organs, widths, ROI, grid); its calibrated
        presence threshold and the rest are recalibrated at the end."""
        from .bundle import load_bundle

        names = [name for name, _ in self.config.stages]
        if stage not in names:
            raise ValueError(f"--from-stage {stage!r} is not a stage of this configuration ({', '.join(names)})")
        model, meta = load_bundle(bundle)
        calibrated = ("heatmap_threshold", "below_threshold", "sos_thresholds", "snet_small")
        theirs = {k: v for k, v in model.config.to_dict().items() if k not in calibrated}
        ours = {k: v for k, v in self.config.network.to_dict().items() if k not in calibrated}
        different = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        if different:
            raise ValueError(f"{bundle}: its network differs from this configuration's in {', '.join(different)} "
                             f"({', '.join(f'{theirs.get(k)!r} vs {ours.get(k)!r}' for k in different)})")
        self.model.load_state_dict(model.state_dict())
        if "autoencoder_state" in meta:
            if meta.get("autoencoder_width") != self.config.autoencoder_width:
                raise ValueError(f"{bundle}: its shape autoencoder has width {meta.get('autoencoder_width')}, this "
                                 f"configuration {self.config.autoencoder_width}")
            self.aae.load_state_dict(meta["autoencoder_state"])
        self.position = (names.index(stage), 0)
        self.history = []
        self.started_from = {"model": str(bundle), "checksum": meta.get("checksum", ""), "stage": stage}
        self.log(f"starting at the {stage} stage from {bundle} (checksum {meta.get('checksum', '')[:12]})")
        self._save_checkpoint()

    def anatomy_prior(self) -> dict:
        """fieldofview's prior from the training cases' contours, on the model
        grid (LPS order, the preprocessing's spacing), one case at a time."""
        from .fieldofview import prior_from_cases

        spacing = [float(v) for v in self.config.network.preprocess.spacing]

        def images():
            for case in self.train_cases:
                labels = sitk.GetImageFromArray(np.asarray(case.labels))
                labels.SetSpacing(spacing)
                yield labels

        prior = prior_from_cases(images(), self.organs)
        prior["source"] = f"the {len(self.train_cases)} training cases of {self.data_dir}"
        return prior

    def provenance(self) -> dict:
        last = [r for r in self.history if r["stage"] == "final"]
        return {"name": self.config.model_name, "intended_use": self.config.intended_use,
                "dataset": self.data_dir, "training_cases": len(self.train_cases),
                "validation_cases": len(self.val_cases), "skipped_cases": len(self.problems),
                "splits": {part: len(names) for part, names in self.splits.items()},
                "best_validation": dict(self.best),
                "validation_metrics": {r["organ"]: {k: r[k] for k in ("dice", "hd95_paper", "hd95_symmetric")}
                                       for r in last},
                "training_config": self.config.to_dict(),
                "training_seconds": round(getattr(self, "training_seconds", 0.0), 1),
                "device": self.device, "precision": self.precision, "precision_reason": self.precision_reason,
                "precision_probe": self.precision_probe,
                "skipped_steps": self.bad_steps["total"], "world_size": self.world,
                **({"after_training_errors": list(self.report_errors)} if self.report_errors else {}),
                **({"started_from": self.started_from} if getattr(self, "started_from", None) else {})}


def bootstrap_ci(values, resamples: int = 2000, seed: int = 0) -> Optional[Tuple[float, float]]:
    """95 % percentile bootstrap interval of the mean over cases (None for
    fewer than 3 cases: no interval worth printing)."""
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if len(values) < 3:
        return None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def write_model_card(run_dir: Path, provenance: dict, config: "TrainConfig") -> Path:
    """model-card.md for a finished run: what the model is, stage by stage;
    its data and splits; validation and test figures (test: the mean over
    cases with a 95 % bootstrap interval, per organ); intended use;
    precision; limitations. Every figure is this run's."""
    run_dir = Path(run_dir)
    net = config.network
    lines = [f"# Model card: {provenance.get('name', 'FocusNetv2')}", "",
             f"Written by `focusnet train` for the run in `{run_dir}` (bundle `model.pt`).", "",
             "## What it is", "",
             f"FocusNetv2 ({net.organs.key}, {net.organs.num_classes - 1} organs; channel width x{net.width}; "
             f"voxels {tuple(net.preprocess.spacing)} mm (x, y, z), {tuple(net.preprocess.crop_size)} in-plane "
             f"window, ROI {tuple(net.roi_size)} voxels), trained in stages:", ""]
    lines += [f"- `{stage}`: {length} iterations at learning rate {config.rate_of(stage)[0]:g} "
              f"({config.rate_of(stage)[1]})" for stage, length in config.stages if length]
    splits = provenance.get("splits", {})
    lines += ["", "## Data", "",
              f"`{provenance.get('dataset', '?')}`: {provenance.get('training_cases')} training, "
              f"{provenance.get('validation_cases')} validation and {splits.get('test', 0)} test case(s) "
              f"(`splits.json`); {provenance.get('skipped_cases', 0)} training or validation case(s) skipped as "
              "unreadable. "
              "Every choice made after training (presence and SOS-Net thresholds, S-Net's small organs, "
              "post-processing, the best checkpoint) used the validation cases only.", "",
              "## Figures", ""]
    validation = provenance.get("validation_metrics", {})
    if validation:
        dice = [v["dice"] for v in validation.values() if np.isfinite(v.get("dice", float("nan")))]
        lines.append(f"Validation (development: choices were made on these), mean Dice over organs "
                     f"{np.mean(dice):.3f}." if dice else "Validation: no figures.")
    test = provenance.get("test_metrics")
    csv_path = run_dir / "test" / "evaluation.csv"
    if test and csv_path.is_file():
        with open(csv_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        per_case = {}
        for r in rows:
            per_case.setdefault(r["case"], []).append(float(r["dice"]))
        case_means = [float(np.nanmean(v)) for v in per_case.values()]
        ci = bootstrap_ci(case_means)
        lines += ["", f"Test ({test['cases']} case(s) held out of everything, segmented by the finished bundle "
                      f"through `focusnet segment`'s Segmenter): mean Dice {test['mean_dice']:.3f}"
                      + (f" (95 % CI {ci[0]:.3f}-{ci[1]:.3f}, bootstrap over cases)" if ci else "")
                      + f", small organs {test['mean_dice_small']:.3f}.", "",
                  "| organ | Dice | 95% CI | HD95 (paper form), mm |", "|---|---|---|---|"]
        for organ, values in test["organs"].items():
            organ_ci = bootstrap_ci([float(r["dice"]) for r in rows if r["organ"] == organ])
            lines.append(f"| {organ} | {values['dice']:.3f} | "
                         f"{f'{organ_ci[0]:.3f}-{organ_ci[1]:.3f}' if organ_ci else 'n/a'} | "
                         f"{values['hd95_paper']:.1f} |")
        if test.get("skipped"):
            lines += ["", "Test cases that could not be read and are not in these figures: "
                      + "; ".join(test["skipped"])]
    elif splits.get("test"):
        lines += ["", f"Test: the {splits['test']} test case(s) could not be scored (see below); the validation "
                      "figure above is optimistic, as every choice was made on it."]
    else:
        lines += ["", f"Test: no test split (the configuration asked for {config.test_cases} test case(s)): the "
                      "validation figure above is optimistic, as every choice was made on it."]
    lines += ["", "## Intended use", "", provenance.get("intended_use") or config.intended_use or
              "Not stated in the training configuration (`intended_use`).", "",
              "## How it was trained", "",
              "`model.pt` holds the weights at the end of the schedule; `checkpoint-best.pt` those at the best "
              f"validation ({provenance.get('best_validation', {}).get('mean_dice', float('nan')):.3f} mean Dice at "
              f"iteration {provenance.get('best_validation', {}).get('step', '?')}), kept for comparison.", "",
              f"Device {provenance.get('device')}, {provenance.get('world_size', 1)} process(es), precision "
              f"{provenance.get('precision')} ({provenance.get('precision_reason', '')}; per network, measured: "
              f"{provenance.get('precision_probe')}); "
              f"{provenance.get('training_seconds', 0) / 3600:.2f} h of training; "
              f"{provenance.get('skipped_steps', 0)} step(s) skipped as non-finite."]
    if provenance.get("after_training_errors"):
        lines += ["", "Steps after training that failed (the model was written without them): "
                  + "; ".join(provenance["after_training_errors"])]
    lines += ["", "## Limitations", "",
              "- Figures hold for scans like the training data only (scanner, protocol, contouring guideline).",
              "- Organs outside the scanned field of view may be drawn at its edge; check every organ.",
              "- Not a medical device: contours are drafts for a qualified person to review and correct.", ""]
    path = run_dir / "model-card.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path


def evaluate_test_split(bundle: Path, sources, organs, out_dir: Path, device: str = "cpu", log=print) -> dict:
    """Segment the test cases with the finished bundle (the Segmenter that
    ``focusnet segment`` runs, on each case's own CT file and grid) and score
    them against their contours (``focusnet evaluate``): test/evaluation.csv
    and .md in the run folder. Returns {organ: mean metrics} and the means
    over all organs and the small organs."""
    from .evaluate import evaluate_sources, summary
    from .imageio import read_image, write_image
    from .segfile import write_label_table
    from .segment import Segmenter

    from .imageio import ImageReadError

    predictions = Path(out_dir) / "predictions"
    predictions.mkdir(parents=True, exist_ok=True)
    segmenter = Segmenter(bundle, device=device)
    scored, skipped = [], []
    for source in sources:  # an unreadable test case is reported and the others scored
        try:
            result = segmenter.segment(read_image(source.image))
        except (ImageReadError, ValueError, RuntimeError, OSError) as error:
            skipped.append(f"{source.name}: {error}")
            log(f"test case skipped: {source.name}: {error}")
            continue
        write_image(result.labels, predictions / f"{source.name}.nrrd", overwrite=True)
        write_label_table(organs, predictions / f"{source.name}.labels.json", overwrite=True)
        scored.append(source)
    if not scored:
        raise ValueError(f"none of the {len(sources)} test case(s) could be read: {'; '.join(skipped)}")
    sources = scored
    rows, _ = evaluate_sources(predictions, sources, organs.key, out_dir)
    scores = {**summary(rows, organs), "skipped": skipped}
    log(f"test set ({len(sources)} case(s), never used for training or any choice): mean Dice "
        f"{scores.get('mean_dice', float('nan')):.3f}, small organs {scores.get('mean_dice_small', float('nan')):.3f} "
        f"({Path(out_dir) / 'evaluation.md'})")
    return {"cases": len(sources), **scores}


def _as_json(config: TrainConfig) -> dict:
    """The configuration as a checkpoint stores it (tuples as lists)."""
    return json.loads(json.dumps(config.to_dict()))


def _stored_config(state: dict) -> dict:
    """A checkpoint's configuration as this version reads it: a setting added
    since the checkpoint was written takes its default, which is how the
    older code behaved (e.g. ``augment.mirror`` 0), so older runs still
    resume and branch."""
    return _as_json(TrainConfig.from_dict(json.loads(state["config"])))




class IterationLog:
    """history.csv: one row per iteration (global step, stage, iteration in
    the stage, loss, the discriminator's loss where there is one, learning
    rate, seconds waiting for the crop, seconds of the step, wall seconds
    since the run (re)started), written at each checkpoint; a resumed run
    first drops the rows past its checkpoint. TensorBoard event files too
    when tensorboard is installed (focusnet[tensorboard])."""

    FIELDS = ("step", "stage", "iteration", "loss", "d_loss", "lr", "data_s", "step_s", "wall_s")

    def __init__(self, run_dir: Path, done: int, enabled: bool = True):
        self.path = Path(run_dir) / "history.csv"
        self.enabled, self.rows = enabled, []
        self.board = None
        if not enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.is_file():
            with open(self.path, newline="") as handle:
                kept = [r for r in csv.DictReader(handle) if int(r["step"]) <= done]
        with open(self.path.with_suffix(".tmp"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(kept)
        self.path.with_suffix(".tmp").replace(self.path)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=done + 1)
        except ImportError:  # tensorboard is optional
            self.board = None

    def add(self, **row) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        if self.board is not None:
            for key in ("loss", "d_loss", "lr", "data_s", "step_s"):
                if math.isfinite(row[key]):
                    self.board.add_scalar(f"{row['stage']}/{key}", row[key], row["step"])

    def flush(self) -> None:
        if not self.enabled or not self.rows:
            return
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.FIELDS).writerows(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in self.rows)
        self.rows = []
        if self.board is not None:
            self.board.flush()


def _plot_progress(history_csv: Path, validation: List[dict], path: Path) -> None:
    """progress.png: each stage's loss (a running mean) and the learning rate
    by iteration, and the validation mean Dice where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history_csv.is_file():
        return
    with open(history_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    figure, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for stage in dict.fromkeys(r["stage"] for r in rows):
        mine = [r for r in rows if r["stage"] == stage]
        steps = np.array([int(r["step"]) for r in mine])
        loss = np.array([float(r["loss"]) for r in mine])
        window = max(1, len(loss) // 50)
        smooth = np.convolve(np.nan_to_num(loss, nan=np.nanmean(loss) if np.isfinite(loss).any() else 0.0),
                             np.ones(window) / window, mode="same")
        axes[0].plot(steps, smooth, label=stage)
        axes[1].plot(steps, [float(r["lr"]) for r in mine], label=stage)
    axes[0].set_title("training loss (running mean)")
    axes[1].set_title("learning rate")
    axes[1].set_yscale("log")
    val_steps = sorted({r["step"] for r in validation})
    axes[2].plot(val_steps, [np.nanmean([r["dice"] for r in validation if r["step"] == s]) for s in val_steps], "o-")
    axes[2].set_title("validation mean Dice")
    for ax in axes:
        ax.set_xlabel("iteration")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=80)
    plt.close(figure)
    tmp.replace(path)


class _progress:
    """A tqdm bar with the loss and the ETA, or nothing."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="it", dynamic_ncols=True)
        self.smoothed = None

    def update(self, stage: str, loss: float):
        if self.bar is None:
            return
        self.smoothed = loss if self.smoothed is None or not math.isfinite(self.smoothed) else 0.95 * self.smoothed + 0.05 * loss
        self.bar.set_postfix(stage=stage, loss=f"{self.smoothed:.4f}")
        self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def sos_samples(model: FocusNetV2, cases, device: str = "cpu") -> Dict[str, List[Tuple[np.ndarray, np.ndarray]]]:
    """Per small organ, SOS-Net's probability ROI at the organ's true centre
    and the true mask there, on each case (on the model grid) that holds it."""
    from .networks import roi_start

    organs, roi = model.config.organs, model.config.roi_size
    out: Dict[str, List[Tuple[np.ndarray, np.ndarray]]] = {}
    for case in cases:
        volume = torch.as_tensor(case.image, device=device)[None, None]
        features = model.segment(volume, small_organ_branch=False, keep_features=True)["features"]
        truth_array = case.labels
        labels = torch.as_tensor(truth_array)[None, None]
        for k, (name, label) in enumerate(zip(organs.small_names, organs.small_labels)):
            where = np.argwhere(truth_array == label)
            if not len(where):
                continue
            start = roi_start(tuple(int(round(v)) for v in where.mean(axis=0)), roi)
            prob = model.sosnet.heads[k](model.sos_roi(volume, features, start))[0, 0].float().cpu().numpy()
            truth = roi_pool((labels == label).float(), start, roi)[0, 0].numpy() > 0.5
            out.setdefault(name, []).append((prob, truth))
    return out


def branch_and_snet_labels(model: FocusNetV2, cases, device: str = "cpu"):
    """Per case, (labels, true labels) on the model grid from the whole
    FocusNetv2, its branch drawing every small organ whatever
    ``snet_small`` says, and from S-Net alone (postprocess.choose_snet_small's
    input)."""
    branch, snet = [], []
    with model.branch_for_every_small_organ():
        for case in cases:
            volume = torch.as_tensor(case.image, device=device)[None, None]
            truth = case.labels
            for out, alone in ((branch, False), (snet, True)):
                labels = model.segment(volume, small_organ_branch=not alone)["labels"]
                out.append((labels[0].cpu().numpy().astype(np.uint8), truth))
    return branch, snet


def localisation_metrics(heatmaps: torch.Tensor, labels: np.ndarray, small_labels, spacing,
                         threshold: float) -> Dict[int, Dict[str, float]]:
    """SOL-Net's localisation per small organ present in ``labels``:
    ``peak_error_mm``, the distance from its heat map's maximum to the organ's
    centre (mm, ``spacing`` in (z, y, x) order), and ``detected`` (1 when the
    maximum clears the presence threshold, else 0). The heat-map loss does not
    show a SOL-Net whose peaks sit on the wrong organ; this does."""
    out = {}
    for k, label in enumerate(small_labels):
        where = np.argwhere(labels == label)
        if not len(where):
            continue
        heat = heatmaps[k].float()
        peak = np.array(np.unravel_index(int(torch.argmax(heat)), tuple(heat.shape)))
        error = float(np.linalg.norm((peak - where.mean(axis=0)) * np.asarray(spacing, dtype=float)))
        out[label] = {"peak_error_mm": error, "detected": float(float(heat.max()) >= threshold)}
    return out


def _plot_history(history: List[dict], path: Path, small_names):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    steps = sorted({r["step"] for r in history})
    figure, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for ax, metric, title in ((axes[0], "dice", "validation Dice"), (axes[1], "hd95_paper", "validation 95HD (paper form), mm"),
                              (axes[2], "peak_error_mm", "SOL-Net peak to organ centre, mm")):
        organs = sorted({r["organ"] for r in history if metric in r})
        for organ in organs:
            values = [next((r.get(metric, np.nan) for r in history if r["step"] == s and r["organ"] == organ), np.nan)
                      for s in steps]
            ax.plot(steps, values, lw=2.0 if organ in small_names else 0.8, label=organ if organ in small_names else None)
        mean = [np.nanmean([r[metric] for r in history if r["step"] == s and metric in r] or [np.nan]) for s in steps]
        ax.plot(steps, mean, "k--", lw=2.5, label="mean")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    figure.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=90)
    plt.close(figure)
    tmp.replace(path)


def train(config_path, data_dir, run_dir, resume: bool = False, device: str = "auto", progress: bool = True,
          log=print, branch_from=None, from_model=None, from_stage: Optional[str] = None,
          fresh_sos: bool = False, workers: Optional[int] = None, splits=None,
          max_minutes: Optional[float] = None) -> Optional[Path]:
    """``focusnet train``: returns the path of the model bundle it wrote.
    ``branch_from``: another run's checkpoint after its S-Net and SOL-Net
    stages to continue from (see Trainer.branch_from). ``from_model`` and
    ``from_stage``: start at that stage from a model bundle's weights
    (Trainer.start_from_model). ``fresh_sos``: with ``branch_from``, SOS-Net
    starts from new weights."""
    if fresh_sos and branch_from is None:
        raise ValueError("--fresh-sos goes with --branch-from")
    if (from_model is None) != (from_stage is None):
        raise ValueError("--from-model and --from-stage go together")
    if from_model is not None and branch_from is not None:
        raise ValueError("--from-model and --branch-from are two different starts; give one")
    from .bundle import save_bundle

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = load_config(config_path)
    run_dir = Path(run_dir)
    if not resume and (run_dir / "checkpoint.pt").exists():
        raise FileExistsError(f"{run_dir}: already holds a training run; pass --resume to continue it "
                              "or choose another --out")
    trainer = Trainer(config, data_dir, run_dir, device, log, workers=workers, splits=splits)
    if branch_from is not None and not resume:
        trainer.branch_from(branch_from, fresh_sos)
        resume = True
    if from_model is not None and not resume:
        trainer.start_from_model(from_model, from_stage)
        resume = True
    trainer.run(resume=resume, progress=progress, max_minutes=max_minutes)
    if trainer.resumed_finished:
        log(f"{run_dir}: its training had finished; nothing is trained again, only what follows it runs "
            "again: model.pt, the test-set evaluation and model-card.md are written anew")
    if trainer.stopped_early:  # a checkpoint to --resume from; no model yet
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        return None
    bundle = run_dir / "model.pt"
    if trainer.rank == 0:
        aae = trainer.aae if config.adversarial else None

        # Where the organs lie relative to each other in the training contours: inference
        # judges from it which organs a scan cannot hold (fieldofview.py).
        anatomy = trainer._after_training("anatomy prior", trainer.anatomy_prior)

        def save(provenance):
            save_bundle(trainer.model, bundle, provenance, overwrite=True, autoencoder=aae,
                        autoencoder_width=config.autoencoder_width, postprocess=trainer.postprocess_plan,
                        anatomy=anatomy)

        provenance = trainer.provenance()
        save(provenance)
        log(f"wrote {bundle}")
        if trainer.test_sources:  # scored by the finished bundle, as users run it; never seen before
            scores = trainer._after_training("test-set evaluation", lambda: evaluate_test_split(
                bundle, trainer.test_sources, trainer.organs, run_dir / "test", device, log))
            if scores is not None:
                provenance = {**provenance, "test_metrics": scores}
                save(provenance)
            elif trainer.report_errors:
                provenance = trainer.provenance()
                save(provenance)
        trainer._after_training("model card", lambda: log(f"wrote {write_model_card(run_dir, provenance, config)}"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return bundle
