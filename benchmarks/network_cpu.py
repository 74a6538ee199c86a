"""Parameter count of the paper configuration and model-only CPU time of one
40 x 240 x 240 chunk (median of 3), FocusNetv2 forward in eval mode.

    .venv/bin/python benchmarks/network_cpu.py [--repeats 3] [--threads N]
"""
import argparse
import statistics
import time

import torch

from FocusNetCore.networks import FocusNetConfig, FocusNetV2, ShapeAutoencoder


def count(module):
    return sum(p.numel() for p in module.parameters())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = FocusNetConfig()
    model = FocusNetV2(config).eval()
    aae = ShapeAutoencoder(config.roi_size)
    print(f"parameters: S-Net {count(model.snet):,}, SOL-Net {count(model.solnet):,}, "
          f"SOS-Net {count(model.sosnet):,} ({len(model.sosnet.heads)} heads), total {count(model):,}; "
          f"shape autoencoder (training only) {count(aae):,}")
    chunk = torch.randn(1, 1, 40, 240, 240)
    times = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            start = time.perf_counter()
            model.segment(chunk)
            times.append(time.perf_counter() - start)
    print(f"one 40 x 240 x 240 chunk on CPU ({torch.get_num_threads()} threads): "
          f"median {statistics.median(times):.1f} s over {args.repeats} runs {[round(t, 1) for t in times]}")


if __name__ == "__main__":
    main()
