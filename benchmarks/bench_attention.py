"""Attention: every lmkern kernel backend on this device against torch's SDPA backends.

Prefill (forward, and forward + backward): TFLOP/s from 4 * B * H * Sq * Sk * D for the forward
(halved when causal) and 2.5x that for the backward, as flash-attention counts (a forward +
backward run counts 3.5x). Providers: each
lmkern backend (the interpreter's Triton is not timed on CPUs), torch SDPA with each of its
backends this device has (CUDA: flash, efficient, cudnn, math; CPU: its default fused kernel and
math), and lmkern's reference, which holds the full score matrix (only where it fits).
Decode: one new token per sequence against a KV cache, reported as GB/s of K/V read, beside the
measured copy bandwidth; torch's baseline is SDPA on the cache prefix.
Peak CUDA memory beyond inputs and outputs is recorded for every forward.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

import lmkern
from lmkern.reference import attention as ref

import harness

# Naive (score-matrix) providers only below this many score elements (B * H * Sq * Sk).
NAIVE_MAX_SCORES = 1 << 31


def _sdpa_backends(device: str) -> dict[str, object]:
    """torch SDPA providers: name -> a context manager factory selecting that backend."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: only its default choice
        return {"torch-sdpa": contextlib.nullcontext}
    if device == "cuda":
        names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
        return {f"torch-sdpa-{n}": (lambda b=getattr(SDPBackend, attr): sdpa_kernel(b)) for n, attr in names.items() if hasattr(SDPBackend, attr)}
    return {"torch-sdpa": contextlib.nullcontext, "torch-sdpa-math": lambda: sdpa_kernel(SDPBackend.MATH)}


