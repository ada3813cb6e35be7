"""lmkern.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same weights.

Every comparison runs both modules on the same fresh random inputs (tests/conftest.py seeds each
test) and compares outputs and the gradients of inputs and parameters. Masks are drawn so that
every query row keeps at least one key, except in the test of fully masked rows, where lmkern
returns zeros (torch may return NaN).
"""

import inspect

import pytest
import torch

import lmkern
import lmkern.nn

E, H = 16, 4
N, L, S = 3, 5, 7


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one intra-op thread. With a second thread on a busy 2-core machine every small
    op waits on OpenMP synchronization (measured: ~60x slower generate())."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

CONFIGS = {
    "default": dict(),
    "kdim_vdim": dict(kdim=8, vdim=12),
    "bias_kv": dict(add_bias_kv=True),
    "zero_attn": dict(add_zero_attn=True),
    "bias_kv_zero_attn_nobias": dict(add_bias_kv=True, add_zero_attn=True, bias=False),
    "no_bias": dict(bias=False),
}

# mask name -> (attn_mask kind, key_padding_mask kind, is_causal)
MASKS = {
    "none": (None, None, False),
    "attn_bool": ("bool", None, False),
    "attn_float": ("float", None, False),
    "attn_bool_3d": ("bool3d", None, False),
    "attn_float_3d": ("float3d", None, False),
    "kpm_bool": (None, "bool", False),
    "kpm_float": (None, "float", False),
    "both_bool": ("bool", "bool", False),
    "both_float": ("float", "float", False),
    "causal_bool": ("causal_bool", None, True),
    "causal_float_kpm": ("causal_float", "bool", True),
}


def _seed() -> int:
    """A seed drawn from the test's own (fresh) RNG, to build two modules from the same draw."""
    return int(torch.randint(0, 2**31 - 1, ()))


def make_pair(seed=None, **kwargs):
    """(torch module, lmkern module) with identical weights, biases drawn non-zero."""
    t = torch.nn.MultiheadAttention(E, H, **kwargs)
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, 0.5)
    m = lmkern.nn.MultiheadAttention(E, H, **kwargs)
    m.load_state_dict(t.state_dict())
    return t, m


def make_mask(kind, batch, Lq, Sk):
    """A mask in torch.nn.MultiheadAttention's convention (bool: True = masked; float: additive)
    that leaves key 0 visible to every query, so no row is fully masked."""
    if kind is None:
        return None
    if kind.startswith("causal"):
        m = torch.ones(Lq, Sk, dtype=torch.bool).triu(1)
    else:
        shape = (Lq, Sk) if not kind.endswith("3d") else (batch * H, Lq, Sk)
        m = torch.rand(shape) < 0.4
    m[..., 0] = False
    if kind.startswith("float") or kind == "causal_float":
        return torch.randn(m.shape).masked_fill(m, float("-inf"))
    return m


def make_kpm(kind, batch, Sk):
    if kind is None:
        return None
    m = torch.rand(batch, Sk) < 0.4
    m[:, 0] = False
    if kind == "float":
        return torch.randn(m.shape).masked_fill(m, float("-inf"))
    return m


def inputs(batch_first, kdim=E, vdim=E, batched=True, self_attention=False):
    q = torch.randn(N, L, E)
    if self_attention:
        k = v = q
    else:
        k, v = torch.randn(N, S, kdim), torch.randn(N, S, vdim)
    if not batched:
        return q[0], k[0], v[0]
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    return q, k, v


def run_both(t, m, q, k, v, **kw):
    """Outputs and gradients (inputs, then parameters) of both modules on the same inputs."""
    results = []
    g = None
    for mod in (t, m):
        mod.zero_grad()
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        if q is k and k is v:
            kk = vv = qq  # keep self-attention identity
        elif k is v:
            vv = kk
        out, w = mod(qq, kk, vv, **kw)
        if g is None:
            g = torch.randn_like(out)
        out.backward(g)
        grads = [x.grad for x in (qq, kk, vv)] + [p.grad for p in mod.parameters()]
        results.append((out, w, grads))
    return results


def assert_same(results, atol=1e-5, rtol=1e-5):
    (ot, wt, gt), (om, wm, gm) = results
    torch.testing.assert_close(om, ot, atol=atol, rtol=rtol)
    if wt is None:
        assert wm is None
    else:
        torch.testing.assert_close(wm, wt, atol=atol, rtol=rtol)
    for a, b in zip(gm, gt):
        if b is None:
            assert a is None or not a.any()
        else:
            # A weight gradient sums terms as large as its largest entry (up to ~70 here), so
            # float32 rounds every entry at that scale, torch's and lmkern's differently (~1e-6 of
            # it each, against float64): a flat atol of 1e-4 failed about 1 call in 4000.
            atol = max(1e-4, 1e-5 * b.abs().max().item())
            torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


# ----------------------------------------------------------------------------- module surface


