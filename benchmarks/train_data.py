"""Training data that streams (issue 47), measured on the CPU with small
phantoms and the tiny test configuration (3 mm grid, 64x64 crops):

1. memory: peak resident memory of a training process (one rank: the cache
   opened, the class weights, 20 S-Net iterations, a validation) on
   --large cases against --small cases. Each measured run is a fresh process
   on a cache built beforehand, so the figure is training's, not
   preprocessing's. Two figures: the peak RSS (VmHWM) and the peak of
   anonymous memory (RssAnon, sampled; file pages of the memory-mapped cache
   are the kernel's to drop and are not in it).
2. sampling: crops per second drawn for the SOL-Net stage (heat maps
   included) with --workers worker processes against none, on the paper's
   grid and crop (configs/paper.yaml's preprocessing: 40 slices of 240 x 240
   at 1 mm; what a GPU run samples).
3. step: S-Net step time (the tiny network, paper-sized crops) with the
   loader's workers running against crops already in memory.

    .venv/bin/python benchmarks/train_data.py [--small 20] [--large 200] [--workers 2]

Prints each figure and the ratio the issue asks about. Peers are measured
in the same run; a machine with few cores shares them between the workers
and the training step (say so when quoting the step figure).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "tiny-test.yaml"

MEASURE = r"""
import json, sys, threading, time, resource
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from FocusNetCore.train import Trainer, TrainConfig, load_config
peak = {"anon_kb": 0}
def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0
stop = []
def sample():
    while not stop:
        peak["anon_kb"] = max(peak["anon_kb"], rss_anon())
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
base = load_config(sys.argv[2]).to_dict()
config = TrainConfig.from_dict({**base, "stages": {"snet": 20, "solnet": 0, "aae_pretrain": 0, "sos": 0,
                                                   "finetune": 0}, "validation_cases": 1})
trainer = Trainer(config, sys.argv[3], sys.argv[4], "cpu", log=lambda *a: None, workers=0)
trainer.run(progress=False)
stop.append(1)
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        hwm = int(line.split()[1])
print(json.dumps({"cases": len(trainer.train_cases) + len(trainer.val_cases), "vmhwm_kb": hwm,
                  "rss_anon_peak_kb": max(peak["anon_kb"], rss_anon())}))
