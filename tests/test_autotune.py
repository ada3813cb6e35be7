"""The launch-config tuner of the Triton kernels (lmkern/kernels/autotune.py): which config it
picks, when it measures, and that the attention launchers launch what it picks.

On CPU the measuring is stood in for (measure_ms and _can_measure patched): the logic is the
same on a GPU, where test_tuning_on_the_gpu measures for real."""

from __future__ import annotations

import math

import pytest
import torch

from lmkern import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_TRITON, reason=f"no Triton: {_ext.TRITON_ERROR}")

if _ext.HAS_TRITON:
    from triton.runtime.errors import OutOfResources

    from lmkern.kernels import attention as kernels
    from lmkern.kernels import autotune


@pytest.fixture
def tuner(monkeypatch):
    """autotune with a fresh cache, measuring on (any device), and fake timings: a config's time
    is looked up in the returned dict (missing: 1.0 ms); runs counts every launch it times."""
    autotune.reset()
    monkeypatch.setenv("LMKERN_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "_can_measure", lambda probe: True)
    times, runs = {}, []

    def fake_measure(run):
        return run()

    def run_for(config):
        runs.append(config)
        if times.get(config) == "oom":
            raise OutOfResources(1 << 20, 1 << 18, "shared memory")
        return times.get(config, 1.0)

    monkeypatch.setattr(autotune, "measure_ms", fake_measure)
    yield autotune, times, runs, run_for
    autotune.reset()


PROBE = torch.empty(1)


def test_picks_the_fastest_and_remembers_it(tuner):
    at, times, runs, run = tuner
    times.update({"a": 3.0, "b": 0.5, "c": 2.0})
    assert at.choose("k", ["a", "b", "c"], run, PROBE) == "b"
    assert runs == ["a", "b", "c"]
    assert at.choose("k", ["a", "b", "c"], run, PROBE) == "b"
    assert runs == ["a", "b", "c"], "a second call with the key measures nothing"
    times.update({"a": 0.1})
    assert at.choose("other key", ["a", "b", "c"], run, PROBE) == "a"
    assert "'b'" in at.chosen()[repr(("k", "cpu"))]["config"]


def test_skips_configs_the_gpu_cannot_launch(tuner):
    at, times, runs, run = tuner
    times.update({"a": 2.0, "b": "oom", "c": 1.0})
    assert at.choose("k", ["a", "b", "c"], run, PROBE) == "c"
    ms = dict(at.chosen()[repr(("k", "cpu"))]["ms"])
    assert math.isinf(ms["'b'"]) and ms["'c'"] == 1.0


def test_nothing_launches_gives_the_default_unremembered(tuner):
    at, times, runs, run = tuner
    times.update({"a": "oom", "b": "oom"})
    assert at.choose("k", ["a", "b"], run, PROBE) == "a"
    assert at.choose("k", ["a", "b"], run, PROBE) == "a"
    assert runs == ["a", "b", "a", "b"], "a failed tuning is not cached"


def test_other_errors_are_not_swallowed(tuner):
    at, times, runs, _ = tuner

    def broken(config):
        raise RuntimeError("a real bug")

    with pytest.raises(RuntimeError, match="a real bug"):
        at.choose("k", ["a", "b"], broken, PROBE)


def test_default_without_measuring(tuner, monkeypatch):
    at, times, runs, run = tuner
    times.update({"a": 3.0, "b": 0.5})
    assert at.choose("one", ["a"], run, PROBE) == "a" and runs == [], "one candidate: nothing to measure"
    monkeypatch.setenv("LMKERN_AUTOTUNE", "0")
    assert at.choose("k", ["a", "b"], run, PROBE) == "a" and runs == []
    monkeypatch.setenv("LMKERN_AUTOTUNE", "1")
    monkeypatch.setattr(at, "_can_measure", lambda probe: False)  # fake/CPU tensors, graph capture
    assert at.choose("k", ["a", "b"], run, PROBE) == "a" and runs == []
    monkeypatch.setattr(at, "_can_measure", lambda probe: True)
    assert at.choose("k", ["a", "b"], run, PROBE) == "b"
    monkeypatch.setattr(at, "_can_measure", lambda probe: False)
    assert at.choose("k", ["a", "b"], run, PROBE) == "b", "what was measured is kept where nothing can be"


def test_untimed_launches_only_allowed_configs(tuner, monkeypatch):
    """Where nothing can be measured (torch.compile tracing), a measured choice that is not
    allowed untimed (a TMA tile) gives way to the fastest measured allowed one, else the default."""
    at, times, runs, run = tuner
    times.update({"a": 3.0, "tma": 0.5, "b": 1.0})
    allowed = lambda c: c != "tma"  # noqa: E731
    assert at.choose("k", ["a", "tma", "b"], run, PROBE, untimed_ok=allowed) == "tma"
    monkeypatch.setattr(at, "_can_measure", lambda probe: False)
    assert at.choose("k", ["a", "tma", "b"], run, PROBE, untimed_ok=allowed) == "b"
    assert at.choose("new", ["a", "tma", "b"], run, PROBE, untimed_ok=allowed) == "a"
    monkeypatch.setattr(at, "_can_measure", lambda probe: True)
    assert at.choose("k", ["a", "tma", "b"], run, PROBE, untimed_ok=allowed) == "tma"


def test_no_tma_on_cpu_tensors():
    assert not kernels._tma_addressable(torch.empty(2, 8, 2, 64, dtype=torch.float16))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="TMA needs an sm_90+ GPU")
