"""Phantom generation speed: one 512 x 512 x ~100 case and one --size small case.

    .venv/bin/python benchmarks/phantom_speed.py [--repeats 3]

Prints the median time of each, and its ratio to the targets of the phantom
issue (full case <= 10 s on 2 cores; small case well under 1 s).
"""
import argparse
import statistics
import time

from FocusNetCore.phantom import generate_case

TARGETS = {"full": 10.0, "small": 1.0}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for size in ("full", "small"):
        times, shape = [], None
        for k in range(args.repeats):
            start = time.perf_counter()
            case = generate_case(1000 + k, size)
            times.append(time.perf_counter() - start)
            shape = case.image.GetSize()
        median = statistics.median(times)
        print(f"{size:5s}: median {median:.2f} s over {args.repeats} cases (last {shape}); "
              f"ratio to the {TARGETS[size]:.0f} s target: {median / TARGETS[size]:.2f}")


if __name__ == "__main__":
    main()
