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

TARGETS = {
    # scenario: (metric, ratio description, [(contender, minimum ratio)])
    "1 plain HTTP": ("req/s", [("squid", 4.0), ("nginx reverse proxy", 0.8)]),
    "2 tunnel 512 MiB": ("MB/s", [("direct", 0.95)]),
    "3 intercepted keep-alive": ("req/s", [("squid", 3.0)]),
    "4 intercepted new connection": ("req/s", [("squid", 10.0)]),
    "6 plain HTTP, audit file": ("req/s", [("portcullis (audit to stdout→/dev/null)", 0.9)]),
}


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
        # CPU time of the proxy process per request (CPU_TICKS from /proc/PID/stat): noise on a
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
                cells.append("" if v is None else f"{v:,.1f}" if v >= 100 else f"{v:.3g}")
            print(f"| {c} | " + " | ".join(cells) + " |")
        print()
        target = TARGETS.get(scenario)
        if target:
            metric, refs = target
            mine = med.get((scenario, "portcullis", metric))
            for ref, want in refs:
                theirs = med.get((scenario, ref, metric))
                if mine and theirs:
                    ratio = mine / theirs
                    verdict = "met" if ratio >= want else "NOT met"
                    print(f"- portcullis / {ref} ({metric}): **{ratio:.2f}×** (target ≥ {want}×: {verdict})")
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
        verdict = "met" if mem["KiB per tunnel"] <= 50 else "NOT met"
        print(f"- {mem['KiB per tunnel']:.1f} KiB per idle tunnel (target ≤ 50 KiB: {verdict})")


if __name__ == "__main__":
    if sys.argv[1] == "oha":
        oha(*sys.argv[2:6])
    elif sys.argv[1] == "table":
        table(*sys.argv[2:6])
    else:
        sys.exit(__doc__)
