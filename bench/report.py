#!/usr/bin/env python3
"""Benchmark bookkeeping for bench/run.sh.

  report.py oha FILE SCENARIO CONTENDER RESULTS   append one oha JSON summary to RESULTS (TSV)
  report.py table RESULTS ROUNDS DURATION CONNS   print the Markdown report (medians, ratios)
"""
import json
import os
import statistics
import sys
from collections import defaultdict

# scenario: [(metric, contender, "min" | "max", ratio)]: Portcullis' figure over the contender's must
# be at least ("min", rates) or at most ("max", CPU per request) the ratio.
TARGETS = {
    "1 plain HTTP": [
        ("req/s", "squid", "min", 4.0),
        ("req/s", "nginx reverse proxy", "min", 0.9),
        ("req/s", "ats", "min", 1.0),
        ("CPU µs/req", "nginx reverse proxy", "max", 1.25),
        ("CPU µs/req", "squid", "max", 0.25),
        ("CPU µs/req", "ats", "max", 1.0),
    ],
    "2 tunnel 512 MiB": [("MB/s", "direct", "min", 0.95)],
    "3 intercepted keep-alive": [("req/s", "squid", "min", 3.0)],
    "4 intercepted new connection": [("req/s", "squid", "min", 10.0)],
    "6 plain HTTP, audit file": [
        ("req/s", "portcullis (audit to stdout→/dev/null)", "min", 0.9)
    ],
}

# Ratios without a target, printed after the targets: scenario: [(metric, [contender, ...])].
# For CPU µs/req below 1× means Portcullis spends less CPU per request than the other.
COMPARE = {
    "3 intercepted keep-alive": [("CPU µs/req", ["squid"])],
    "4 intercepted new connection": [("CPU µs/req", ["squid"])],
}

# A scenario set against another for the same contender: (scenario, reference scenario).
ACROSS = [("7 realistic", "1 plain HTTP")]


def oha(path, scenario, contender, results):
    with open(path) as f:
        d = json.load(f)
    s = d["summary"]
    codes = d.get("statusCodeDistribution", {}) or {}
    ok = sum(v for k, v in codes.items() if str(k).startswith("2"))
    total = sum(codes.values())
    # Requests cut by the end of the measurement window are not failures.
    errors = sum(
        v for k, v in (d.get("errorDistribution") or {}).items() if "deadline" not in k
    )
    with open(results, "a") as out:
        rate = s.get("requestsPerSec") or 0.0
        share = ok / total if total else 0.0
        out.write(f"{scenario}\t{contender}\treq/s\t{rate * share:.1f}\n")
        lp = d.get("latencyPercentiles") or {}
        for key in ("p50", "p99"):
            if lp.get(key) is not None:
                out.write(f"{scenario}\t{contender}\t{key} ms\t{lp[key] * 1000:.3f}\n")
        out.write(f"{scenario}\t{contender}\tfailed\t{(total - ok) + errors}\n")
        # CPU time of the proxy's processes per request (CPU_TICKS, from /proc/PID/stat): noise on a
        # shared machine moves it far less than it moves a rate.
        ticks = os.environ.get("CPU_TICKS", "")
        if ticks and total:
            hz = float(os.environ.get("CLK_TCK") or 100)
            out.write(f"{scenario}\t{contender}\tCPU µs/req\t{int(ticks) / hz * 1e6 / total:.2f}\n")


def table(results, rounds, duration, conns):
    values = defaultdict(list)
    order = []
    with open(results) as f:
        for line in f:
            scenario, contender, metric, value = line.rstrip("\n").split("\t")
            key = (scenario, contender, metric)
            if key not in values:
                order.append(key)
            values[key].append(float(value))
    med = {k: statistics.median(v) for k, v in values.items()}
    print(f"Medians of {rounds} round(s); {duration} s per load measurement, {conns} connections.\n")
    scenarios = []
    for s, _, _ in order:
        if s not in scenarios:
            scenarios.append(s)
    for scenario in scenarios:
        metrics = []
        contenders = []
        for s, c, m in order:
            if s != scenario:
                continue
            if m not in metrics:
                metrics.append(m)
            if c not in contenders:
                contenders.append(c)
        print(f"### Scenario {scenario}\n")
        print("| contender | " + " | ".join(metrics) + " |")
        print("|---|" + "---|" * len(metrics))
        for c in contenders:
            cells = []
            for m in metrics:
                v = med.get((scenario, c, m))
                cells.append("—" if v is None else f"{v:,.1f}" if v >= 100 else f"{v:.3g}")
            print(f"| {c} | " + " | ".join(cells) + " |")
        print()
        lines = []
        for metric, ref, kind, want in TARGETS.get(scenario, []):
            mine = med.get((scenario, "portcullis", metric))
            theirs = med.get((scenario, ref, metric))
            if mine and theirs:
                ratio = mine / theirs
                met = ratio >= want if kind == "min" else ratio <= want
                sign = "≥" if kind == "min" else "≤"
                verdict = "met" if met else "NOT met"
                lines.append(
                    f"- portcullis / {ref} ({metric}): **{ratio:.2f}×** (target {sign} {want}×: {verdict})"
                )
        for metric, refs in COMPARE.get(scenario, []):
            mine = med.get((scenario, "portcullis", metric))
            for ref in refs:
                theirs = med.get((scenario, ref, metric))
                if mine and theirs:
                    note = " (below 1×: less CPU per request)" if metric.startswith("CPU") else ""
                    lines.append(f"- portcullis / {ref} ({metric}): **{mine / theirs:.2f}×**{note}")
        for this, ref in ACROSS:
            if this != scenario:
                continue
            for c in ("portcullis", "portcullis (baseline)"):
                for metric in ("req/s", "CPU µs/req"):
                    mine = med.get((scenario, c, metric))
                    theirs = med.get((ref, c, metric))
                    if mine and theirs:
                        lines.append(f"- {c}, scenario {scenario} / scenario {ref} ({metric}): **{mine / theirs:.2f}×**")
        if lines:
            print("\n".join(lines))
            print()
        for metric in ("req/s", "CPU µs/req"):
            mine = med.get((scenario, "portcullis", metric))
            base = med.get((scenario, "portcullis (baseline)", metric))
            if mine and base:
                print(f"- portcullis / portcullis (baseline) ({metric}): **{mine / base:.3f}×**")
        if med.get((scenario, "portcullis (baseline)", "req/s")):
            print()
    mem = {m: med.get(("5 memory", "portcullis", m)) for m in ("idle RSS MiB", "KiB per tunnel")}
    if mem["idle RSS MiB"] is not None:
        verdict = "met" if mem["idle RSS MiB"] <= 16 else "NOT met"
        print(f"- idle RSS {mem['idle RSS MiB']:.1f} MiB (target ≤ 16 MiB: {verdict})")
    if mem["KiB per tunnel"] is not None:
        verdict = "met" if mem["KiB per tunnel"] <= 12 else "NOT met"
        print(f"- {mem['KiB per tunnel']:.1f} KiB per idle tunnel (target ≤ 12 KiB: {verdict})")


if __name__ == "__main__":
    if sys.argv[1] == "oha":
        oha(*sys.argv[2:6])
    elif sys.argv[1] == "table":
        table(*sys.argv[2:6])
    else:
        sys.exit(__doc__)
