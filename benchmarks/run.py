"""Runs the benchmark suites on the present device and records the results.

    python benchmarks/run.py [--device cpu|cuda] [--quick] [--out DIR] [--no-readme] [--time-budget-s S]

Writes (except with --quick) benchmarks/results/<device>.json (and DIR/<device>.json with --out), one PNG plot per suite,
and the suite's table into README.md between its markers; prints the tables and the targets.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_attention  # noqa: E402
import bench_norm  # noqa: E402
import bench_sampling  # noqa: E402
import harness  # noqa: E402

SUITES = {"attention": bench_attention, "norm": bench_norm, "sampling": bench_sampling}
README = os.path.join(os.path.dirname(harness.RESULTS_DIR), "..", "README.md")


def plot(device_slug: str, description: str, suite: str, payload: dict, out_dirs: list[str]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return []
    if hasattr(SUITES[suite], "plot"):  # a suite with its own figure
        fig = SUITES[suite].plot(payload, plt, description)
        return _save(fig, plt, device_slug, suite, out_dirs)
    res = payload["results"]
    ops = list(dict.fromkeys(r["op"] for r in res))
    modes = list(dict.fromkeys(r["mode"] for r in res))
    fig, axes = plt.subplots(len(ops), len(modes), figsize=(6 * len(modes), 4 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [r for r in res if r["op"] == op and r["mode"] == mode]
            for provider in dict.fromkeys(r["provider"] for r in sel):
                for dtype in dict.fromkeys(r["dtype"] for r in sel):
                    pts = sorted((r["hidden"], r["GBps"]) for r in sel if r["provider"] == provider and r["dtype"] == dtype)
                    if pts:
                        style = "-" if provider.startswith("lmkern") else "--"
                        ax.plot(*zip(*pts), style, marker="o", label=f"{provider} {dtype}")
            ax.axhline(payload["copy_GBps"], color="gray", linestyle=":", label="copy bandwidth")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"hidden size ({payload.get('rows', '')} rows)")
            ax.set_ylabel("GB/s")
            ax.set_title(f"{op} {mode}")
            ax.legend(fontsize=7)
    fig.suptitle(description)
    fig.tight_layout()
    return _save(fig, plt, device_slug, suite, out_dirs)


def _save(fig, plt, device_slug: str, suite: str, out_dirs: list[str]) -> list[str]:
    paths = []
    for d in out_dirs:
        path = os.path.join(d, f"{device_slug}-{suite}.png")
        fig.savefig(path, dpi=90)
        paths.append(path)
    plt.close(fig)
    return paths


def update_readme(slug: str, suite: str, text: str) -> None:
    """Replaces (or adds) this device's table for this suite between markers in README.md."""
    path = os.path.normpath(README)
    if not os.path.exists(path):
        return
    with open(path) as f:
        readme = f.read()
    start, end = f"<!-- bench:{suite}:{slug}:start -->", f"<!-- bench:{suite}:{slug}:end -->"
    block = f"{start}\n{text}\n{end}"
    if start in readme:
        readme = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, readme, flags=re.S)
    else:
        anchor = f"<!-- bench:{suite}:tables -->"
        if anchor not in readme:
            print(f"README.md has no {anchor} marker: table not inserted")
            return
        readme = readme.replace(anchor, f"{anchor}\n\n{block}")
    with open(path, "w") as f:
        f.write(readme)


def report(description: str, date: str, suite: str, payload: dict) -> str:
    mod = SUITES[suite]
    partial = f". **Partial run: {payload['partial']}.**" if payload.get("partial") else ""
    return f"{description}; copy bandwidth {payload['copy_GBps']:.1f} GB/s; {date}{partial}\n\n{mod.table(payload)}"


def render(path: str) -> int:
    import json

    with open(path) as f:
        data = json.load(f)
    for suite, payload in data["suites"].items():
        text = report(data["device_description"], data["date"], suite, payload)
        update_readme(data["device"], suite, text)
        for p in plot(data["device"], data["device_description"], suite, payload, [harness.RESULTS_DIR]):
            print(f"wrote {p}")
        print(text)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--suite", action="append", choices=sorted(SUITES), help="default: all")
    ap.add_argument("--quick", action="store_true", help="one size per suite, for a smoke run")
    ap.add_argument("--out", help="also write results and plots here (e.g. $OUT on the GPU machine)")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--time-budget-s", type=float, help="start no measurement after this many seconds; the suites "
                    "then record what they measured, marked partial (each suite measures its targets' sizes first)")
    ap.add_argument("--render", metavar="JSON", help="no run: redraw plots and README tables from a results file "
                    "(e.g. one brought back from a GPU machine)")
    args = ap.parse_args()
    if args.render:
        return render(args.render)
    # A --quick smoke run never replaces the committed full results.
    out_dirs = ([] if args.quick else [harness.RESULTS_DIR]) + ([args.out] if args.out else [])
    for d in out_dirs:
        os.makedirs(d, exist_ok=True)
    deadline = None if args.time_budget_s is None else time.monotonic() + args.time_budget_s
    for suite in args.suite or sorted(SUITES):
        payload = harness.run_suite(SUITES[suite], args.device, args.quick, deadline=deadline)
        for d in out_dirs:
            path = harness.save_suite(args.device, suite, payload, None if d == harness.RESULTS_DIR else d)
            print(f"wrote {path}")
        slug, description = harness.device_slug(args.device), harness.device_description(args.device)
        for p in plot(slug, description, suite, payload, out_dirs):
            print(f"wrote {p}")
        text = report(description, harness.environment(args.device)["date"], suite, payload)
        if not args.no_readme and not args.quick:
            update_readme(slug, suite, text)
        print(text)
        print("\ntargets:")
        for t in payload["targets"]:
            print(f"  [{'met' if t['met'] else 'NOT MET'}] {t['target']}: {t['value']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