def test_tma_only_where_descriptors_can_address_the_tensors():
    x = torch.empty(2, 64, 4, 64, dtype=torch.float16, device="cuda")
    assert kernels._tma_addressable(x, x)
    assert not kernels._tma_addressable(x, torch.empty(2, 64, 4, 36, dtype=torch.float16, device="cuda"))  # 72-byte rows
    assert not kernels._tma_addressable(torch.empty(2, 64, 4, 72, dtype=torch.float16, device="cuda")[..., 1:])


def test_measurable_only_on_real_cuda_tensors():
    assert not autotune._can_measure(torch.empty(2))
    assert not autotune._can_measure(torch.empty(2, device="meta"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(2)
    assert not autotune._can_measure(fake)


def test_bucket():
    assert [autotune.bucket(n) for n in (0, 1, 2, 3, 64, 65, 1000)] == [1, 1, 2, 4, 64, 128, 1024]
    assert autotune.bucket(100_000) == 1 << 14 and autotune.bucket(5000, cap=1024) == 1024


@pytest.mark.skipif(not _ext.TRITON_INTERPRET and not torch.cuda.is_available(), reason="needs a GPU or TRITON_INTERPRET=1")
def test_attention_launchers_launch_the_chosen_tile(tuner, monkeypatch):
    """The forward, backward and decode launchers each time their candidates and then launch the
    fastest (here the second one), which still gives the right answer."""
    at, times, runs, _ = tuner
    device = "cuda" if torch.cuda.is_available() and not _ext.TRITON_INTERPRET else "cpu"
    fwd = (kernels.Tile(16, 16, 4, 1), kernels.Tile(32, 16, 4, 1))
    dkdv = (kernels.Tile(16, 16, 4, 1), kernels.Tile(16, 32, 4, 1))
    dq = (kernels.Tile(16, 16, 4, 1), kernels.Tile(32, 16, 4, 1))
    dec = (kernels.DecodeTile(16, 4, 1), kernels.DecodeTile(32, 4, 1))
    monkeypatch.setattr(kernels, "fwd_tiles", lambda D, dtype, cpu, tma=False, varlen=False, bias=False: fwd)
    monkeypatch.setattr(kernels, "bwd_tiles", lambda D, dtype, cpu: (dkdv, dq))
    monkeypatch.setattr(kernels, "decode_tiles", lambda D, dtype, cpu: dec)
    launched = []
    real_wrap = kernels.wrap_triton

    def spy(kernel):
        wrapped = real_wrap(kernel)

        def grid(g):
            def call(*args, **kw):
                launched.append((kernel.__name__, kw.get("BLOCK_M"), kw["BLOCK_N"] if "BLOCK_N" in kw else None))
                return wrapped[g](*args, **kw)
            return call
        return type("Spy", (), {"__getitem__": lambda self, g: grid(g)})()

    monkeypatch.setattr(kernels, "wrap_triton", spy)
    second = {"_attn_fwd_kernel": (32, 16), "_attn_bwd_dkdv_kernel": (16, 32), "_attn_bwd_dq_kernel": (32, 16),
              "_attn_decode_split_kernel": (None, 32)}

    def measure(run):  # the second candidate of each list measures fastest
        start = len(launched)
        run()
        name, block_m, block_n = [x for x in launched[start:] if x[0] in second][-1]
        want_m, want_n = second[name]
        return 1.0 if block_n == want_n and want_m in (None, block_m) else 2.0

    monkeypatch.setattr(at, "measure_ms", measure)

    q, k, v = (torch.randn(1, 40, 2, 32, device=device) for _ in range(3))
    out, lse, stats = torch.empty_like(q), torch.empty(1, 2, 40, device=device), torch.empty(2, 1, 2, 40, device=device)
    kernels.attention_fwd(q, k, v, None, None, None, None, 40, 40, True, False, 32**-0.5, out, lse, stats)
    assert launched == [("_attn_fwd_kernel", 16, 16), ("_attn_fwd_kernel", 32, 16), ("_attn_fwd_kernel", 32, 16)]
    ref = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)

    launched.clear()
    grads = [torch.empty_like(x) for x in (q, k, v)]
    kernels.attention_bwd(torch.ones_like(q), q, k, v, out, stats, None, None, None, None, 40, 40, True, False,
                          32**-0.5, *grads)
    names = [x[0] for x in launched]
    assert names.count("_attn_bwd_dkdv_kernel") == 3 and names.count("_attn_bwd_dq_kernel") == 3  # 2 timed, 1 real
    final = {name: (bm, bn) for name, bm, bn in launched}  # each kernel's last launch: the real one
    assert final["_attn_bwd_dkdv_kernel"] == (16, 32) and final["_attn_bwd_dq_kernel"] == (32, 16)
    qr, kr, vr = (x.detach().clone().transpose(1, 2).requires_grad_() for x in (q, k, v))
    torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, is_causal=True).sum().backward()
    for got, want in zip(grads, (qr, kr, vr)):
        torch.testing.assert_close(got, want.grad.transpose(1, 2), atol=1e-4, rtol=1e-4)

    launched.clear()
    cache_len = torch.tensor([40], dtype=torch.int32, device=device)
    out1, lse1 = torch.empty_like(q[:, :1]), torch.empty(1, 2, 1, device=device)
    kernels.attention_decode(q[:, -1:].contiguous(), k, v, cache_len, True, 32**-0.5, 0, out1, lse1)
    assert [x for x in launched if x[0] == "_attn_decode_split_kernel"][-1][2] == 32
    torch.testing.assert_close(out1, out[:, -1:], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available() or _ext.TRITON_INTERPRET, reason="needs a GPU (measures for real)")
