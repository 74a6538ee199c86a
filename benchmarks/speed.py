"""End-to-end and model-only speed and peak memory of FocusNetv2 (paper
configuration, random weights) beside two peers on the same input and the
same chunking: MONAI DynUNet configured like nnU-Net's 3d_fullres plan for
this spacing (the network TotalSegmentator runs) and MONAI SegResNet.

    .venv/bin/pip install -e '.[bench]'      # MONAI, for the peers
    .venv/bin/python benchmarks/speed.py [--slices 120] [--models focusnet,dynunet,segresnet]

    .venv/bin/python benchmarks/speed.py --precision float32   # the float32 baseline

Every model runs as ``focusnet segment`` runs FocusNetv2
(FocusNetCore/precision.py, for_inference): BatchNorm folded into the
convolutions where a model has it, channels-last-3d, and "auto" precision =
bfloat16 weights on CUDA and on CPUs with native bfloat16 (AMX /
AVX512-BF16), float32 elsewhere; the line of each model says which it got.
FocusNetv2 runs S-Net and SOL-Net through OpenVINO on the CPU, as
``focusnet segment --backend auto`` does (``--backend torch``: PyTorch);
the peers run in PyTorch, as nnU-Net, TotalSegmentator and MONAI run them.
The OpenVINO conversion (cached after the first run) is not timed.

Input: a synthetic 512 x 512 x 120 CT at 0.98 x 0.98 x 3 mm. Random
weights give speckled label maps, whose resampling back to the CT grid is
far slower than that of real, compact organs; so each model's end-to-end time
is also given "with compact organs": the same preprocessing and network,
and the back-resampling timed on 22 organ-sized ellipsoids instead of its
own speckle (the fair comparison of trained models). End to end =
preprocess (orientation, resampling to 1 x 1 x 3 mm, head crop 240 x 240) +
40-slice chunks through the network + labels back to the CT's grid. Each
model runs in its own process so its peak resident memory is its own.
On a CUDA machine a GPU section times the same on the GPU.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np


def build(name, classes=23):

    if name == "focusnet":
        from FocusNetCore.networks import FocusNetConfig, FocusNetV2

        return FocusNetV2(FocusNetConfig())
    from monai.networks.nets import DynUNet, SegResNet

    if name == "dynunet":
        # nnU-Net 3d_fullres for 1 x 1 x 3 mm: in-plane-only convolutions and
        # pooling until the voxels are about isotropic, 32 -> 320 filters.
        kernels = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
        strides = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
        return DynUNet(3, 1, classes, kernels, strides, strides[1:], filters=[32, 64, 128, 256, 320, 320],
                       norm_name="instance", deep_supervision=False, res_block=False)
    if name == "segresnet":
        return SegResNet(spatial_dims=3, in_channels=1, out_channels=classes, init_filters=16)
    raise ValueError(name)


def run_one(name, slices, repeats, device, precision, backend="auto"):
    """Runs in a child process; prints one JSON line."""
    import SimpleITK as sitk
    import torch
    import torch.nn.functional as F

    from FocusNetCore import precision as policy
    from FocusNetCore.preprocess import PreprocessConfig, labels_to_original, preprocess

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ct = sitk.GetImageFromArray((rng.normal(0, 20, (slices, 512, 512)) - 50).astype(np.int16))
    # a head-sized body so the head finder has something to find
    arr = sitk.GetArrayViewFromImage(ct)
    yy, xx = np.mgrid[:512, :512]
    outside = ((yy - 256) / 100.0) ** 2 + ((xx - 256) / 80.0) ** 2 > 1
    ct = sitk.GetImageFromArray(np.where(outside[None], -1000, arr).astype(np.int16))
    ct.SetSpacing((0.98, 0.98, 3.0))
    precision = policy.resolve(precision, device)
    model = build(name).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    loaded = model
    model = policy.for_inference(model, precision)  # what focusnet segment runs: BN folded, channels-last, dtype
    dtype = policy.dtype_of(precision)
    convert_s, source = None, None
    if name == "focusnet":
        from FocusNetCore import openvino_backend

        backend = openvino_backend.resolve(backend, device)
        if backend == "openvino":  # as Segmenter sets it up; converted once, then read from the cache
            t = time.perf_counter()
            model.chunk_forward, _ = openvino_backend.for_model(loaded, "speed-benchmark-random-seed-0", precision)
            convert_s, source = time.perf_counter() - t, model.chunk_forward.source
    else:
        backend = "torch"
    del loaded
    config = PreprocessConfig()

    def forward(volume):
        if name == "focusnet":
            return model.segment(volume, keep_heatmaps=False)["labels"]  # as Segmenter runs it
        outs = []
        for start in range(0, volume.shape[2], config.chunk_slices):
            piece = volume[:, :, start:start + config.chunk_slices]
            keep = piece.shape[2]
            pad = [0, (-piece.shape[4]) % 32, 0, (-piece.shape[3]) % 32, 0, config.chunk_slices - keep]
            out = model(F.pad(piece, pad, value=float(volume.min())))
            outs.append(out[:, :, :keep, :volume.shape[3], :volume.shape[4]].argmax(1))
        return torch.cat(outs, dim=1)

    def compact_organs(shape):
        """22 ellipsoids of organ sizes on the model grid: what a trained
        network returns, unlike the speckle of random weights."""
        out = np.zeros(shape, np.uint8)
        zz, yy, xx = np.ogrid[:shape[0], :shape[1], :shape[2]]
        for k in range(1, 23):
            angle = 2 * np.pi * k / 22
            c = (shape[0] * (0.3 + 0.4 * (k % 3) / 2), shape[1] / 2 + 60 * np.sin(angle), shape[2] / 2 + 60 * np.cos(angle))
            r = (2 + k % 4, 4 + k % 9, 4 + k % 7)
            out[((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1] = k
        return out

    end_to_end, model_only, compact = [], [], []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            pre = preprocess(ct, config)
            volume = policy.channels_last(torch.as_tensor(pre.image, device=device, dtype=dtype)[None, None])
            if device == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            labels = forward(volume)
            if device == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            labels_to_original(labels[0].cpu().numpy().astype(np.uint8), pre.grid, ct)
            t3 = time.perf_counter()
            organs = compact_organs(pre.grid.shape)
            t4 = time.perf_counter()
            labels_to_original(organs, pre.grid, ct)
            t5 = time.perf_counter()
            end_to_end.append(t3 - t0)
            model_only.append(t2 - t1)
            compact.append(t2 - t0 + t5 - t4)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    gpu_mb = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None
    print(json.dumps({"model": name, "params": params, "end_to_end_s": statistics.median(end_to_end),
                      "end_to_end_compact_s": statistics.median(compact),
                      "model_only_s": statistics.median(model_only), "peak_rss_mb": peak_mb, "gpu_peak_mb": gpu_mb,
                      "device": device, "precision": precision, "threads": torch.get_num_threads(),
                      "backend": backend, "openvino_setup_s": convert_s, "openvino_model": source}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--models", default="focusnet,dynunet,segresnet")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "openvino"),
                        help="FocusNetv2's (as focusnet segment --backend); the peers run in PyTorch")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.slices, args.repeats, args.device, args.precision, args.backend)
        return
    devices = [args.device]
    try:
        import torch

        if args.device == "cpu" and torch.cuda.is_available():
            devices.append("cuda")
    except ImportError:
        pass
    for device in devices:
        results = {}
        for name in args.models.split(","):
            out = subprocess.run([sys.executable, __file__, "--one", name, "--slices", str(args.slices),
                                  "--repeats", str(args.repeats), "--device", device, "--precision", args.precision,
                                  "--backend", args.backend],
                                 capture_output=True, text=True, env=os.environ)
            if out.returncode != 0:
                print(f"{name} on {device}: failed\n{out.stderr[-2000:]}")
                continue
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[name]
            print(f"{device} {r['precision']:8s} {r['backend']:8s} {name:10s} params {r['params']:>11,}  end-to-end {r['end_to_end_s']:7.1f} s "
                  f"(with compact organs {r['end_to_end_compact_s']:6.1f} s)  "
                  f"model-only {r['model_only_s']:7.1f} s  peak RSS {r['peak_rss_mb'] / 1024:5.2f} GB"
                  + (f"  GPU peak {r['gpu_peak_mb'] / 1024:5.2f} GB" if r["gpu_peak_mb"] else "")
                  + (f"  (OpenVINO model {r['openvino_model']} in {r['openvino_setup_s']:.1f} s, not timed above)"
                     if r["openvino_model"] else ""), flush=True)
        if "focusnet" in results:
            base = results["focusnet"]
            for name, r in results.items():
                if name != "focusnet":
                    print(f"{device} ratio FocusNetv2 / {name}: end-to-end {base['end_to_end_s'] / r['end_to_end_s']:.2f} "
                          f"(with compact organs {base['end_to_end_compact_s'] / r['end_to_end_compact_s']:.2f}), "
                          f"model-only {base['model_only_s'] / r['model_only_s']:.2f}, "
                          f"peak memory {base['peak_rss_mb'] / r['peak_rss_mb']:.2f}")
            print(f"{device} FocusNetv2 end to end: {base['end_to_end_s']:.1f} s, with compact organs "
                  f"{base['end_to_end_compact_s']:.1f} s (target <= 30 s on 2 CPU cores); "
                  f"peak memory {base['peak_rss_mb'] / 1024:.2f} GB (target <= 6 GB)")


if __name__ == "__main__":
    main()
