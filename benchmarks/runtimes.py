"""Which runtime should run S-Net and SOL-Net on a CPU (issue 23): one
paper-configuration chunk (configs/paper.yaml's network, full width, 40 x 240
x 240 voxels, random weights, BatchNorm folded, float32) through each
candidate in the same run, each against PyTorch eager measured here too:

- PyTorch eager (channels-last), what `--backend torch` runs;
- torch.compile (Inductor, default mode; needs a C++ compiler);
- ONNX Runtime (CPU execution provider, the graph exported by torch.onnx);
- OpenVINO (FocusNetCore/openvino_backend.py), what `--backend auto` runs.

Each runtime runs in a process of its own. Per runtime: the one-off cost
(compile / export / conversion), the median of --repeats timed chunks after
a warm-up, the ratio to eager, the process's peak resident memory, and the
largest difference of its outputs from eager's (relative to eager's largest
magnitude). Runtimes not
installed are reported as such (ONNX Runtime comes with the bench extra:
pip install -e '.[bench]').

    .venv/bin/python benchmarks/runtimes.py [--repeats 3] [--only eager,compile,onnxruntime,openvino]
    .venv/bin/python benchmarks/runtimes.py --slices 8 --size 64   # a quick look
"""
import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from FocusNetCore import precision as prec  # noqa: E402
from FocusNetCore.networks import FocusNetConfig, FocusNetV2  # noqa: E402
from FocusNetCore.openvino_backend import OpenVINOChunks, _Chunk  # noqa: E402

RUNTIMES = ("eager", "compile", "onnxruntime", "openvino")


def as_arrays(outputs):
    return [np.asarray(o.detach().float().numpy() if isinstance(o, torch.Tensor) else o, dtype=np.float32)
            for o in outputs]


def prepare(name, model, volume, folder):
    """(callable taking the input array and returning the three outputs, setup seconds)."""
    start = time.perf_counter()
    chunk = _Chunk(model.snet, model.solnet).eval()
    if name in ("eager", "compile"):
        forward = chunk if name == "eager" else torch.compile(chunk)

        def run(array):
            with torch.inference_mode():
                return forward(torch.from_numpy(array).contiguous(memory_format=torch.channels_last_3d))
    elif name == "onnxruntime":
        import onnxruntime as ort

        path = Path(folder) / "chunk.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(chunk, (torch.from_numpy(volume),), str(path), input_names=["ct"],
                              output_names=["logits", "features", "heatmaps"], opset_version=17, dynamo=False)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run(array):
            return session.run(None, {"ct": array})
    elif name == "openvino":  # what focusnet segment runs, converted afresh (an empty cache folder)
        chunks = OpenVINOChunks(model.snet, model.solnet, "runtimes-benchmark-random-seed-0", model.config.to_dict(),
                                "float32", folder=Path(folder) / "openvino")

        def run(array):
            return chunks(torch.from_numpy(array))
    else:
        raise ValueError(name)
    if name != "eager":
        run(volume)  # compilation (torch.compile, OpenVINO) happens on the first call
    return run, time.perf_counter() - start


def measure(name, args, folder):
    """In this process: one runtime, its outputs saved to ``folder``; prints one JSON line."""
    import json
    import resource

    torch.manual_seed(0)
    config = FocusNetConfig()
    model = prec.for_inference(FocusNetV2(config), "float32")
    depth = args.slices or config.preprocess.chunk_slices
    size = args.size or config.preprocess.crop_size[0]
    volume = np.random.default_rng(0).standard_normal((1, 1, depth, size, size)).astype(np.float32)
    result = {"name": name, "shape": [depth, size, size]}
    try:
        run, result["setup_s"] = prepare(name, model, volume, folder)
        outputs = as_arrays(run(volume))  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run(volume)
            times.append(time.perf_counter() - start)
        result["chunk_s"] = statistics.median(times)
        result["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        np.savez(Path(folder) / f"{name}.npz", *outputs)
    except ImportError as error:
        result["error"] = f"not installed ({error})"
    except Exception as error:  # a runtime that cannot take the network is a result too
        result["error"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
    print(json.dumps(result), flush=True)


def main():
    import json
    import subprocess

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=",".join(RUNTIMES))
    parser.add_argument("--slices", type=int, default=None, help="chunk depth (default: the paper's 40)")
    parser.add_argument("--size", type=int, default=None, help="in-plane size (default: the paper's 240)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # NAME:FOLDER
    args = parser.parse_args()
    if args.child:
        name, folder = args.child.split(":", 1)
        measure(name, args, folder)
        return
    print(f"FocusNetv2 paper configuration, one chunk, float32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; each runtime in its own process")
    reference = None
    with tempfile.TemporaryDirectory() as folder:
        for name in [n for n in args.only.split(",") if n]:
            command = [sys.executable, __file__, "--repeats", str(args.repeats), "--child", f"{name}:{folder}"]
            command += ["--slices", str(args.slices)] if args.slices else []
            command += ["--size", str(args.size)] if args.size else []
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if not lines:
                print(f"{name:12s} crashed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
                continue
            result = json.loads(lines[-1])
            if "error" in result:
                print(f"{name:12s} {result['error']}")
                continue
            outputs = list(np.load(Path(folder) / f"{name}.npz").values())
            if reference is None:
                reference = result["chunk_s"], outputs
                print(f"chunk {' x '.join(map(str, result['shape']))} voxels")
            difference = max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
                             for a, b in zip(outputs, reference[1]))
            print(f"{name:12s} setup {result['setup_s']:6.1f} s   chunk {result['chunk_s']:6.2f} s (median of "
                  f"{args.repeats}; {result['chunk_s'] / reference[0]:4.2f} x the first)   peak RSS "
                  f"{result['peak_gb']:5.2f} GB   largest difference {difference:.1e} of the first's largest value")


if __name__ == "__main__":
    main()