def prefill_shapes(device: str, quick: bool):
    """(B, H, S, D, dtype, causal)."""
    if device == "cpu":
        if quick:
            return [(1, 16, 2048, 64, torch.float32, True)]
        return [(1, 16, s, 64, torch.float32, c) for s in (512, 1024, 2048) for c in (True, False)] + [
            (1, 16, 2048, 64, torch.bfloat16, True)
        ]
    if quick:
        return [(1, 16, 16384, 128, torch.bfloat16, False)]
    # 16k tokens per batch, 2048 model width, as flash-attention's benchmarks do
    return [
        (16384 // s, 2048 // d, s, d, torch.bfloat16, c)
        for d in (64, 128) for c in (False, True) for s in (512, 1024, 2048, 4096, 8192, 16384)
    ]


def prefill_flops(B, H, S, D, causal, backward):
    """FLOPs of the forward, or of forward + backward (the backward counts 2.5 forwards)."""
    f = 4 * B * H * S * S * D / (2 if causal else 1)
    return f * 3.5 if backward else f


def _prefill_fn(provider: str, contexts: dict, q, k, v, causal: bool):
    if provider.startswith("lmkern-"):
        backend = provider.split("-", 1)[1]
        return lambda: lmkern.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)
    if provider == "naive":
        return lambda: ref.sdpa(q, k, v, is_causal=causal, upcast=False)
    ctx = contexts[provider]

    def run():
        with ctx():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def measure_prefill(provider, contexts, B, H, S, D, dtype, causal, backward, device):
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    fwd = _prefill_fn(provider, contexts, q, k, v, causal)
    try:
        if backward:
            g = torch.randn(B, H, S, D, device=device, dtype=dtype)
            fn = lambda: torch.autograd.grad(fwd(), (q, k, v), g)  # noqa: E731
        else:
            fn = fwd
        fn()  # a backend that cannot run these inputs says so here, not inside the timing
    except (RuntimeError, ValueError, NotImplementedError) as e:
        return dict(skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    ms = harness.time_ms(fn, device, budget_s=1.0 if device == "cpu" else 2.0)
    peak = harness.peak_cuda_bytes(fn) if not backward else None
    io_bytes = 4 * B * H * S * D * q.element_size()
    return dict(ms=ms, TFLOPs=prefill_flops(B, H, S, D, causal, backward) / (ms * 1e-3) / 1e12,
                peak_extra_bytes=None if peak is None else max(peak - io_bytes // 4, 0))


def decode_shapes(device: str, quick: bool):
    """(B, Hq, Hkv, L, D, dtype)."""
    if device == "cpu":
        return [(4, 32, 8, 4096, 64, torch.float32)] if quick else [(4, 32, 8, L, 64, torch.float32) for L in (1024, 4096, 16384)]
    if quick:
        return [(8, 32, 8, 32768, 128, torch.bfloat16)]
    return [(B, 32, 8, L, 128, torch.bfloat16) for B in (1, 8, 32) for L in (1024, 4096, 16384, 32768)]


def measure_decode(provider, contexts, B, Hq, Hkv, L, D, dtype, device):
    q = torch.randn(B, 1, Hq, D, device=device, dtype=dtype)
    kc, vc = (torch.randn(B, L, Hkv, D, device=device, dtype=dtype) for _ in range(2))
    lens = torch.full((B,), L, dtype=torch.int32, device=device)
    if provider.startswith("lmkern-"):
        backend = provider.split("-", 1)[1]
        fn = lambda: lmkern.attention_with_kvcache(q, kc, vc, lens, backend=backend)  # noqa: E731
    else:
        # torch SDPA on the cache in its (B, H, S, D) layout (a transposed view, as HF hands it)
        qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
        ctx = contexts[provider]

        def fn():
            with ctx():
                return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    try:
        fn()
    except (RuntimeError, ValueError, NotImplementedError) as e:
        return dict(skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    ms = harness.time_ms(fn, device)
    nbytes = 2 * B * L * Hkv * D * kc.element_size()
    return dict(ms=ms, bytes=nbytes, GBps=nbytes / (ms * 1e-3) / 1e9)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _prefill_rows(device, quick, contexts, ours, shapes, log):
    for B, H, S, D, dtype, causal in shapes:
        for backward in (False, True) if not (quick and device == "cpu") else (False,):
            providers = ours + list(contexts) + (["naive"] if B * H * S * S <= NAIVE_MAX_SCORES else [])
            for provider in providers:
                if device == "cpu" and backward and provider == "torch-sdpa-math":
                    continue
                r = measure_prefill(provider, contexts, B, H, S, D, dtype, causal, backward, device)
                r.update(kind="prefill", provider=provider, batch=B, heads=H, seqlen=S, head_dim=D,
                         dtype=_dtype_name(dtype), causal=causal, direction="fwd+bwd" if backward else "fwd")
                what = f"{r['direction']:<7} B={B} H={H} S={S} D={D} {r['dtype']} causal={causal} {provider:<22}"
                log(what + (f" {r['ms']:9.3f} ms {r['TFLOPs']:8.3f} TFLOP/s" if "ms" in r else f" skipped: {r['skipped']}"))
                yield r


def _decode_rows(device, contexts, ours, shapes, copy_gbps, log):
    for B, Hq, Hkv, L, D, dtype in shapes:
        for provider in ours + [p for p in contexts if not p.endswith("math")]:
            r = measure_decode(provider, contexts, B, Hq, Hkv, L, D, dtype, device)
            r.update(kind="decode", provider=provider, batch=B, heads=Hq, kv_heads=Hkv, seqlen=L, head_dim=D,
                     dtype=_dtype_name(dtype))
            if "GBps" in r:
                r["pct_copy"] = 100 * r["GBps"] / copy_gbps
            what = f"decode  B={B} Hq={Hq} Hkv={Hkv} L={L} D={D} {r['dtype']} {provider:<22}"
            log(what + (f" {r['ms']:9.3f} ms {r['GBps']:8.1f} GB/s" if "ms" in r else f" skipped: {r['skipped']}"))
            yield r


def measurements(device: str, quick: bool, copy_gbps: float, log=print):
    """Prefill rows then decode rows; on CUDA the shapes the targets name come first (the longest
    prefill at d128 non-causal, then decode at 32k), so a run cut by its time budget has them."""
    contexts = _sdpa_backends(device)
    ours = [f"lmkern-{b}" for b in harness.lmkern_backends(device)]
    prefill, decode = prefill_shapes(device, quick), decode_shapes(device, quick)
    if device == "cuda":
        first_prefill = [s for s in prefill if s[2] == 16384 and s[3] == 128 and not s[5]]
        first_decode = [s for s in decode if s[3] == 32768]
        yield from _prefill_rows(device, quick, contexts, ours, first_prefill, log)
        yield from _decode_rows(device, contexts, ours, first_decode, copy_gbps, log)
        prefill = [s for s in prefill if s not in first_prefill]
        decode = [s for s in decode if s not in first_decode]
    yield from _prefill_rows(device, quick, contexts, ours, prefill, log)
    yield from _decode_rows(device, contexts, ours, decode, copy_gbps, log)


def summarize(device: str, results: list[dict], copy_gbps: float) -> dict:
    # Tables list prefill then decode, each in its shape list's order, whatever order they ran in.
    rank = {}
    for i, (B, H, S, D, dtype, causal) in enumerate(prefill_shapes(device, False) + prefill_shapes(device, True)):
        rank.setdefault(("prefill", B, H, S, D, _dtype_name(dtype), causal), i)
    for i, (B, Hq, Hkv, L, D, dtype) in enumerate(decode_shapes(device, False) + decode_shapes(device, True)):
        rank.setdefault(("decode", B, Hq, L, D, _dtype_name(dtype), None), i)

    def position(r):
        shape = (r["kind"], r["batch"], r["heads"], r["seqlen"], r["head_dim"], r["dtype"], r.get("causal"))
        return (r["kind"] != "prefill", rank.get(shape, len(rank)), r.get("direction") != "fwd")

    results.sort(key=position)  # stable: providers keep their order
    return {"copy_GBps": copy_gbps, "results": results, "targets": check_targets(results, device, copy_gbps)}


def run(device: str, quick: bool = False, log=print) -> dict:
    return harness.run_suite(sys.modules[__name__], device, quick, log)


def _key(r):
    return (r["kind"], r["batch"], r["heads"], r.get("kv_heads"), r["seqlen"], r["head_dim"], r["dtype"], r.get("causal"), r.get("direction"))


def check_targets(results: list[dict], device: str, copy_gbps: float) -> list[dict]:
    timed = [r for r in results if "ms" in r]
    targets = []
    if device == "cpu":
        passes = {"fwd": "forward", "fwd+bwd": "forward+backward"}
        for r in timed:
            key = (r["kind"], r["batch"], r["heads"], r["seqlen"], r["head_dim"], r["dtype"], r.get("causal"))
            if key == ("prefill", 1, 16, 2048, 64, "float32", True) and r["provider"] == "lmkern-cpu":
                base = [t for t in timed if _key(t) == _key(r) and t["provider"] == "torch-sdpa"]
                if base:
                    targets.append(dict(target=f"lmkern-cpu causal fp32 (1, 16, 2048, 64) {passes[r['direction']]} at least as fast as torch SDPA on CPU",
                                        value=f"{r['ms']:.1f} ms vs {base[0]['ms']:.1f} ms", met=r["ms"] <= base[0]["ms"]))
        return targets
    for key in dict.fromkeys(_key(r) for r in timed if r["kind"] == "prefill"):
        group = [r for r in timed if _key(r) == key]
        ours = [r for r in group if r["provider"].startswith("lmkern-")]
        torch_best = [r for r in group if r["provider"].startswith("torch-sdpa")]
        if ours and torch_best:
            a, b = min(ours, key=lambda r: r["ms"]), min(torch_best, key=lambda r: r["ms"])
            targets.append(dict(target=f"{key[8]} B={key[1]} H={key[2]} S={key[4]} D={key[5]} causal={key[7]}: best lmkern >= best torch SDPA",
                                value=f"{a['provider']} {a['TFLOPs']:.0f} vs {b['provider']} {b['TFLOPs']:.0f} TFLOP/s", met=a["ms"] <= b["ms"]))
    big = [r for r in timed if r["kind"] == "prefill" and r["provider"].startswith("lmkern-") and r["seqlen"] == 16384
           and r["head_dim"] == 128 and not r["causal"] and r["direction"] == "fwd" and r["dtype"] == "bfloat16"]
    if big:
        best = max(big, key=lambda r: r["TFLOPs"])
        targets.append(dict(target="forward non-causal bf16 d128 at 16k >= 475 TFLOP/s", value=f"{best['provider']} {best['TFLOPs']:.0f}", met=best["TFLOPs"] >= 475))
    dec = [r for r in timed if r["kind"] == "decode" and r["provider"].startswith("lmkern-") and r["seqlen"] == 32768]
    if dec:
        best = max(dec, key=lambda r: r["GBps"])
        targets.append(dict(target="decode at 32k context >= 80% of copy bandwidth",
                            value=f"{best['provider']} B={best['batch']} {best['pct_copy']:.0f}%", met=best["pct_copy"] >= 80))
    return targets


def table(payload: dict) -> str:
    res = payload["results"]
    providers = list(dict.fromkeys(r["provider"] for r in res))
    lines = []
    pre = [r for r in res if r["kind"] == "prefill"]
    if pre:
        lines += ["Prefill, TFLOP/s (ms):", "",
                  "| pass | B | H | S | D | dtype | causal | " + " | ".join(providers) + " |",
                  "|" + "---|" * (7 + len(providers))]
        for key in dict.fromkeys(_key(r) for r in pre):
            cells = {r["provider"]: r for r in pre if _key(r) == key}
            row = [f"{cells[p]['TFLOPs']:.3g} ({cells[p]['ms']:.3g})" if p in cells and "ms" in cells[p] else "-" for p in providers]
            lines.append(f"| {key[8]} | {key[1]} | {key[2]} | {key[4]} | {key[5]} | {key[6]} | {key[7]} | " + " | ".join(row) + " |")
    dec = [r for r in res if r["kind"] == "decode"]
    if dec:
        dprov = list(dict.fromkeys(r["provider"] for r in dec))
        lines += ["", "Decode (1 query per sequence), GB/s of K/V read (ms):", "",
                  "| B | Hq/Hkv | L | D | dtype | " + " | ".join(dprov) + " |", "|" + "---|" * (5 + len(dprov))]
        for key in dict.fromkeys(_key(r) for r in dec):
            cells = {r["provider"]: r for r in dec if _key(r) == key}
            row = [f"{cells[p]['GBps']:.1f} ({cells[p]['ms']:.3g})" if p in cells and "ms" in cells[p] else "-" for p in dprov]
            lines.append(f"| {key[1]} | {key[2]}/{key[3]} | {key[4]} | {key[5]} | {key[6]} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(payload: dict, plt, description: str):
    """Prefill TFLOP/s against sequence length, one panel per (pass, D, causal); lmkern solid."""
    res = [r for r in payload["results"] if r["kind"] == "prefill" and "ms" in r]
    panels = list(dict.fromkeys((r["direction"], r["head_dim"], r["causal"], r["dtype"]) for r in res))
    cols = max(1, min(4, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
    colors = {p: f"C{i}" for i, p in enumerate(dict.fromkeys(r["provider"] for r in res))}  # same color in every panel
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for i, (direction, D, causal, dtype) in enumerate(panels):
        ax = axes[i // cols][i % cols]
        sel = [r for r in res if (r["direction"], r["head_dim"], r["causal"], r["dtype"]) == (direction, D, causal, dtype)]
        for provider in dict.fromkeys(r["provider"] for r in sel):
            pts = sorted((r["seqlen"], r["TFLOPs"]) for r in sel if r["provider"] == provider)
            ax.plot(*zip(*pts), "-" if provider.startswith("lmkern") else "--", marker="o", label=provider, color=colors[provider])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{direction} D={D} causal={causal} {dtype}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(description)
    fig.tight_layout()
    return fig