def test_constructor_signature_and_subclass():
    assert inspect.signature(lmkern.nn.MultiheadAttention.__init__) == inspect.signature(torch.nn.MultiheadAttention.__init__)
    def params(f):  # names, kinds and defaults (annotations are spelled differently)
        return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

    assert params(lmkern.nn.MultiheadAttention.forward) == params(torch.nn.MultiheadAttention.forward)
    assert issubclass(lmkern.nn.MultiheadAttention, torch.nn.MultiheadAttention)


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("batch_first", [False, True])
def test_init_names_and_state_dict_round_trip(config, batch_first):
    kwargs = dict(CONFIGS[config], batch_first=batch_first, dropout=0.1)
    seed = _seed()
    torch.manual_seed(seed)
    t = torch.nn.MultiheadAttention(E, H, **kwargs)
    torch.manual_seed(seed)
    m = lmkern.nn.MultiheadAttention(E, H, **kwargs)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in t.named_parameters()]
    assert list(m.state_dict()) == list(t.state_dict())
    for (_, p), (_, r) in zip(m.named_parameters(), t.named_parameters()):
        assert torch.equal(p, r)  # same initialization from the same RNG state
    assert repr(m).replace("lmkern.nn.", "") == repr(t)
    for attr in ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "dropout", "batch_first", "add_zero_attn", "_qkv_same_embed_dim"):
        assert getattr(m, attr) == getattr(t, attr)
    # trained torch weights into lmkern, and lmkern's back into a fresh torch module
    with torch.no_grad():
        for p in t.parameters():
            p.normal_()
    m.load_state_dict(t.state_dict())
    t2 = torch.nn.MultiheadAttention(E, H, **kwargs)
    t2.load_state_dict(m.state_dict())
    for (n, p), (_, r) in zip(t2.state_dict().items(), t.state_dict().items()):
        assert torch.equal(p, r), n


# ----------------------------------------------------------------------------- outputs and gradients


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch's, for the mixed-mask case
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("batch_first", [False, True])
def test_outputs_and_gradients_match_torch(config, batch_first):
    kw = CONFIGS[config]
    t, m = make_pair(batch_first=batch_first, **kw)
    q, k, v = inputs(batch_first, kw.get("kdim", E), kw.get("vdim", E))
    for name, (am_kind, kpm_kind, causal) in MASKS.items():
        Lq, Sk = (L, L) if causal else (L, S)
        qq, kk, vv = q, k, v
        if causal:  # causal self-attention over the query sequence
            if "kdim" in kw:
                continue
            qq = kk = vv = q
        am = make_mask(am_kind, N, Lq, Sk)
        kpm = make_kpm(kpm_kind, N, Sk)
        res = run_both(t, m, qq, kk, vv, attn_mask=am, key_padding_mask=kpm, need_weights=False, is_causal=causal)
        try:
            assert_same(res)
        except AssertionError as e:
            raise AssertionError(f"masks {name}: {e}") from None


@pytest.mark.parametrize("config", ["default", "bias_kv_zero_attn_nobias", "kdim_vdim"])
@pytest.mark.parametrize("mask", ["none", "attn_bool", "attn_float_3d", "both_bool", "kpm_float"])
def test_unbatched_inputs(config, mask):
    kw = CONFIGS[config]
    t, m = make_pair(batch_first=True, **kw)
    q, k, v = inputs(True, kw.get("kdim", E), kw.get("vdim", E), batched=False)
    am_kind, kpm_kind, _ = MASKS[mask]
    am = make_mask(am_kind, 1, L, S)
    kpm = make_kpm(kpm_kind, 1, S)
    kpm = None if kpm is None else kpm[0]
    res = run_both(t, m, q, k, v, attn_mask=am, key_padding_mask=kpm, need_weights=False)
    assert res[1][0].shape == (L, E)
    assert_same(res)


@pytest.mark.parametrize("mask", ["none", "kpm_bool", "attn_bool"])
def test_eval_mode_and_torch_fast_path(mask):
    """In eval without grad, torch's self-attention takes its native fast path: same outputs."""
    t, m = make_pair(batch_first=True, dropout=0.3)
    t.eval()
    m.eval()
    x = torch.randn(N, L, E)
    am_kind, kpm_kind, _ = MASKS[mask]
    am, kpm = make_mask(am_kind, N, L, L), make_kpm(kpm_kind, N, L)
    with torch.no_grad():
        for call in range(2):  # eval: no dropout, deterministic
            out, w = m(x, x, x, attn_mask=am, key_padding_mask=kpm, need_weights=False)
            ref, _ = t(x, x, x, attn_mask=am, key_padding_mask=kpm, need_weights=False)
            assert w is None
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("config", ["default", "bias_kv_zero_attn_nobias"])
def test_need_weights_falls_back_to_torch(average, config):
    kw = CONFIGS[config]
    t, m = make_pair(batch_first=False, **kw)
    q, k, v = inputs(False)
    am, kpm = make_mask("float", N, L, S), make_kpm("float", N, S)
    res = run_both(t, m, q, k, v, attn_mask=am, key_padding_mask=kpm, average_attn_weights=average)
    Sk = S + int(kw.get("add_bias_kv", False)) + int(kw.get("add_zero_attn", False))
    assert res[1][1].shape == ((N, L, Sk) if average else (N, H, L, Sk))
    assert_same(res)
    # need_weights is torch's default: a plain call returns the weights too
    out, w2 = m(q, k, v)
    assert w2 is not None


