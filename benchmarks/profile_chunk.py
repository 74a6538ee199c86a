"""Where one paper-configuration chunk spends its time and memory: FocusNetv2
(configs/paper.yaml's network: full width, 40 x 240 x 240 voxels, random
weights) run the way `focusnet segment` runs it (BatchNorm folded,
channels-last, "auto" precision), S-Net then SOL-Net on one chunk.

    .venv/bin/python benchmarks/profile_chunk.py [--precision auto|float32|bfloat16] [--top 15]
    .venv/bin/python benchmarks/profile_chunk.py --backend openvino   # what focusnet segment runs on a CPU

PyTorch: prints the time of each top-level block (forward hooks, one
measured chunk after a warm-up), then torch.profiler's operators by self
CPU time and by the memory they allocate. OpenVINO
(FocusNetCore/openvino_backend.py): the chunk's time, the memory its
inference adds to the process (OpenVINO's buffers and outputs), and
OpenVINO's own performance counters by layer type and by layer.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from FocusNetCore import precision as prec  # noqa: E402
from FocusNetCore.networks import FocusNetConfig, FocusNetV2  # noqa: E402


def block_times(model, volume):
    """Seconds per top-level block of S-Net and SOL-Net, in call order."""
    times, starts, handles = {}, {}, []
    blocks = [(f"snet.{name}", module) for name, module in model.snet.named_children()]
    blocks += [(f"solnet.{name}", module) for name, module in model.solnet.named_children()]
    for name, module in blocks:
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: starts.__setitem__(name, time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, a, out, name=name: times.__setitem__(name, times.get(name, 0.0) + time.perf_counter() - starts[name])))
    start = time.perf_counter()
    with torch.inference_mode():
        _, features = model.snet(volume)
        model.solnet(features)
    total = time.perf_counter() - start
    for h in handles:
        h.remove()
    return times, total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--backend", default="torch", choices=("torch", "openvino"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = FocusNetConfig()
    chosen = prec.resolve(args.precision, "cpu")
    model = prec.for_inference(FocusNetV2(config), chosen)
    volume = prec.channels_last(torch.randn(1, 1, config.preprocess.chunk_slices, *config.preprocess.crop_size)
                                .to(prec.dtype_of(chosen)))
    print(f"FocusNetv2, paper configuration ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), "
          f"one {tuple(volume.shape[2:])} chunk, {chosen}, {torch.get_num_threads()} threads")
    if args.backend == "openvino":
        openvino_profile(config, chosen, volume, args.top)
        return
    block_times(model, volume)  # warm-up
    times, total = block_times(model, volume)
    print(f"\nS-Net + SOL-Net: {total:.2f} s")
    for name, seconds in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"  {name:20s} {seconds:6.2f} s  {100 * seconds / total:5.1f} %")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        with torch.inference_mode():
            _, features = model.snet(volume)
            model.solnet(features)
    averages = prof.key_averages()
    print(f"\nOperators by self CPU time (top {args.top}):")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.top))
    print(f"Operators by memory they allocate (top {args.top}):")
    print(averages.table(sort_by="self_cpu_memory_usage", row_limit=args.top))


def openvino_profile(config, precision, volume, top):
    import collections

    import numpy as np
    import openvino as ov

    from FocusNetCore.openvino_backend import PRECISION_HINTS, load_or_convert

    def resident_gb():
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2 ** 30

    torch.manual_seed(0)
    model = prec.for_inference(FocusNetV2(config), "float32")
    network, source = load_or_convert(model.snet, model.solnet, "profile-chunk-random-seed-0", config.to_dict())
    network.reshape({network.inputs[0]: list(volume.shape)})
    compiled = ov.Core().compile_model(network, "CPU", {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
                                                        "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
    request = compiled.create_infer_request()
    array = np.ascontiguousarray(volume.float().numpy())
    before = resident_gb()
    request.infer({0: array}, share_outputs=True)  # warm-up; allocates OpenVINO's buffers
    added = resident_gb() - before
    start = time.perf_counter()
    request.infer({0: array}, share_outputs=True)
    total = time.perf_counter() - start
    print(f"\nOpenVINO {ov.__version__} (model {source}): S-Net + SOL-Net {total:.2f} s; "
          f"its buffers and outputs add {added:.2f} GB to the process")
    by_type, layers = collections.Counter(), []
    for info in request.profiling_info:
        seconds = info.real_time.total_seconds()
        by_type[f"{info.node_type} ({info.exec_type})"] += seconds
        layers.append((seconds, info.node_name, info.node_type))
    counted = sum(by_type.values())
    print("\nBy layer type:")
    for name, seconds in by_type.most_common(top):
        print(f"  {name:45s} {seconds:6.2f} s  {100 * seconds / counted:5.1f} %")
    print(f"\nLayers (top {top}):")
    for seconds, name, kind in sorted(layers, reverse=True)[:top]:
        print(f"  {name[:80]:80s} {kind:12s} {seconds:6.2f} s  {100 * seconds / counted:5.1f} %")


if __name__ == "__main__":
    main()