"""


def make_data(folder: Path, n: int, templates: Path) -> Path:
    """n cases: copies of the template phantoms under new names (each its own
    case to discover, preprocess and cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(templates / "labels.json", folder / "labels.json")
    sources = sorted(p.name[: -len("_ct.nrrd")] for p in templates.glob("*_ct.nrrd"))
    for k in range(n):
        src = sources[k % len(sources)]
        for part in ("ct", "labels"):
            target = folder / f"case{k:04d}_{part}.nrrd"
            if not target.exists():
                os.link(templates / f"{src}_{part}.nrrd", target)
    return folder


def measure_memory(data: Path, run: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, str(ROOT), str(CONFIG), str(data), str(run)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=20)
    parser.add_argument("--large", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--crops", type=int, default=40, help="crops timed per sampling figure")
    parser.add_argument("--skip-memory", action="store_true", help="sampling and step figures only")
    parser.add_argument("--steps", type=int, default=15, help="S-Net steps timed per step figure")
    args = parser.parse_args()

    import numpy as np
    import torch

    from FocusNetCore.phantom import generate_case, write_case
    from FocusNetCore.train import Trainer, TrainConfig, load_config

    with tempfile.TemporaryDirectory(prefix="focusnet-train-data-") as tmp:
        tmp = Path(tmp)
        templates = tmp / "templates"
        templates.mkdir()
        for seed in range(5000, 5010):
            write_case(generate_case(seed, "small"), templates, "nrrd")

        # 1. memory
        rows = {}
        for n in ((args.small, args.large) if not args.skip_memory else ()):
            data = make_data(tmp / f"data{n}", n, templates)
            run = tmp / f"run{n}"
            started = time.perf_counter()
            # Build the cache first (with workers), in its own process: not part of the figure.
            subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "from FocusNetCore.data import load_training_cases; "
                            "from FocusNetCore.train import load_config; c = load_config(sys.argv[2]); "
                            "load_training_cases(sys.argv[3], sys.argv[4], c.network.preprocess, c.network.organs, "
                            f"lambda *a: None, workers={max(args.workers, 1)})",
                            str(ROOT), str(CONFIG), str(data), str(run / "cache")], check=True)
            built = time.perf_counter() - started
            rows[n] = measure_memory(data, run)
            rows[n]["cache_build_s"] = round(built, 1)
            print(f"{n:4d} cases: cache built in {built:.1f} s; training process peak RSS (VmHWM) "
                  f"{rows[n]['vmhwm_kb'] / 1024:.0f} MiB, peak anonymous memory "
                  f"{rows[n]['rss_anon_peak_kb'] / 1024:.0f} MiB", flush=True)
        if args.skip_memory:
            make_data(tmp / f"data{args.small}", args.small, templates)
        else:
            small, large = rows[args.small], rows[args.large]
            print(f"memory ratio {args.large} / {args.small} cases: peak RSS "
                  f"{large['vmhwm_kb'] / small['vmhwm_kb']:.2f}x, anonymous "
                  f"{large['rss_anon_peak_kb'] / small['rss_anon_peak_kb']:.2f}x (target: at most 1.25x)")

        # 2. sampling throughput, SOL-Net crops (heat maps included), paper-sized
        torch.set_num_threads(1)
        base = load_config(CONFIG).to_dict()
        paper = load_config(ROOT / "configs" / "paper.yaml").to_dict()
        base["network"] = {**base["network"], "preprocess": paper["network"]["preprocess"]}
        length = args.crops + 1
        config = TrainConfig.from_dict({**base, "stages": {"snet": 1, "solnet": length, "aae_pretrain": 0, "sos": 0,
                                                           "finetune": 0}})
        data = tmp / f"data{args.small}"
        rates = {}
        for workers in (0, args.workers):
            trainer = Trainer(config, data, tmp / "run-paper-grid", "cpu", log=lambda *a: None, workers=workers)
            loader = trainer._loader("solnet", 1, 0, length)
            next(loader)  # workers started, first crop made
            started = time.perf_counter()
            for _ in range(args.crops):
                next(loader)
            rates[workers] = args.crops / (time.perf_counter() - started)
            del loader
            print(f"sampling with {workers} worker(s): {rates[workers]:.1f} crops/s", flush=True)
        print(f"sampling ratio {args.workers} / 0 workers: {rates[args.workers] / rates[0]:.2f}x (target: at least 1.7x)")

        # 3. S-Net step time: crops from the loader's workers against crops in memory
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - args.workers))
        config = TrainConfig.from_dict({**base, "stages": {"snet": args.steps + 2, "solnet": 0, "aae_pretrain": 0,
                                                           "sos": 0, "finetune": 0}})
        times = {}
        for mode in ("memory", "loader"):
            trainer = Trainer(config, data, tmp / "run-paper-grid", "cpu", log=lambda *a: None,
                              workers=args.workers if mode == "loader" else 0)
            trainer._set_trainable("snet")
            crops = trainer.crops("snet", 0)
            if mode == "memory":
                ready = [crops[s] for s in range(args.steps + 2)]
                source = iter(ready)
            else:
                source = trainer._loader("snet", 0, 0, args.steps + 2)
            trainer._step("snet", 0, 0, next(source))  # warm-up
            trainer._step("snet", 0, 1, next(source))
            started = time.perf_counter()
            for step in range(2, args.steps + 2):
                trainer._step("snet", 0, step, next(source))
            times[mode] = (time.perf_counter() - started) / args.steps
            print(f"S-Net step, crops {'in memory' if mode == 'memory' else f'from {args.workers} workers'}: "
                  f"{times[mode] * 1000:.0f} ms", flush=True)
        print(f"step time ratio loader / memory: {times['loader'] / times['memory']:.2f}x (target: within 1.10x; "
              f"{os.cpu_count()} CPU cores shared by the step's {torch.get_num_threads()} thread(s) and "
              f"{args.workers} worker(s))")


if __name__ == "__main__":
    main()
