"""lmkern.nn drop-ins: same constructor, parameters, init, repr and state_dict as torch's; and lmkern.patch."""

import importlib
import inspect

import pytest
import torch

import lmkern
import lmkern.nn

PAIRS = [(lmkern.nn.LayerNorm, torch.nn.LayerNorm), (lmkern.nn.RMSNorm, torch.nn.RMSNorm)]
CTOR_ARGS = {
    torch.nn.LayerNorm: [dict(), dict(eps=1e-6), dict(elementwise_affine=False), dict(bias=False)],
    torch.nn.RMSNorm: [dict(), dict(eps=1e-6), dict(elementwise_affine=False)],
}


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_constructor_signature_identical(ours, theirs):
    assert inspect.signature(ours.__init__) == inspect.signature(theirs.__init__)
    fused = lmkern.nn.FusedAddLayerNorm if theirs is torch.nn.LayerNorm else lmkern.nn.FusedAddRMSNorm
    assert inspect.signature(fused.__init__) == inspect.signature(theirs.__init__)


@pytest.mark.parametrize("ours,theirs", PAIRS)
@pytest.mark.parametrize("shape", [64, (4, 16)])
def test_init_repr_state_dict_and_outputs(ours, theirs, shape, device_backend):
    device, backend = device_backend
    for kwargs in CTOR_ARGS[theirs]:
        torch.manual_seed(1)
        t = theirs(shape, device=device, **kwargs)
        torch.manual_seed(1)
        m = ours(shape, device=device, **kwargs)
        m.backend = backend
        assert isinstance(m, theirs)
        assert m.extra_repr() == t.extra_repr()
        assert [n for n, _ in m.named_parameters()] == [n for n, _ in t.named_parameters()]
        for (_, p), (_, q) in zip(m.named_parameters(), t.named_parameters()):
            assert torch.equal(p, q)  # same initialization
        # trained torch weights load into lmkern's module and back
        with torch.no_grad():
            for p in t.parameters():
                p.normal_()
        m.load_state_dict(t.state_dict())
        assert list(m.state_dict()) == list(t.state_dict())
        t2 = theirs(shape, device=device, **kwargs)
        t2.load_state_dict(m.state_dict())
        x = torch.randn(3, 5, *((shape,) if isinstance(shape, int) else shape), device=device)
        torch.testing.assert_close(m(x), t(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t2(x), t(x))


def test_rms_norm_module_default_eps_is_none():
    assert lmkern.nn.RMSNorm(8).eps is None


@pytest.mark.parametrize("fused,plain", [(lmkern.nn.FusedAddLayerNorm, torch.nn.LayerNorm), (lmkern.nn.FusedAddRMSNorm, torch.nn.RMSNorm)])
def test_fused_add_modules(fused, plain, device_backend):
    device, backend = device_backend
    m = fused(48, device=device)
    m.backend = backend
    ref = plain(48, device=device)
    with torch.no_grad():
        m.weight.normal_()
        ref.weight.copy_(m.weight)
    x = torch.randn(2, 7, 48, device=device)
    r = torch.randn(2, 7, 48, device=device)
    y, h = m(x, r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, ref(x + r), rtol=1e-5, atol=1e-5)


class LlamaRMSNorm(torch.nn.Module):
    """The Hugging Face Llama RMSNorm, as transformers writes it (weight, variance_epsilon)."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaRMSNorm(torch.nn.Module):
    """The Hugging Face Gemma RMSNorm: zero-initialized weight used as (1 + weight), attribute eps."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        output = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (output * (1.0 + self.weight.float())).type_as(x)


class Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.rms = torch.nn.RMSNorm(d, eps=1e-5)
        self.llama = LlamaRMSNorm(d)
        self.gemma = GemmaRMSNorm(d)
        self.proj = torch.nn.Linear(d, d)
        self.stack = torch.nn.Sequential(torch.nn.LayerNorm(d, bias=False), torch.nn.GELU())
        self.shared = self.ln  # the same module reachable twice

    def forward(self, x):
        return self.stack(self.proj(self.gemma(self.llama(self.rms(self.shared(self.ln(x)))))))


def test_patch_replaces_norms_and_keeps_outputs(device_backend):
    device, backend = device_backend
    torch.manual_seed(0)
    model = Block(32).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(4, 32, device=device)
    want = model(x)
    params_before = {n: p for n, p in model.named_parameters()}
    n = lmkern.patch(model)
    assert n == 5  # ln (shared counted once), rms, llama, gemma, stack.0
    assert isinstance(model.ln, lmkern.nn.LayerNorm) and model.shared is model.ln
    assert isinstance(model.rms, lmkern.nn.RMSNorm)
    assert isinstance(model.llama, lmkern.nn.HFRMSNorm) and model.llama.variance_epsilon == 1e-6
    assert isinstance(model.gemma, lmkern.nn.HFRMSNorm) and model.gemma.weight_offset == 1.0
    assert isinstance(model.stack[0], lmkern.nn.LayerNorm)
    for name, p in model.named_parameters():
        assert p is params_before[name], name  # the same Parameter objects
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
    assert lmkern.patch(model) == 0  # idempotent


def test_patch_llama_style_keeps_dtype_promotion():
    m = torch.nn.Sequential(LlamaRMSNorm(16))
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    want = m(x)  # float32 weight * bfloat16 -> float32
    lmkern.patch(m)
    got = m(x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


class Gemma3nRMSNorm(torch.nn.Module):
    """Gemma 3n's RMSNorm: Gemma's name and ``eps`` attribute, but ``weight * normalized`` (no 1 +)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).type_as(x)


class EpsOutsideRMSNorm(LlamaRMSNorm):
    """Llama's attributes, other math: eps added after the square root."""

    def forward(self, x):
        return self.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.variance_epsilon)


class CenteredRMSNorm(LlamaRMSNorm):
    """Llama's attributes, other math: the mean is taken out first (a LayerNorm by another name)."""

    def forward(self, x):
        return super().forward(x - x.mean(-1, keepdim=True))


class GatedRMSNorm(LlamaRMSNorm):
    """A second input that lmkern's module would not take."""

    def forward(self, x, gate=None):
        return super().forward(x if gate is None else x * torch.sigmoid(gate))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls,offset", [(LlamaRMSNorm, 0.0), (GemmaRMSNorm, 1.0), (Gemma3nRMSNorm, 0.0)])
def test_patch_recognizes_hf_rms_norms_by_their_math(cls, offset, dtype):
    """The weight offset and the output dtype (a float32 weight on bfloat16 input: promoted for
    Llama, the input's for Gemma) come from what the module computes, not from its name."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(cls(40, eps=1e-5))
    with torch.no_grad():
        m[0].weight.normal_(0, 0.5)
    x = torch.randn(3, 5, 40, dtype=dtype) * 3
    want = m(x)
    assert lmkern.patch(m) == 1
    assert isinstance(m[0], lmkern.nn.HFRMSNorm) and m[0].weight_offset == offset and m[0].eps == 1e-5
    got = m(x)
    assert got.dtype == want.dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("cls", [EpsOutsideRMSNorm, CenteredRMSNorm, GatedRMSNorm])
def test_patch_leaves_rms_norms_with_other_math_alone(cls):
    m = torch.nn.Sequential(cls(16))
    assert lmkern.patch(m) == 0 and type(m[0]) is cls


def test_patch_probes_meta_modules_without_touching_them():
    with torch.device("meta"):
        m = torch.nn.Sequential(Gemma3nRMSNorm(16), GemmaRMSNorm(16))
    assert lmkern.patch(m) == 2
    assert [x.weight_offset for x in m] == [0.0, 1.0] and all(x.weight.is_meta for x in m)
    m.to_empty(device="cpu")
    with torch.no_grad():
        for x in m:
            x.weight.normal_()
    ref = torch.nn.Sequential(Gemma3nRMSNorm(16), GemmaRMSNorm(16))
    ref.load_state_dict(m.state_dict())
    x = torch.randn(4, 16)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)


def _transformers_rms_norm_classes(transformers):
    """Every class named ...RMSNorm in transformers' modeling modules (imports them all)."""
    import pkgutil

    import transformers.models

    found = {}
    for info in pkgutil.iter_modules(transformers.models.__path__):
        name = f"transformers.models.{info.name}.modeling_{info.name}"
        try:
            module = importlib.import_module(name)
        except Exception:  # a model whose optional dependencies are missing here
            continue
        for cname, cls in vars(module).items():
            if cname.endswith("RMSNorm") and inspect.isclass(cls) and cls.__module__ == name:
                found[cname] = cls
    return found


def test_patch_matches_every_transformers_rms_norm():
    """Every RMSNorm class of the installed transformers that builds as cls(hidden): if patch
    replaces it, the replacement gives the same output and dtype (float32, and bfloat16 input on a
    float32 weight); the common families are among those replaced."""
    transformers = pytest.importorskip("transformers")
    classes = _transformers_rms_norm_classes(transformers)
    replaced = []
    for cname, cls in sorted(classes.items()):
        torch.manual_seed(0)
        try:
            m = torch.nn.Sequential(cls(48))
        except (TypeError, AttributeError):  # needs a config or more: not built like this here
            continue
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.3, 0.5)
        xs = [torch.randn(2, 7, 48) * 2, torch.randn(2, 7, 48).bfloat16()]
        try:
            wants = [m(x) for x in xs]
        except Exception:  # a forward that needs more than one input
            wants = None
        if not lmkern.patch(m):
            continue
        assert wants is not None, f"{cname}: replaced, but its own forward fails on one input"
        replaced.append(cname)
        for x, want in zip(xs, wants):
            got = m(x)
            assert got.dtype == want.dtype, cname
            tol = 1e-5 if x.dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=cname)
    expected = {"LlamaRMSNorm", "GemmaRMSNorm", "Gemma3nRMSNorm", "Qwen3NextRMSNorm", "Qwen2RMSNorm"}
    assert expected & set(classes) <= set(replaced)


def test_patched_module_trains(device_backend):
    device, backend = device_backend
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)).to(device)
    lmkern.patch(model)
    model[1].backend = backend
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 16, device=device)
    before = model[1].weight.detach().clone()
    model(x).square().mean().backward()
    opt.step()
    assert not torch.equal(before, model[1].weight)
