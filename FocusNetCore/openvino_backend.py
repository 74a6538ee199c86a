"""S-Net and SOL-Net's chunk forward on the CPU through OpenVINO (issue 23).

The whole-volume pass (:meth:`FocusNetV2.segment`) spends nearly all its time
in S-Net and SOL-Net on 40-slice chunks, 77 % of it in 3-D convolutions
(``benchmarks/profile_chunk.py``). OpenVINO's CPU plugin runs the same graph,
exported from the very weights PyTorch holds, with fused convolution,
activation, squeeze-excitation and residual kernels and its own memory
planning: measured on this project's 2-core AMD CPU in float32
(``benchmarks/profile_chunk.py``), one 40 x 240 x 240 paper-configuration
chunk 23.3 s (PyTorch, BatchNorm folded, channels-last) -> 16.8 s, outputs
equal within 3e-7; a whole 120-slice CT's network 77.0 s -> 58.7 s
(``benchmarks/speed.py``).

    torch module (float32, BatchNorm folded)
        --torch.jit.trace on a small input--> OpenVINO model (dynamic D, H, W)
        --reshape to the chunk's shape--> compiled for the CPU
        (cached as IR per weights, network settings and versions)

SOS-Net stays in PyTorch: its ROIs are small, and the worker's click-to-find
calls it one organ at a time.

Conversion (the trace and OpenVINO's PyTorch front end) costs 3-4 s on 2
cores, so the converted model is kept as OpenVINO IR in a cache folder
(``FOCUSNET_CACHE_DIR``, else ``$XDG_CACHE_HOME/focusnet``, else
``~/.cache/focusnet``), keyed by the weights' checksum, the network
configuration and the OpenVINO, PyTorch and FocusNet versions; reading it
back takes milliseconds. An unreadable cache entry is converted again; a
cache folder that cannot be written only costs the conversion.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .networks import S_NET_MULTIPLE

BACKENDS = ("auto", "torch", "openvino")
# Traced at this size (a multiple of S-Net's (2, 4, 4), so the trace holds no
# padding; any chunk shape is set by reshape before compiling).
TRACE_SHAPE = (1, 1, 8, 32, 32)
# Raised whenever _Chunk's graph changes, so older cache entries are not read.
GRAPH_VERSION = 2
# The precision policy's names -> OpenVINO's inference precision hint. Set
# explicitly: on CPUs with AMX or AVX512-BF16 OpenVINO's default is bf16.
PRECISION_HINTS = {"float32": "f32", "bfloat16": "bf16"}


class BackendError(ValueError):
    pass


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(backend: str, device: str) -> str:
    """"auto" -> "openvino" on the CPU where OpenVINO is installed, else
    "torch"; "openvino" on a GPU or without the package is refused."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "openvino" if device == "cpu" and available() else "torch"
    if backend == "openvino":
        if device != "cpu":
            raise BackendError(f"the openvino backend runs on the CPU only (device {device!r} was asked for); "
                               "use --backend torch or auto on a GPU")
        if not available():
            raise BackendError("the openvino backend was asked for, but the openvino package is not installed "
                               "(pip install openvino), or use --backend torch")
    return backend


