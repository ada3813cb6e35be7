"""Sampling from logits: every lmkern backend on this device against torch baselines.

Baselines: the usual sort-based torch sampler (temperature, top-k by topk + mask, top-p by a full
sort + softmax + cumsum + mask, then softmax and torch.multinomial, as Hugging Face's warpers do),
and plain ``torch.multinomial(softmax(x))``, which applies no filter at all (a floor on what a
sampler can cost with torch ops). B in {1, 32, 64, 256}, V in {32000, 128256, 256000}, filters off /
top-k 50 / top-p 0.9 / both, temperature 0.7, float32 logits. Reports median microseconds, GB/s of
logits read once, % of the measured copy bandwidth, the speedup over the sort-based sampler, and
peak CUDA memory beyond the logits on GPUs.
"""

from __future__ import annotations

import sys

import torch

import lmkern

import harness

BATCHES = (1, 32, 64, 256)
VOCABS = (32000, 128256, 256000)
FILTERS = {"none": (0, 1.0), "top-k 50": (50, 1.0), "top-p 0.9": (0, 0.9), "top-k 50 + top-p 0.9": (50, 0.9)}
TEMPERATURE = 0.7


def torch_sort_sample(logits, top_k: int, top_p: float, generator=None):
    """The sort-based sampler most code runs: Hugging Face's temperature/top-k/top-p warpers, then
    softmax and torch.multinomial."""
    z = logits.float() / TEMPERATURE
    if top_k:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1)
        cum = torch.softmax(sorted_z, dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False
        z = z.scatter(-1, order, sorted_z.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(z, dim=-1), 1, generator=generator).squeeze(-1)


def torch_multinomial(logits, top_k: int, top_p: float, generator=None):
    """No filters: the cost of softmax + multinomial alone."""
    return torch.multinomial(torch.softmax(logits.float() / TEMPERATURE, dim=-1), 1, generator=generator).squeeze(-1)


def provider_fn(provider: str):
    if provider.startswith("lmkern-"):
        backend = provider.split("-", 1)[1]
        return lambda x, k, p: lmkern.sample(x, TEMPERATURE, k or None, p if p < 1 else None, seed=1234, backend=backend)
    return {"torch-sort": torch_sort_sample, "torch-multinomial": torch_multinomial}[provider]


TARGET_SHAPE = (32, 128256)  # the target: B=32, V=128256, top-k 50 + top-p 0.9


def grid(device: str, quick: bool):
    """(B, V), the target's shape first (a run cut by its time budget still has it)."""
    if quick:
        return [TARGET_SHAPE]
    return [TARGET_SHAPE] + [(b, v) for v in VOCABS for b in BATCHES if (b, v) != TARGET_SHAPE]


def measure(provider: str, B: int, V: int, filt: str, device: str, copy_gbps: float) -> dict:
    x = torch.randn(B, V, device=device) * 3
    k, p = FILTERS[filt]
    f = provider_fn(provider)
    # The sort-based sampler takes seconds per call at the largest sizes on a CPU: fewer runs.
    slow = provider == "torch-sort" and device == "cpu"
    ms = harness.time_ms(lambda: f(x, k, p), device, warmup=1 if slow else 3, min_runs=3 if slow else 7, budget_s=1.0 if slow else 2.0)
    peak = harness.peak_cuda_bytes(lambda: f(x, k, p))
    nbytes = B * V * x.element_size()
    return dict(
        provider=provider, batch=B, vocab=V, filters=filt, us=ms * 1e3, ms=ms, bytes=nbytes,
        GBps=nbytes / (ms * 1e-3) / 1e9, pct_copy=100 * nbytes / (ms * 1e-3) / 1e9 / copy_gbps,
        peak_extra_bytes=None if peak is None else max(peak - nbytes, 0),
    )


def add_speedups(results: list[dict]) -> None:
    base = {(r["batch"], r["vocab"], r["filters"]): r["ms"] for r in results if r["provider"] == "torch-sort"}
    for r in results:
        key = (r["batch"], r["vocab"], r["filters"])
        if key in base:
            r["speedup_vs_torch_sort"] = base[key] / r["ms"]


def check_targets(results: list[dict], device: str) -> list[dict]:
    need = 50.0 if device == "cpu" else 20.0
    targets = []
    for r in results:
        if (r["provider"].startswith("lmkern-") and (r["batch"], r["vocab"], r["filters"]) == (*TARGET_SHAPE, "top-k 50 + top-p 0.9")
                and "speedup_vs_torch_sort" in r):  # (a run cut by its time budget may lack the baseline)
            got = r["speedup_vs_torch_sort"]
            targets.append(dict(target=f"{r['provider']} B=32 V=128256 top-k 50 + top-p 0.9 >= {need:.0f}x torch sort-based",
                                value=round(got, 1), met=got >= need))
    return targets


def measurements(device: str, quick: bool, copy_gbps: float, log=print):
    providers = [f"lmkern-{b}" for b in harness.lmkern_backends(device)] + ["torch-sort", "torch-multinomial"]
    for B, V in grid(device, quick):
        for filt in FILTERS:
            for provider in providers:
                r = measure(provider, B, V, filt, device, copy_gbps)
                log(f"B={B:<4} V={V:<7} {filt:<21} {provider:<18} {r['us']:12.1f} us {r['GBps']:8.2f} GB/s")
                yield r


def summarize(device: str, results: list[dict], copy_gbps: float) -> dict:
    order = {f: i for i, f in enumerate(FILTERS)}
    results.sort(key=lambda r: (r["vocab"], r["batch"], order[r["filters"]]))  # stable: providers keep their order
    add_speedups(results)
    return {"copy_GBps": copy_gbps, "results": results, "targets": check_targets(results, device),
            "temperature": TEMPERATURE, "dtype": "float32"}


def run(device: str, quick: bool = False, log=print) -> dict:
    return harness.run_suite(sys.modules[__name__], device, quick, log)


def table(payload: dict) -> str:
    res = payload["results"]
    providers = list(dict.fromkeys(r["provider"] for r in res))
    lines = ["| B | V | filters | " + " | ".join(providers) + " | best lmkern vs torch-sort |",
             "|" + "---|" * (4 + len(providers))]
    for key in dict.fromkeys((r["batch"], r["vocab"], r["filters"]) for r in res):
        cells = {r["provider"]: r for r in res if (r["batch"], r["vocab"], r["filters"]) == key}
        ours = [cells[p] for p in providers if p.startswith("lmkern-") and p in cells]
        best = min(ours, key=lambda r: r["ms"]) if ours else None
        row = [f"{cells[p]['us']:.0f} us ({cells[p]['GBps']:.1f} GB/s)" if p in cells else "-" for p in providers]
        sp = f"{best.get('speedup_vs_torch_sort', 0):.1f}x" if best else "-"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(row) + f" | {sp} |")
    return "\n".join(lines)


def plot(payload: dict, plt, description: str):
    """Microseconds against B, one panel per (V, filters): lmkern solid, torch dashed."""
    res = payload["results"]
    vocabs = list(dict.fromkeys(r["vocab"] for r in res))
    filters = list(dict.fromkeys(r["filters"] for r in res))
    fig, axes = plt.subplots(len(vocabs), len(filters), figsize=(4.5 * len(filters), 3.5 * len(vocabs)), squeeze=False)
    for i, V in enumerate(vocabs):
        for j, filt in enumerate(filters):
            ax = axes[i][j]
            for provider in dict.fromkeys(r["provider"] for r in res):
                pts = sorted((r["batch"], r["us"]) for r in res if r["vocab"] == V and r["filters"] == filt and r["provider"] == provider)
                if pts:
                    ax.plot(*zip(*pts), "-" if provider.startswith("lmkern") else "--", marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch")
            ax.set_ylabel("us")
            ax.set_title(f"V={V}, {filt}", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle(description)
    fig.tight_layout()
    return fig
