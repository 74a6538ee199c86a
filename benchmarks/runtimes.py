"""Which runtime should run S-Net and SOL-Net on a CPU (issue 23): one
paper-configuration chunk (configs/paper.yaml's network, full width, 40 x 240
x 240 voxels, random weights, BatchNorm folded, float32) through each
candidate in the same run, each against PyTorch eager measured here too:

- PyTorch eager (channels-last), what `--backend torch` runs;
- torch.compile (Inductor, default mode; needs a C++ compiler);
- ONNX Runtime (CPU execution provider, the graph exported by torch.onnx);
- OpenVINO (FocusNetCore/openvino_backend.py), what `--backend auto` runs.

Per runtime: the one-off cost (compile / export / conversion), the median of
--repeats timed chunks after a warm-up, the ratio to eager, the memory the
process gained over the runtime's first run, and the largest difference of its
outputs from eager's (relative to eager's largest magnitude). Runtimes not
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
from FocusNetCore.openvino_backend import _Chunk  # noqa: E402

RUNTIMES = ("eager", "compile", "onnxruntime", "openvino")


def resident_gb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2 ** 30


def as_arrays(outputs):
    return [np.asarray(o.detach().float().numpy() if isinstance(o, torch.Tensor) else o, dtype=np.float32)
            for o in outputs]


def prepare(name, chunk, volume, folder):
    """(callable taking the input array and returning the three outputs, setup seconds)."""
    start = time.perf_counter()
    if name == "eager":
        def run(array):
            with torch.inference_mode():
                return chunk(torch.from_numpy(array).contiguous(memory_format=torch.channels_last_3d))
    elif name == "compile":
        compiled = torch.compile(chunk)

        def run(array):
            with torch.inference_mode():
                return compiled(torch.from_numpy(array).contiguous(memory_format=torch.channels_last_3d))
        run(volume)  # compilation happens on the first call
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
    elif name == "openvino":
        import openvino as ov

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(chunk, (torch.from_numpy(volume),), check_trace=False)
            network = ov.convert_model(traced, input=[ov.PartialShape(list(volume.shape))])
        request = ov.Core().compile_model(network, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                           "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()

        def run(array):
            return [t.data for t in request.infer({0: array}, share_outputs=True).values()]
    else:
        raise ValueError(name)
    return run, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=",".join(RUNTIMES))
    parser.add_argument("--slices", type=int, default=None, help="chunk depth (default: the paper's 40)")
    parser.add_argument("--size", type=int, default=None, help="in-plane size (default: the paper's 240)")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = FocusNetConfig()
    model = prec.for_inference(FocusNetV2(config), "float32")
    chunk = _Chunk(model.snet, model.solnet).eval()
    depth = args.slices or config.preprocess.chunk_slices
    size = args.size or config.preprocess.crop_size[0]
    volume = np.random.default_rng(0).standard_normal((1, 1, depth, size, size)).astype(np.float32)
    print(f"one {depth} x {size} x {size} chunk, FocusNetv2 paper configuration, float32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    reference, eager_seconds = None, None
    with tempfile.TemporaryDirectory() as folder:
        for name in [n for n in args.only.split(",") if n]:
            try:
                before = resident_gb()
                run, setup = prepare(name, chunk, volume, folder)
                outputs = as_arrays(run(volume))  # warm-up
                gained = resident_gb() - before
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    run(volume)
                    times.append(time.perf_counter() - start)
            except ImportError as error:
                print(f"{name:12s} not installed ({error})")
                continue
            except Exception as error:  # a runtime that cannot take the network is a result too
                print(f"{name:12s} failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
                continue
            seconds = statistics.median(times)
            if reference is None:
                reference, eager_seconds = outputs, seconds
            difference = max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
                             for a, b in zip(outputs, reference))
            print(f"{name:12s} setup {setup:6.1f} s   chunk {seconds:6.2f} s (median of {args.repeats}; "
                  f"{seconds / eager_seconds:4.2f} x the first)   +{gained:5.2f} GB   "
                  f"largest difference {difference:.1e} of the first's largest value")


if __name__ == "__main__":
    main()
