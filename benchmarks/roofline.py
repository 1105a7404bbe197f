"""This machine's peak fp32 / int8 MatMul rate per runtime and precision (edgemml.roofline), written
to benchmarks/results/roofline.{json,md} with the load it was measured under.

The measurement is edgemml's own (`edgemml roofline` and validate's `roofline: auto` run the same
code and cache it per CPU, libraries and thread count); this script only records one run for the
README. The file is an `edgemml.roofline` file: validate's `roofline: FILE` accepts it only on the
CPU, libraries and thread count it was measured with.

Run by hand (not in CI):  .venv/bin/python benchmarks/roofline.py [--threads 2] [--size 1024]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_note, machine_info, md_table, write_results  # noqa: E402


def main() -> None:
    from edgemml import roofline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024, help="m = k = n of the product")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    info = machine_info()
    roof = roofline.measure(args.threads, size=args.size, repeats=args.repeats, log=print)
    info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    doc = roof.as_dict()
    doc["machine"] = info
    rows = [[r.runtime, r.dtype, r.precision, f"{r.min_ms:.3f}", f"{r.median_ms:.3f}",
             f"{r.gmacs_per_s:.1f}"] for r in roof.rows]
    md = "\n".join([
        "# roofline", "",
        f"{info['cpu']}, {args.threads} threads, {info['date']}; {load_note(info)}.", "",
        f"One {args.size}x{args.size} by {args.size}x{args.size} MatMul per runtime and "
        f"precision, timed together in interleaved rounds ({args.repeats} calls each); GMAC/s from "
        f"the fastest call (what the kernels attain when not preempted).", "",
        md_table(["runtime", "stored", "runs in", "fastest ms", "median ms", "GMAC/s"], rows,
                 "lllrrr"), ""])
    js, mdp = write_results("roofline", doc, md)
    print(md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