def test_tuning_on_the_gpu(monkeypatch):
    """On a GPU, with tuning on: the forward measures its candidates once per key, records them,
    and its answer matches the default tile's."""
    autotune.reset()
    monkeypatch.setenv("LMKERN_AUTOTUNE", "1")
    q, k, v = (torch.randn(2, 512, 8, 128, device="cuda", dtype=torch.float16) for _ in range(3))
    out, lse, stats = torch.empty_like(q), torch.empty(2, 8, 512, device="cuda"), torch.empty(2, 2, 8, 512, device="cuda")
    kernels.attention_fwd(q, k, v, None, None, None, None, 512, 512, True, False, 128**-0.5, out, lse, stats)
    tuned = autotune.chosen()
    assert len(tuned) == 1
    (entry,) = tuned.values()
    assert len(entry["ms"]) == len(kernels.fwd_tiles(128, torch.float16, cpu=False, tma=kernels._tma_addressable(q, k, v)))
    assert all(ms > 0 for _, ms in entry["ms"])
    want, want_lse = torch.empty_like(q), torch.empty_like(lse)
    kernels.attention_fwd(q, k, v, None, None, None, None, 512, 512, True, False, 128**-0.5, want, want_lse,
                          torch.empty_like(stats), tile=kernels.fwd_tiles(128, torch.float16, cpu=False)[0])
    torch.testing.assert_close(out, want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-4)
    autotune.reset()