def test_causal_hint_needs_mask_like_torch():
    t, m = make_pair(batch_first=True)
    x = torch.randn(N, L, E)
    for mod in (t, m):
        with pytest.raises(RuntimeError, match="Need attn_mask"):
            mod(x, x, x, is_causal=True, need_weights=False)


def test_mask_shape_errors_like_torch():
    t, m = make_pair(batch_first=True)
    q, k, v = inputs(True)
    bad = torch.zeros(L, L, dtype=torch.bool)
    for mod in (t, m):
        with pytest.raises(RuntimeError, match="2D attn_mask"):
            mod(q, k, v, attn_mask=bad, need_weights=False)
        with pytest.raises(RuntimeError, match="3D attn_mask"):
            mod(q, k, v, attn_mask=torch.zeros(N, L, S, dtype=torch.bool), need_weights=False)


def test_fully_masked_rows_are_zero_not_nan():
    """A batch element whose keys are all padding: lmkern's attention gives zeros there (so the
    output is out_proj.bias), with finite gradients; the other elements match torch."""
    t, m = make_pair(batch_first=True)
    q, k, v = inputs(True)
    kpm = make_kpm("bool", N, S)
    kpm[1] = True  # element 1 may attend nothing
    am = make_mask("bool", N, L, S)
    am[3] = True  # query row 3 of every element attends nothing
    res = run_both(t, m, q, k, v, attn_mask=am, key_padding_mask=kpm, need_weights=False)
    out = res[1][0]
    assert not out.isnan().any()
    bias = m.out_proj.bias.detach()
    torch.testing.assert_close(out[1], bias.expand(L, E))
    torch.testing.assert_close(out[:, 3], bias.expand(N, E))
    assert all(g is None or torch.isfinite(g).all() for g in res[1][2])
    live = [0, 2]
    rows = [0, 1, 2, 4]
    torch.testing.assert_close(out[live][:, rows], res[0][0][live][:, rows], atol=1e-5, rtol=1e-5)


def test_dropout_in_training():
    """Dropout acts only in training: replaying the RNG state reproduces a call, and averaged over
    many draws the output is the dropout-free one (dropout is unbiased)."""
    _, m = make_pair(batch_first=True, dropout=0.5)
    q, k, v = inputs(True)
    m.eval()
    with torch.no_grad():
        ref, _ = m(q, k, v, need_weights=False)
        m.train()
        state = torch.get_rng_state()
        a, _ = m(q, k, v, need_weights=False)
        torch.set_rng_state(state)
        b, _ = m(q, k, v, need_weights=False)
        assert torch.equal(a, b)
        assert not torch.allclose(a, ref)
        n = 400  # independent draws in one call: the batch repeated n times
        rep = [x.repeat(n, 1, 1) for x in (q, k, v)]
        draws = m(*rep, need_weights=False)[0].view(n, N, L, E)
    mean, sem = draws.mean(0), draws.std(0) / n**0.5
    assert ((mean - ref).abs() <= 6 * sem + 1e-5).all()
    # p = 1 drops everything, as torch does: the output is the projection bias
    m.dropout = 1.0
    with torch.no_grad():
        torch.testing.assert_close(m(q, k, v, need_weights=False)[0], m.out_proj.bias.expand(N, L, E))


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
def test_each_backend_matches_torch(device_backend):
    """The module on every backend this installation has (auto picks only one of them)."""
    device, backend = device_backend
    t, m = make_pair(batch_first=True, add_zero_attn=True, device=device)
    m.backend = backend
    q, k, v = (x.to(device) for x in inputs(True))
    am = make_mask("float", N, L, S).to(device)
    kpm = make_kpm("bool", N, S).to(device)
    try:
        res = run_both(t, m, q, k, v, attn_mask=am, key_padding_mask=kpm, need_weights=False)
    except lmkern.BackendError as e:
        pytest.skip(f"{backend} does not run these inputs: {e}")
    assert_same(res)


def test_backend_attribute_is_used():
    _, m = make_pair(batch_first=True)
    m.backend = "no-such-backend"
    q, k, v = inputs(True)
    with pytest.raises(ValueError):
        m(q, k, v, need_weights=False)
    m.backend = "reference"
    m(q, k, v, need_weights=False)


def test_inside_transformer_encoder_layer():
    """Swapping the class of a TransformerEncoderLayer's self_attn keeps its outputs and gradients."""
    layer = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True)
    x = torch.randn(N, L, E, requires_grad=True)
    kpm = make_kpm("bool", N, L)
    ref = layer(x, src_key_padding_mask=kpm)
    (gref,) = torch.autograd.grad(ref.sum(), x)
    layer.self_attn.__class__ = lmkern.nn.MultiheadAttention
    out = layer(x, src_key_padding_mask=kpm)
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, gref, atol=1e-4, rtol=1e-4)
