#!/usr/bin/env python3
"""Summarizes benches/profile-decode.sh: per decode mode and precision, the kernels of one decode step (the
difference between Nsight Compute runs with 3 and 2 new tokens), their GPU time, and the step's wall time from
glm-bench on the same model, as markdown on stdout and in --out. The fused mode launches the graph's kernels one by
one, so its GPU busy time is the graph's."""

import argparse
import collections
import csv
import json
import os

UNITS = {"nsecond": 1e-9, "ns": 1e-9, "usecond": 1e-6, "us": 1e-6, "msecond": 1e-3, "ms": 1e-3, "second": 1.0, "s": 1.0}


def kernels(path):
    """[(name, grid, seconds)] of every profiled kernel in an ncu --csv output."""
    rows = []
    with open(path) as f:
        lines = [line for line in f if line.startswith('"')]
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        rows.append((row["Kernel Name"].split("(")[0], row["Grid Size"], value * UNITS[row["Metric Unit"]]))
    return rows


def one_step(out, quant, mode):
    """Kernels of one decode step: those of the 3-token run that the 2-token run lacks, by (name, grid)."""
    two = kernels(os.path.join(out, f"ncu-{quant}-{mode}-2.csv"))
    three = kernels(os.path.join(out, f"ncu-{quant}-{mode}-3.csv"))
    count = collections.Counter((n, g) for n, g, _ in three)
    count.subtract(collections.Counter((n, g) for n, g, _ in two))
    time = collections.defaultdict(float)
    for n, g, t in three:
        time[(n, g)] += t
    for n, g, t in two:
        time[(n, g)] -= t
    return {k: (c, time[k]) for k, c in count.items() if c > 0}


def step_ms(out, quant):
    """Wall ms per decode step by mode, batch 1, from glm-bench's JSON."""
    record = json.load(open(os.path.join(out, f"bench-{quant}.json")))
    ms = {"graph": 1e3 / record["decode"]["tok_s"]["median"]}
    for v in record.get("decode_variants", []):
        if v["batch"] == 1:
            ms[v["mode"]] = 1e3 / v["tok_s"]["median"]
    return ms, record


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("raw", help="folder of ncu-<quant>-<mode>-<tokens>.csv")
    parser.add_argument("--bench", required=True, help="folder of glm-bench's bench-<quant>.json")
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--out", required=True, help="markdown summary")
    args = parser.parse_args()
    md = []
    for quant in ["4bit", "none"]:
        if not os.path.exists(os.path.join(args.bench, f"bench-{quant}.json")):
            continue
        ms, record = step_ms(args.bench, quant)
        md.append(f"## {record['variant']} ({record['model']}, {args.layers} layers of GLM-4-9B's shapes, {record['device']})\n")
        md.append("| mode | kernels per step | per layer | GPU busy ms/step (sum of kernel times) | wall ms/step | GPU idle |")
        md.append("|---|---|---|---|---|---|")
        steps = {}
        for mode in ["plain", "fused", "graph"]:
            try:
                steps[mode] = one_step(args.raw, quant, "graph" if mode == "fused" else mode)
            except FileNotFoundError:
                continue
            n = sum(c for c, _ in steps[mode].values())
            busy = 1e3 * sum(t for _, t in steps[mode].values())
            wall = ms.get(mode)
            wall_text, idle = (f"{wall:.3f}", f"{100 * (1 - busy / wall):.0f}%") if wall else ("–", "–")
            md.append(f"| {mode} | {n} | {n / args.layers:.1f} | {busy:.3f} | {wall_text} | {idle} |")
        if "graph" in steps:
            md.append("\nKernels of one graph step (grid size tells the GEMV shapes apart):\n")
            md.append("| kernel | grid | launches | µs total | µs each |")
            md.append("|---|---|---|---|---|")
            for (name, grid), (c, t) in sorted(steps["graph"].items(), key=lambda kv: -kv[1][1]):
                md.append(f"| {name} | {grid} | {c} | {1e6 * t:.1f} | {1e6 * t / c:.2f} |")
        md.append("")
    text = "\n".join(md)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
