"""Numeric precision and memory layout for training and inference.

"auto" computes in bfloat16 where the hardware does so natively — CUDA GPUs,
and CPUs with AMX or AVX512-BF16 (Intel Sapphire Rapids and later, AMD Zen 4
and later) through oneDNN — and in float32 elsewhere, where bfloat16 would be
emulated and slower. The 3-D convolutions also run channels-last (NDHWC),
which oneDNN and cuDNN prefer at inference. Training uses bfloat16 autocast
(weights and optimiser stay float32), channels-last on CUDA but not on the
CPU (:func:`training_layout`). Inference (:func:`for_inference`) folds each
BatchNorm into the convolution before it (exact in eval mode) and, in
bfloat16, converts the weights once instead of casting them in every call.
Measured on this project's 2-core CI CPU (AMX), one paper-configuration
40-slice chunk through S-Net: 12.7 s float32 -> 9.9 s channels-last -> 4.6 s
bfloat16 autocast; a phantom-cpu training step 2.0 s -> 0.64 s; the whole
network on a chunk 6.2 s autocast -> 5.5 s with BatchNorm folded -> 5.0 s in
bfloat16 weights (benchmarks/speed.py prints whole-CT figures). Losses,
soft-max probabilities and metrics stay float32.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from torch import nn

PRECISIONS = ("auto", "float32", "bfloat16")
# Training may also run in float16 with loss scaling (a GradScaler): what a
# GPU without native bfloat16 (V100, T4, TITAN Xp, ...) computes fast.
TRAINING_PRECISIONS = PRECISIONS + ("float16",)


def cpu_has_native_bf16() -> bool:
    """True where oneDNN has bfloat16 instructions (AMX tiles or AVX512-BF16)."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:
        return False


def cuda_has_native_bf16(device: str = "cuda") -> bool:
    """Whether the GPU computes bfloat16 itself (compute capability 8.0 and
    later), not by emulation."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # an older torch without the argument
        return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve(precision: str, device: str) -> str:
    """The inference precision "auto" means on ``device`` ("cpu", "cuda",
    "cuda:1"): bfloat16 where the hardware has it, else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bfloat16" if cuda_has_native_bf16(device) else "float32"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def choose_for_training(precision: str, device: str) -> tuple:
    """(precision, why) for training on ``device``: "auto" is bfloat16 where
    the hardware computes it natively, else on a GPU float16 with loss
    scaling where it has float16 tensor cores (compute capability 7.0 and
    later), else float32. The reason goes into the log and the bundle."""
    if precision not in TRAINING_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(TRAINING_PRECISIONS)}")
    if precision != "auto":
        return precision, "set in the training configuration"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        if cuda_has_native_bf16(device):
            return "bfloat16", f"{name} (compute capability {major}.{minor}) computes bfloat16 natively"
        if (major, minor) >= (7, 0):
            return "float16", (f"{name} (compute capability {major}.{minor}) has no native bfloat16: float16 "
                               "with loss scaling")
        return "float32", f"{name} (compute capability {major}.{minor}) has neither bfloat16 nor float16 tensor cores"
    if cpu_has_native_bf16():
        return "bfloat16", "this CPU has AMX or AVX512-BF16"
    return "float32", "this CPU has no native bfloat16 (AMX or AVX512-BF16)"


def autocast(precision: str, device: str):
    """The autocast context for a resolved precision (a no-op for float32)."""
    if precision not in ("bfloat16", "float16"):
        return nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=getattr(torch, precision))


def channels_last(x):
    """A module or a 5-D tensor in channels-last-3d layout (values unchanged)."""
    if isinstance(x, torch.Tensor) and x.dim() != 5:
        return x
    return x.to(memory_format=torch.channels_last_3d)


def training_layout(module: nn.Module, device: str) -> nn.Module:
    """``module`` in the memory layout training uses on ``device``:
    channels-last-3d on CUDA (cuDNN's preferred layout), the default
    contiguous one on the CPU, where BatchNorm's backward pass on
    channels-last-3d tensors takes a slow path. Measured on the project's
    2-core CPU (AMX, bfloat16 autocast), one phantom-cpu S-Net training step
    of 24 x 120 x 120 voxels: 0.77 s channels-last, 0.57 s contiguous
    (BatchNorm backward was 41 % of the channels-last step)."""
    if str(device).startswith("cuda"):
        return channels_last(module)
    return module.to(memory_format=torch.contiguous_format)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm that follows a
    convolution inside an ``nn.Sequential`` folded into that convolution's
    weights and bias (PyTorch's fuse_conv_bn_eval; the same function in eval
    mode). Other BatchNorms are left as they are."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            if isinstance(module[i], convs) and isinstance(module[i + 1], norms):
                module[i] = fuse_conv_bn_eval(module[i], module[i + 1])
                module[i + 1] = nn.Identity()
    return model


