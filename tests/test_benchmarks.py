"""The benchmark plumbing a GPU lease depends on: a suite cut by its time budget keeps the rows it
measured, marked partial, and its tables and targets still come out (tests of the harness, not
timings)."""

import os
import sys
import time
import types

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_attention  # noqa: E402
import bench_norm  # noqa: E402
import bench_sampling  # noqa: E402
import harness  # noqa: E402


def _fake_suite(n_rows, closed):
    def measurements(device, quick, copy_gbps, log=print):
        try:
            for i in range(n_rows):
                yield {"i": i}
        finally:
            closed.append(True)

    def summarize(device, rows, copy_gbps):
        return {"copy_GBps": copy_gbps, "results": rows}

    return types.SimpleNamespace(measurements=measurements, summarize=summarize)


@pytest.fixture
def no_copy_measurement(monkeypatch):
    monkeypatch.setattr(harness, "copy_bandwidth_gbps", lambda device: 10.0)


def test_run_suite_without_deadline_measures_everything(no_copy_measurement):
    closed = []
    payload = harness.run_suite(_fake_suite(5, closed), "cpu", log=lambda *a: None)
    assert [r["i"] for r in payload["results"]] == [0, 1, 2, 3, 4]
    assert "partial" not in payload and closed == [True]


def test_run_suite_stops_at_the_deadline_and_marks_the_payload_partial(no_copy_measurement):
    closed = []
    payload = harness.run_suite(_fake_suite(5, closed), "cpu", log=lambda *a: None, deadline=time.monotonic() - 1)
    assert [r["i"] for r in payload["results"]] == [0]  # the row in flight is kept, no new one starts
    assert "1 rows" in payload["partial"]
    assert closed == [True]  # the generator was closed, not left suspended


def _prefill_row(provider, S, D, causal, direction, ms):
    return dict(kind="prefill", provider=provider, batch=16384 // S, heads=2048 // D, seqlen=S, head_dim=D,
                dtype="bfloat16", causal=causal, direction=direction, ms=ms, TFLOPs=1.0 / ms)


def test_attention_summary_restores_table_order_and_judges_only_what_ran():
    # measured in the GPU priority order (16k d128 first), summarized in the shape list's order
    rows = [
        _prefill_row("lmkern-triton", 16384, 128, False, "fwd", 1.0),
        _prefill_row("torch-sdpa-flash", 16384, 128, False, "fwd", 2.0),
        _prefill_row("lmkern-triton", 512, 64, False, "fwd+bwd", 3.0),
        _prefill_row("lmkern-triton", 512, 64, False, "fwd", 1.0),
    ]
    payload = bench_attention.summarize("cuda", rows, copy_gbps=1000.0)
    order = [(r["seqlen"], r["head_dim"], r["direction"]) for r in payload["results"]]
    assert order == [(512, 64, "fwd"), (512, 64, "fwd+bwd"), (16384, 128, "fwd"), (16384, 128, "fwd")]
    assert [r["provider"] for r in payload["results"]][2:] == ["lmkern-triton", "torch-sdpa-flash"]
    compared = [t for t in payload["targets"] if "best torch SDPA" in t["target"]]
    assert len(compared) == 1 and compared[0]["met"]  # 512 has no torch row: no verdict for it
    assert "| fwd | 1 | 16 | 16384 | 128 | bfloat16 | False | 1 (1) | 0.5 (2) |" in bench_attention.table(payload)


def test_attention_measures_the_targets_shapes_first_on_cuda(monkeypatch):
    seen = []

    def fake_prefill(provider, contexts, B, H, S, D, dtype, causal, backward, device):
        seen.append(("prefill", S, D, causal, provider, backward))
        return dict(ms=1.0, TFLOPs=1.0)

    def fake_decode(provider, contexts, B, Hq, Hkv, L, D, dtype, device):
        seen.append(("decode", L, provider, B))
        return dict(ms=1.0, GBps=1.0)

    monkeypatch.setattr(bench_attention, "measure_prefill", fake_prefill)
    monkeypatch.setattr(bench_attention, "measure_decode", fake_decode)
    monkeypatch.setattr(bench_attention, "_sdpa_backends", lambda device: {})
    monkeypatch.setattr(harness, "lmkern_backends", lambda device: ["triton"])
    list(bench_attention.measurements("cuda", False, 1000.0, log=lambda *a: None))
    first_decode = next(i for i, s in enumerate(seen) if s[0] == "decode")
    assert first_decode > 0 and all(s[:4] == ("prefill", 16384, 128, False) for s in seen[:first_decode])
    assert seen[first_decode][:2] == ("decode", 32768)
    ours = [s for s in seen if "lmkern-triton" in s]
    n_prefill = len(bench_attention.prefill_shapes("cuda", False)) * 2  # forward, forward + backward
    n_decode = len(bench_attention.decode_shapes("cuda", False))
    assert len(ours) == len(set(ours)) == n_prefill + n_decode  # every shape still measured, once


def test_sampling_and_norm_targets_skip_rows_without_their_baseline():
    ours = dict(provider="lmkern-cpu", batch=32, vocab=128256, filters="top-k 50 + top-p 0.9", ms=1.0, us=1e3, GBps=1.0)
    payload = bench_sampling.summarize("cpu", [ours], 10.0)
    assert payload["targets"] == []  # no torch-sort row: no verdict rather than a false "not met"
    with_base = [dict(ours), dict(ours, provider="torch-sort", ms=100.0, us=1e5)]
    (target,) = bench_sampling.summarize("cpu", with_base, 10.0)["targets"]
    assert target["met"] and target["value"] == 100.0
    assert bench_sampling.grid("cuda", False)[0] == bench_sampling.TARGET_SHAPE

    row = dict(op="rms_norm", provider="lmkern-cpu", dtype="float32", hidden=4096, mode="fwd", ms=1.0, GBps=1.0)
    assert bench_norm.summarize("cpu", [row], 10.0)["targets"] == []