def cache_dir() -> Path:
    if os.environ.get("FOCUSNET_CACHE_DIR"):
        return Path(os.environ["FOCUSNET_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "focusnet"


class _OverConcatenation(nn.Module):
    """An SEResBlock applied to torch.cat([a, b], dim=1), without the
    concatenation: a convolution over concatenated channels is the sum of
    convolutions over each part (its weight split along the input channels),
    for the block's first 3x3x3 convolution and its 1x1x1 shortcut alike.
    Exact up to float32 summation order; what it saves is the concatenated
    tensor (368 channels at half resolution before S-Net's dec2 in the paper
    configuration, 0.85 GB per chunk), which OpenVINO otherwise
    materialises beside its parts: 0.5 GB less peak memory per chunk."""

    def __init__(self, block: nn.Module, first: int):
        super().__init__()
        self.body_a, self.body_b = _split_conv(block.body[0], first)
        self.body_rest = nn.Sequential(*list(block.body)[1:])
        self.shortcut_a, self.shortcut_b = _split_conv(block.shortcut[0], first)
        self.shortcut_rest = nn.Sequential(*list(block.shortcut)[1:])
        self.act = block.act

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        body = self.body_rest(self.body_a(a) + self.body_b(b))
        return self.act(body + self.shortcut_rest(self.shortcut_a(a) + self.shortcut_b(b)))


def _split_conv(conv: nn.Conv3d, first: int) -> Tuple[nn.Conv3d, nn.Conv3d]:
    """``conv`` over [first channels, the rest] as two convolutions (the bias on the first)."""
    parts = []
    for lo, hi, bias in ((0, first, conv.bias is not None), (first, conv.in_channels, False)):
        part = nn.Conv3d(hi - lo, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                         dilation=conv.dilation, bias=bias)
        part.weight.data = conv.weight.data[:, lo:hi].clone()
        if bias:
            part.bias.data = conv.bias.data.clone()
        parts.append(part)
    return parts[0], parts[1]


class _Chunk(nn.Module):
    """What the whole-volume pass runs per chunk: (1, 1, D, H, W) ->
    logits (1, K+1, D, H, W), features (1, c32, D, H, W), heat maps (1, S, D, H, W).
    S-Net's forward (networks.SNet.forward) with its two decoder blocks taking
    their skip concatenations as parts; at TRACE_SHAPE (a multiple of
    S_NET_MULTIPLE) S-Net pads nothing. The tests compare the result with
    PyTorch's S-Net and SOL-Net."""

    def __init__(self, snet: nn.Module, solnet: nn.Module):
        super().__init__()
        self.snet, self.solnet = snet, solnet
        self.dec2 = _OverConcatenation(snet.dec2, snet.aspp.out_channels)
        self.dec1 = _OverConcatenation(snet.dec1, snet.dec2.body[0].out_channels)

    def forward(self, ct: torch.Tensor):
        n = self.snet
        s1 = n.enc1(n.stem(ct))                                      # (B, 32, D, H, W)
        s2 = n.enc2(n.pool1(s1))                                     # (B, 48, D, H/2, W/2)
        deep = n.aspp(n.dilated(n.enc3(n.pool2(s2))))                # (B, 320, D/2, H/4, W/4)
        up = F.interpolate(deep, size=s2.shape[-3:], mode="trilinear", align_corners=False)
        d2 = self.dec2(up, s2)                                       # (B, 48, D, H/2, W/2)
        up = F.interpolate(d2, size=s1.shape[-3:], mode="trilinear", align_corners=False)
        features = self.dec1(up, s1)                                 # (B, 32, D, H, W)
        return n.head(features), features, self.solnet(features)


def _key(checksum: str, config: dict) -> str:
    import openvino

    text = json.dumps({"checksum": checksum, "config": config, "openvino": openvino.__version__,
                       "torch": torch.__version__, "focusnet": __version__, "trace": TRACE_SHAPE, "graph": GRAPH_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _convert(snet: nn.Module, solnet: nn.Module):
    """The chunk forward as an OpenVINO model with dynamic D, H, W (float32)."""
    import openvino as ov

    module = _Chunk(snet, solnet).eval()
    if any(p.dtype != torch.float32 for p in module.parameters()):
        raise BackendError("the chunk forward is converted from float32 weights (the precision is set when "
                           "compiling)")
    example = torch.zeros(TRACE_SHAPE)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes read as numbers
        # Traced here without the trace's own re-run check (half the
        # conversion time); the outputs are compared with PyTorch's in the tests.
        traced = torch.jit.trace(module, (example,), check_trace=False)
        return ov.convert_model(traced, input=[ov.PartialShape([1, 1, -1, -1, -1])])


def load_or_convert(snet: nn.Module, solnet: nn.Module, checksum: str, config: dict,
                    folder: Optional[Path] = None) -> Tuple[object, str]:
    """(OpenVINO model, where it came from: "cache" or "converted")."""
    import openvino as ov

    folder = Path(folder) if folder is not None else cache_dir()
    entry = folder / "openvino" / _key(checksum, config)
    xml = entry / "chunk.xml"
    if xml.is_file():
        try:
            return ov.Core().read_model(str(xml)), "cache"
        except Exception as error:  # damaged by hand or by a crash: convert again
            print(f"focusnet: the OpenVINO cache entry {entry} is unreadable ({type(error).__name__}); "
                  "converting again", file=sys.stderr, flush=True)
            shutil.rmtree(entry, ignore_errors=True)
    model = _convert(snet, solnet)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        ov.save_model(model, str(tmp / "chunk.xml"), compress_to_fp16=False)
        try:
            os.replace(tmp, entry)  # whole entry at once; another process may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as error:
        print(f"focusnet: could not cache the OpenVINO model in {folder} ({error}); it is converted again "
              "next time", file=sys.stderr, flush=True)
    return model, "converted"


class OpenVINOChunks:
    """Callable like S-Net then SOL-Net on one chunk: (1, 1, D, H, W) tensor
    -> (logits, features, heat maps), float32 CPU tensors. One compiled model
    per chunk shape (the whole-volume pass uses one).

    The tensors returned are OpenVINO's own output buffers (no 0.5 GB copy
    per paper-configuration chunk): they hold until the next call with the
    same shape, so a caller copies what it keeps, as the whole-volume pass
    does into its whole-volume tensors."""

    def __init__(self, snet: nn.Module, solnet: nn.Module, checksum: str, config: dict, precision: str,
                 threads: Optional[int] = None, folder: Optional[Path] = None):
        import openvino as ov

        if precision not in PRECISION_HINTS:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_HINTS)}, got {precision!r}")
        self.model, self.source = load_or_convert(snet, solnet, checksum, config, folder)
        self.core = ov.Core()
        self.settings = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
                         "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
        self.precision = precision
        self.compiled: Dict[tuple, object] = {}
        self.snet, self.solnet = snet, solnet  # for a chunk shape S-Net would pad (never in the whole-volume pass)

    def check_bfloat16(self) -> str:
        """"" when OpenVINO's bfloat16 (the hint set for "bfloat16") gives
        S-Net logits close to PyTorch's float32 on a fixed input, else why
        not; then this object computes in float32 from here on. The same
        measurement as the PyTorch path's (precision.output_problem): CPU
        flags alone do not say whether bfloat16 is right."""
        if self.precision != "bfloat16":
            return ""
        from .precision import output_problem

        generator = torch.Generator().manual_seed(0)
        volume = torch.randn(TRACE_SHAPE, generator=generator)
        with torch.inference_mode():
            expected = self.snet(volume)[0]
        problem = output_problem(self(volume)[0], expected, "OpenVINO's S-Net output")
        if problem:
            self.precision = "float32"
            self.settings["INFERENCE_PRECISION_HINT"] = PRECISION_HINTS["float32"]
            self.compiled.clear()
        return problem

    def _request_for(self, shape: tuple):
        if shape not in self.compiled:
            model = self.model.clone()
            model.reshape({model.inputs[0]: list(shape)})
            self.compiled[shape] = self.core.compile_model(model, "CPU", self.settings).create_infer_request()
        return self.compiled[shape]

    def __call__(self, piece: torch.Tensor):
        if any(n % m for n, m in zip(piece.shape[-3:], S_NET_MULTIPLE)):
            with torch.inference_mode():
                logits, features = self.snet(piece.float())
                return logits, features, self.solnet(features)
        request = self._request_for(tuple(piece.shape))
        array = np.ascontiguousarray(piece.detach().float().cpu().numpy())  # (1, 1, D, H, W)
        out = request.infer({0: array}, share_outputs=True)
        return tuple(torch.from_numpy(out[k]) for k in range(3))


def for_model(model: nn.Module, checksum: str, precision: str) -> Tuple["OpenVINOChunks", str]:
    """OpenVINO's chunk forward for ``model`` (float32 weights, as loaded),
    computing in ``precision`` and checked in bfloat16 (see
    :meth:`OpenVINOChunks.check_bfloat16`): (chunks, the problem found or "")."""
    from .precision import for_inference

    reference = for_inference(model, "float32")  # BatchNorm folded, as inference runs it
    chunks = OpenVINOChunks(reference.snet, reference.solnet, checksum, model.config.to_dict(), precision)
    return chunks, chunks.check_bfloat16()