def dtype_of(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


def for_inference(model: nn.Module, precision: str) -> nn.Module:
    """The model as inference runs it: BatchNorm folded, channels-last, its
    weights in the resolved ``precision`` (feed it inputs of that dtype)."""
    return channels_last(fold_batchnorm(model).to(dtype_of(precision)))


# --------------------------------------------------------------------------
# Deciding bfloat16 by measurement
# --------------------------------------------------------------------------
# CPU flags alone do not say whether bfloat16 is right: on an AMD Zen 4
# (AVX512-BF16, no AMX) oneDNN's bfloat16 backward of a stride-2 5x5x5
# convolution on a 4-slice input (the shape autoencoder at phantom-cpu's ROI)
# gave NaN weight gradients after one step, where float32 was clean. So each
# network is run once in both precisions on a fixed input before use; a
# non-finite or off-tolerance result keeps that network in float32.
# Relative L2 difference allowed between bfloat16 and float32 outputs, and
# between their weight gradients (gradients of bfloat16 autocast differ more).
BF16_OUTPUT_TOLERANCE = 0.1
BF16_GRADIENT_TOLERANCE = 0.3


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float(torch.linalg.vector_norm(a - b) / (torch.linalg.vector_norm(b) + 1e-12))


def output_problem(got: torch.Tensor, expected: torch.Tensor, what: str) -> str:
    """"" when a bfloat16 output is finite and within BF16_OUTPUT_TOLERANCE of float32's, else why not."""
    if not torch.isfinite(got).all():
        return f"{what} is not finite in bfloat16"
    difference = relative_difference(got, expected)
    if difference > BF16_OUTPUT_TOLERANCE:
        return f"{what} differs from float32 by {difference:.3f} (tolerance {BF16_OUTPUT_TOLERANCE})"
    return ""


def _run_once(module: nn.Module, inputs, device: str, bf16: bool, backward: bool):
    context = torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16) if bf16 \
        else nullcontext()
    with context:
        outputs = [t for t in _tensors(module(*inputs)) if t.is_floating_point()]
    gradients = {}
    if backward:
        sum(t.float().square().mean() for t in outputs).backward()
        gradients = {n: p.grad.detach().float() for n, p in module.named_parameters() if p.grad is not None}
    return [t.detach().float() for t in outputs], gradients


def probe_bfloat16(module: nn.Module, inputs, device: str, backward: bool = False) -> str:
    """"" when ``module`` computes in bfloat16 (autocast) close to float32 on
    ``inputs``; else the reason it does not (non-finite or off tolerance).
    Runs on copies, in the module's current train/eval mode, so its weights and
    BatchNorm statistics are untouched."""
    runs = []
    for bf16 in (False, True):
        copy_ = copy.deepcopy(module).float()
        runs.append(_run_once(copy_, [x.float() if x.is_floating_point() else x for x in inputs], device, bf16,
                              backward))
    (ref_out, ref_grad), (out, grad) = runs
    for k, (a, b) in enumerate(zip(out, ref_out)):
        problem = output_problem(a, b, f"output {k}")
        if problem:
            return problem
    for name, g in grad.items():
        if not torch.isfinite(g).all():
            return f"the gradient of {name} is not finite in bfloat16"
    names = [n for n in grad if n in ref_grad]
    if names:
        # Over all weights at once: a tensor whose float32 gradient is almost
        # zero (a squeeze-excitation gate) has a meaningless relative error.
        difference = relative_difference(torch.cat([grad[n].flatten() for n in names]),
                                         torch.cat([ref_grad[n].flatten() for n in names]))
        if difference > BF16_GRADIENT_TOLERANCE:
            return f"the gradients differ from float32 by {difference:.3f} (tolerance {BF16_GRADIENT_TOLERANCE})"
    return ""
