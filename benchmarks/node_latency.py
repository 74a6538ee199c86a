"""Latency and throughput of `focusnet node` with the embedded model: from
the last instance of a series sent (dcmtk's storescu returns) to its
RTSTRUCT received by dcmtk's storescp, for phantom series sent one after
another (each once the previous RTSTRUCT has arrived).

    .venv/bin/python benchmarks/node_latency.py [--n 5] [--size full|small] [--settle 2]

Prints each series' latency, the median, and the throughput in series per
hour (series / total time from the first send to the last RTSTRUCT). Then,
with a second series arriving while the first is being segmented (sent
--settle + 1 s after the first), both latencies, each from its own last
instance sent, for --pairs pairs of further phantom series: what a busy
department sees.
Latency includes the node's --settle wait (a series is complete after that
many seconds without a new instance), reading the series, segmenting, and
writing and sending the RTSTRUCT and SEG.
"""
import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from FocusNetCore.phantom import generate_case, write_case  # noqa: E402

RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"nothing listens on port {port}")


def rtstructs(folder: Path):
    found = []
    for path in folder.glob("*"):
        try:
            if pydicom.dcmread(str(path), stop_before_pixels=True).SOPClassUID == RT_STRUCT:
                found.append(path)
        except Exception:  # storescp still writing it
            pass
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--size", choices=("full", "small"), default="full")
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=9100)
    parser.add_argument("--pairs", type=int, default=2, help="pairs sent overlapping (0: none)")
    args = parser.parse_args()
    for name in ("storescu", "storescp"):
        if not shutil.which(name):
            raise SystemExit(f"{name} is missing: install Debian's dcmtk (make test-tools)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = []
        for k in range(args.n + 2 * args.pairs):  # distinct series: a series sent again is not segmented again
            case = generate_case(args.seed + k, args.size)
            write_case(case, tmp / "phantoms", "dicom")
            folders.append(tmp / "phantoms" / case.name / "CT")
        pairs = [folders[args.n + 2 * k: args.n + 2 * k + 2] for k in range(args.pairs)]
        folders = folders[:args.n]
        dest, node_port = free_port(), free_port()
        (tmp / "planning").mkdir()
        scp = subprocess.Popen(["storescp", "--aetitle", "PLANNING", "--output-directory", str(tmp / "planning"),
                                str(dest)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        node = subprocess.Popen([sys.executable, "-m", "FocusNetCore", "node", "--spool", str(tmp / "spool"),
                                 "--port", str(node_port), "--destination", f"PLANNING@127.0.0.1:{dest}",
                                 "--settle", str(args.settle)], stdout=subprocess.DEVNULL,
                                stderr=open(tmp / "node.log", "w"))
        try:
            wait_port(dest)
            wait_port(node_port, 120)
            latencies = []
            first_send = time.monotonic()
            for k, folder in enumerate(folders):
                subprocess.run(["storescu", "-aec", "FOCUSNET", "+sd", "+r", "127.0.0.1", str(node_port),
                                str(folder)], check=True)
                sent = time.monotonic()
                while len(rtstructs(tmp / "planning")) < k + 1:
                    if node.poll() is not None:
                        raise SystemExit((tmp / "node.log").read_text()[-3000:])
                    time.sleep(0.1)
                latencies.append(time.monotonic() - sent)
                slices = len(list(folder.glob("*.dcm")))
                print(f"series {k + 1}: {slices} slices, last instance sent -> RTSTRUCT received {latencies[-1]:.1f} s",
                      flush=True)
            total = time.monotonic() - first_send
            overlapped = []
            for first, second in pairs:
                before = len(rtstructs(tmp / "planning"))
                subprocess.run(["storescu", "-aec", "FOCUSNET", "+sd", "+r", "127.0.0.1", str(node_port),
                                str(first)], check=True)
                sent_first = time.monotonic()
                time.sleep(args.settle + 1.0)  # the first is complete and being segmented
                subprocess.run(["storescu", "-aec", "FOCUSNET", "+sd", "+r", "127.0.0.1", str(node_port),
                                str(second)], check=True)
                sent_second = time.monotonic()
                done = {}
                while len(done) < 2:
                    if node.poll() is not None:
                        raise SystemExit((tmp / "node.log").read_text()[-3000:])
                    count = len(rtstructs(tmp / "planning")) - before
                    now = time.monotonic()
                    if count >= 1 and "first" not in done:
                        done["first"] = now - sent_first
                    if count >= 2:
                        done["second"] = now - sent_second
                    time.sleep(0.1)
                overlapped.append((done["first"], done["second"]))
                print(f"pair: first series {done['first']:.1f} s, second (sent while the first was segmented) "
                      f"{done['second']:.1f} s", flush=True)
        finally:
            node.terminate()
            node.wait(30)
            scp.terminate()
            scp.wait(10)
        print(f"median latency {statistics.median(latencies):.1f} s over {args.n} {args.size} phantom series "
              f"(--settle {args.settle:g} s included); throughput {3600 * args.n / total:.0f} series/hour "
              f"({total:.1f} s in all, one series at a time)")
    if overlapped:
        print(f"with a second series arriving while the first is segmented: median latency first "
              f"{statistics.median(a for a, _ in overlapped):.1f} s, second "
              f"{statistics.median(b for _, b in overlapped):.1f} s over {len(overlapped)} pair(s)")


if __name__ == "__main__":
    main()
