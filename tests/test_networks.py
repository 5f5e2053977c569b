"""EDM2 and DDPM++ networks and presets against docs/architectures.md and the official layouts."""

import io
import math
from pathlib import Path

import pytest
import torch

from edm_opt.networks import DDPMppPrecond, EDM2Precond, build_network, get_preset, list_presets
from edm_opt.networks.ddpmpp import UNetBlock, positional_embedding
from edm_opt.networks.edm2 import Block, MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize
from edm_opt.networks.presets import PRESETS


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see conftest.py

# official state-dict layouts (names and shapes only) of two small configurations, from ../shared/reference/
REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
SMALL = dict(img_resolution=16, img_channels=1, label_dim=10, model_channels=32, channel_mult=(1, 2),
             num_blocks=1, attn_resolutions=(8,), dropout=0.0)


def n_params(net):
    return sum(p.numel() for p in net.parameters())


# --------------------------------------------------------------------------------------------------
# Layouts and parameter counts.

OFFICIAL_COUNTS = {  # method.md section 6 (conditional, 1000 classes)
    "edm2-img512-xs": 124_713_253, "edm2-img512-s": 280_212_837, "edm2-img512-m": 497_807_781,
    "edm2-img512-l": 777_498_085, "edm2-img512-xl": 1_119_283_749, "edm2-img512-xxl": 1_523_164_773,
    "edm2-img64-xs": 124_710_949, "edm2-img64-s": 280_209_381, "edm2-img64-m": 497_803_173,
    "edm2-img64-l": 777_492_325, "edm2-img64-xl": 1_119_276_837, "ddpmpp-cifar10": 55_732_739,
}


@pytest.mark.parametrize("name", OFFICIAL_COUNTS)
def test_official_parameter_counts(name):
    assert n_params(build_network(name, device="meta")) == OFFICIAL_COUNTS[name]


def test_ddpmpp_cifar10_label_and_augment_counts():
    assert n_params(build_network("ddpmpp-cifar10", label_dim=10, device="meta")) == 55_734_147
    net = build_network("ddpmpp-cifar10", label_dim=10, augment_dim=9, device="meta")
    assert n_params(net) == 55_735_299
    keys = list(net.state_dict())
    assert keys.index("model.map_augment.weight") == keys.index("model.map_label.bias") + 1
    assert net.state_dict()["model.map_augment.weight"].shape == (128, 9)


def read_reference(name):
    path = REFERENCE / name
    lines = path.read_text().split("\n")
    rows = [line.split(" ", 1) for line in lines if line.strip() and not line.startswith("total")]
    total = int(next(line for line in lines if line.startswith("total")).split()[1])
    return [(k, tuple(int(v) for v in shape.strip("()").split(",") if v.strip())) for k, shape in rows], total


@pytest.mark.parametrize("cls,name,total", [(EDM2Precond, "edm2-small-state-dict.txt", 722_859),
                                            (DDPMppPrecond, "ddpmpp-small-state-dict.txt", 749_105)])
def test_state_dict_matches_official_layout(cls, name, total):
    ref, ref_total = read_reference(name)
    sd = cls(**SMALL).state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == ref  # names, order and shapes
    assert sum(v.numel() for v in sd.values()) == ref_total == total


def test_small_edm2_counts_of_architectures_doc():
    assert n_params(EDM2Precond(**SMALL)) == 722_539
    assert n_params(EDM2Precond(**{**SMALL, "label_dim": 0})) == 721_899
    assert n_params(DDPMppPrecond(**SMALL)) == 749_089


def test_small_presets_build_and_span():
    small = [p for p in list_presets() if "img_resolution" not in p.network]
    assert {p.name for p in small} >= {"edm2-nano", "edm2-micro", "edm2-tiny", "edm2-mini", "edm2-small",
                                       "edm2-base", "ddpmpp-tiny"}
    counts = {}
    for p in small:
        for R in (8, 32):
            net = build_network(p.name, img_resolution=R, img_channels=1, device="meta")
            counts[p.name] = n_params(net)
            assert net.img_resolution == R and net.label_dim == 0
    edm2 = [counts[f"edm2-{s}"] for s in ("nano", "micro", "tiny", "mini", "small", "base")]
    assert edm2 == sorted(edm2) and edm2[-1] / edm2[0] >= 30


def test_small_preset_attention_follows_resolution():
    for R, lowest in ((8, 2), (32, 8)):
        net = build_network("edm2-tiny", img_resolution=R, img_channels=1)
        assert net.unet.enc[f"{lowest}x{lowest}_block0"].num_heads > 0
        assert net.unet.enc[f"{R}x{R}_block0"].num_heads == 0
        net = build_network("ddpmpp-tiny", img_resolution=R, img_channels=1)
        assert net.model.dec[f"{lowest}x{lowest}_block2"].attention


def test_build_network_errors_and_overrides():
    with pytest.raises(ValueError, match="valid presets: .*edm2-nano"):
        build_network("edm2-nope", img_resolution=8, img_channels=1)
    with pytest.raises(ValueError, match="divisible by 8.*Pad the data to 32 x 32"):
        build_network("edm2-img64-s", img_resolution=28, device="meta")
    with pytest.raises(ValueError, match="divisible by 4"):
        build_network("edm2-tiny", img_resolution=30, img_channels=1)
    with pytest.raises(ValueError, match="needs img_resolution"):
        build_network("edm2-tiny", img_channels=1)
    with pytest.raises(ValueError, match="does not take return_logvar"):
        build_network("ddpmpp-tiny", img_resolution=8, img_channels=1, return_logvar=True)
    with pytest.raises(ValueError, match="preconditioning"):
        build_network("edm2-tiny", img_resolution=8, img_channels=1, precond="nope")
    net = build_network("edm2-tiny", img_resolution=28, img_channels=1, label_dim=10, precond="fm",
                        model_channels=8)
    assert (net.img_resolution, net.label_dim, net.precond, net.sigma_data) == (28, 10, "fm", 0.5)
    assert net.unet.emb_noise.weight.shape == (16, 8)
    assert get_preset("edm2-img64-s").lr_tref == 35000 * 2048
    assert get_preset("edm2-img512-xxl").lr == 0.0065 and get_preset("edm2-img512-m").network["dropout"] == 0.1
    assert EDM2Precond.has_logvar and not DDPMppPrecond.has_logvar
    assert all(p.resolution_multiple == 2 ** (len(p.network["channel_mult"]) - 1) for p in PRESETS.values())


# --------------------------------------------------------------------------------------------------
# Magnitude preservation and forced weight normalisation (architectures.md 1.2, 1.7).


def ms(x):
    return x.square().mean().item()


def test_magnitude_preservation_at_init():
    torch.manual_seed(0)
    x = torch.randn(8, 64, 32, 32)
    conv = MPConv(64, 48, [3, 3])
    assert ms(conv(x)[:, :, 1:-1, 1:-1]) == pytest.approx(1, abs=0.05)  # interior: full receptive field
    assert ms(MPConv(256, 128, [])(torch.randn(512, 256))) == pytest.approx(1, abs=0.05)
    assert ms(mp_silu(torch.randn(100_000))) == pytest.approx(1, abs=0.02)
    a, b = torch.randn(100_000), torch.randn(100_000)
    for t in (0.3, 0.5):
        assert ms(mp_sum(a, b, t)) == pytest.approx(1, abs=0.02)
    a, b = torch.randn(256, 64, 8, 8), torch.randn(256, 32, 8, 8)
    assert ms(mp_cat(a, b)) == pytest.approx(1, abs=0.02)
    assert ms(MPFourier(256)(torch.randn(4096))) == pytest.approx(1, abs=0.05)
    block = Block(64, 64, 32, "enc").eval()
    assert ms(block(x, torch.randn(8, 32))) == pytest.approx(1, abs=0.15)


def test_forced_weight_normalisation_only_in_training():
    torch.manual_seed(0)
    conv = MPConv(16, 8, [3, 3])
    w0 = conv.weight.detach().clone()
    x = torch.randn(2, 16, 6, 6)
    y_eval = conv.eval()(x)
    assert torch.equal(conv.weight, w0)  # eval: untouched
    with torch.no_grad():
        y_train = conv.train()(x)  # rewrites even without gradients
    assert torch.equal(conv.weight, normalize(w0))  # N(W) stored
    assert not torch.equal(y_train, y_eval) and torch.allclose(y_train, y_eval, rtol=1e-3, atol=1e-4)
    assert torch.equal(y_train, conv.eval()(x))  # train used N(N(W)) = eval on the stored N(W)
    rms = conv.weight.flatten(1).square().mean(1)
    assert torch.allclose(rms, torch.ones(8), atol=1e-3)


# --------------------------------------------------------------------------------------------------
# Bit-exactness rules.


def test_normalize_uses_fused_multiply_add():
    torch.manual_seed(0)
    x = torch.randn(4096, 576) * torch.rand(4096, 1) * 3
    alpha = math.sqrt(1 / 576)
    n = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    fused = (n.double() * torch.tensor(alpha).float().double() + torch.tensor(1e-4).float().double()).float()
    naive = n * alpha + 1e-4
    assert (fused != naive).float().mean() > 0.05  # the naive form differs for a good share of rows
    assert torch.equal(normalize(x), x / fused)
    assert not torch.equal(normalize(x), x / naive)


def test_mp_sum_uses_lerp_and_mp_cat_weights():
    torch.manual_seed(0)
    a, b = torch.randn(10_000), torch.randn(10_000)
    for t, denom in ((0.3, 0.7615773105863908), (0.5, 0.7071067811865476)):
        assert torch.equal(mp_sum(a, b, t), torch.lerp(a, b, t) / denom)
        assert not torch.equal(mp_sum(a, b, t), ((1 - t) * a + t * b) / denom)
    y = mp_cat(torch.ones(1, 64), torch.ones(1, 32))
    assert y[0, 0].item() == pytest.approx(0.8660254, abs=1e-7)
    assert y[0, -1].item() == pytest.approx(1.2247449, abs=1e-7)
    assert torch.equal(mp_cat(torch.ones(1, 8), torch.ones(1, 8)), torch.ones(1, 16))


def _attention_reference(qkv_out, heads, cosine):
    """Attention with an explicit channel index k = h*3Ch + c*3 + s (s = 0, 1, 2 for q, k, v)."""
    B, C3, H, W = qkv_out.shape
    Ch = C3 // 3 // heads
    z = qkv_out.reshape(B, C3, H * W)
    idx = lambda s: torch.tensor([h * 3 * Ch + c * 3 + s for h in range(heads) for c in range(Ch)])
    q, k, v = (z[:, idx(s)].reshape(B, heads, Ch, H * W) for s in range(3))
    if cosine:
        q, k, v = (t / (t.square().mean(2, keepdim=True).sqrt() + 1e-4) for t in (q, k, v))
    A = (torch.einsum("bhci,bhcj->bhij", q.double(), k.double()) / math.sqrt(Ch)).softmax(-1)
    return torch.einsum("bhij,bhcj->bhci", A, v.double()).reshape(B, heads * Ch, H, W).float()


def test_edm2_attention_interleaves_qkv():
    torch.manual_seed(0)
    block = Block(64, 64, 16, "enc", attention=True, channels_per_head=32).eval()
    assert block.num_heads == 2
    x = torch.randn(2, 64, 4, 4)
    z = block.attn_qkv(x)
    o = []
    block.attn_proj.forward = lambda t, gain=1: o.append(t) or t  # capture the attention output
    block.attention(x)
    assert torch.allclose(o[0], _attention_reference(z, 2, cosine=True), atol=1e-5)
    chunked = torch.cat([z[:, i::3] for i in range(3)], 1)  # as if q, k, v were contiguous chunks
    assert not torch.allclose(o[0], _attention_reference(chunked, 2, cosine=True), atol=1e-2)


def test_ddpmpp_attention_interleaves_qkv():
    torch.manual_seed(0)
    block = UNetBlock(32, 32, 16, attention=True).eval()
    torch.nn.init.normal_(block.qkv.weight)
    x = torch.randn(2, 32, 4, 4)
    z = block.qkv(block.norm2(x))
    o = []
    block.proj.forward = lambda t: o.append(t) or t
    block.self_attention(x)
    assert torch.allclose(o[0], _attention_reference(z, 1, cosine=False), atol=1e-4)
    chunked = torch.cat([z[:, i::3] for i in range(3)], 1)
    assert not torch.allclose(o[0], _attention_reference(chunked, 1, cosine=False), atol=1e-2)


def test_ddpmpp_positional_embedding_order_and_float32_power():
    s = torch.tensor([0.3, -1.7])
    e = positional_embedding(s, 128)
    j = torch.arange(64, dtype=torch.float32) / 63
    f = torch.tensor(1e-4, dtype=torch.float32) ** j  # float32 base and power
    assert torch.equal(e[:, :64], s.outer(f).sin()) and torch.equal(e[:, 64:], s.outer(f).cos())
    assert f[0] == 1 and f[-1] == torch.tensor(1e-4, dtype=torch.float32)
    f64 = (1e-4 ** j.double()).float()
    assert (f != f64).any()  # a double-precision power differs in the last bit for some j


# --------------------------------------------------------------------------------------------------
# Preconditioning (architectures.md 1.5, 2.5; method.md section 1).


class _Recorder(torch.nn.Module):
    """Stands in for the U-Net: records its inputs, returns F = 1."""

    def forward(self, x, c_noise, class_labels=None, augment_labels=None):
        self.x, self.c_noise, self.labels = x, c_noise, class_labels
        return torch.ones_like(x)


@pytest.mark.parametrize("precond,c_skip,c_out,c_in", [
    ("edm", 0.25 / 4.25, 1 / math.sqrt(4.25), 1 / math.sqrt(4.25)),
    ("ve", 1.0, 2.0, 1.0),
    ("vp", 1.0, -2.0, 1 / math.sqrt(5)),
    ("fm", 1 / 3, -2 / 3, 1 / 3),
])
@pytest.mark.parametrize("cls,attr", [(EDM2Precond, "unet"), (DDPMppPrecond, "model")])
def test_preconditioning_coefficients(precond, c_skip, c_out, c_in, cls, attr):
    net = cls(**{**SMALL, "model_channels": 8}, precond=precond)
    rec = _Recorder()
    setattr(net, attr, rec)
    x = torch.randn(3, 1, 16, 16)
    D = net(x, torch.tensor(2.0))
    assert torch.allclose(rec.x, c_in * x, rtol=1e-6)
    assert torch.allclose(rec.c_noise, torch.tensor([math.log(2) / 4]), rtol=1e-6)
    assert torch.allclose(D, c_skip * x + c_out, rtol=1e-6, atol=1e-6)
    assert torch.equal(rec.labels, torch.zeros(1, 10))  # absent labels default to one zero row


def test_edm_coefficients_follow_official_float32_order():
    from edm_opt.diffusion import precond_coefficients

    sigma = torch.logspace(-3, 2, 1000).reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in = precond_coefficients("edm", sigma, 0.5)
    assert torch.equal(c_skip, 0.5 ** 2 / (sigma ** 2 + 0.5 ** 2))
    assert torch.equal(c_out, sigma * 0.5 / (sigma ** 2 + 0.5 ** 2).sqrt())
    assert torch.equal(c_in, 1 / (0.5 ** 2 + sigma ** 2).sqrt())


# --------------------------------------------------------------------------------------------------
# Initialisation, forward behaviour, checkpoints.


def test_edm2_init_draw_order_is_state_dict_order():
    torch.manual_seed(123)
    net = EDM2Precond(**SMALL)
    torch.manual_seed(123)
    for name, value in net.state_dict().items():
        if name.endswith("gain"):
            assert value == 0
        elif name.endswith("freqs"):
            assert torch.equal(value, 2 * math.pi * torch.randn(value.shape))
        elif name.endswith("phases"):
            assert torch.equal(value, 2 * math.pi * torch.rand(value.shape))
        else:
            assert torch.equal(value, torch.randn(value.shape)), name


def test_ddpmpp_init_draw_order_is_state_dict_order():
    torch.manual_seed(123)
    net = DDPMppPrecond(**SMALL)
    torch.manual_seed(123)
    for name, value in net.state_dict().items():
        if ".norm" in name or "aux_norm" in name:
            assert torch.equal(value, torch.ones_like(value) if name.endswith("weight") else torch.zeros_like(value))
        elif name.endswith("resample_filter"):
            assert torch.equal(value, torch.full([1, 1, 2, 2], 0.25))
        else:
            w = net.state_dict()[name.replace(".bias", ".weight")]
            fan_out, fan_in = w.shape[0] * w[0, 0].numel(), w[0].numel()
            u = math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(value.shape) * 2 - 1)
            m = 0 if name.endswith("bias") else (
                1e-5 if any(k in name for k in ("conv1", "proj", "aux_conv")) else
                math.sqrt(0.2) if "qkv" in name else 1)
            assert torch.equal(value, u * m), name


def test_forward_shapes_logvar_and_initial_output():
    torch.manual_seed(0)
    net = build_network("edm2-nano", img_resolution=8, img_channels=1, label_dim=10).eval()
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0])
    labels = torch.eye(10)[:3]
    D, logvar = net(x, sigma, labels, return_logvar=True)
    assert D.shape == x.shape and D.dtype == torch.float32 and logvar.shape == (3, 1, 1, 1)
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    assert torch.allclose(D, c_skip.reshape(-1, 1, 1, 1) * x)  # out_gain = 0 at init: D = c_skip x
    assert net(x, 2.0).shape == x.shape  # scalar sigma and default labels
    dd = build_network("ddpmpp-tiny", img_resolution=8, img_channels=1).eval()
    assert dd(x, sigma).shape == x.shape


def test_training_step_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for name in ("edm2-nano", "ddpmpp-tiny"):
        net = build_network(name, img_resolution=8, img_channels=1, label_dim=10).train()
        if name.startswith("edm2"):
            for p in net.parameters():
                if p.ndim == 0:  # gains start at 0, which blocks gradients to what they scale
                    torch.nn.init.constant_(p, 0.5)
        x, sigma, labels = torch.randn(4, 1, 8, 8), torch.rand(4) + 0.1, torch.eye(10)[:4]
        if net.has_logvar:  # EDM2 loss form: err^2 / exp(u) + u
            D, u = net(x, sigma, labels, return_logvar=True)
            ((D - x).square() / u.exp() + u).mean().backward()
        else:
            net(x, sigma, labels).square().mean().backward()
        missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert missing == [], (name, missing)


@pytest.mark.parametrize("name", ["edm2-nano", "ddpmpp-tiny"])
def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    net = build_network(name, img_resolution=8, img_channels=1, label_dim=10)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))  # non-trivial outputs (EDM2's out_gain starts at 0)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    fresh = build_network(name, img_resolution=8, img_channels=1, label_dim=10)
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    x, sigma, labels = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0]), torch.eye(10)[:2]
    assert torch.equal(net.eval()(x, sigma, labels), fresh.eval()(x, sigma, labels))


@pytest.mark.parametrize("name,attr", [("edm2-nano", "unet"), ("ddpmpp-tiny", "model")])
def test_float16_body_dtype_flow(name, attr):
    """The float16 body that `use_fp16` selects on CUDA, run on CPU: output in float16, close to float32."""
    torch.manual_seed(0)
    net = build_network(name, img_resolution=8, img_channels=1, label_dim=10).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    body = getattr(net, attr)
    x, c_noise, labels = torch.randn(2, 1, 8, 8), torch.tensor([0.1, -0.3]), torch.eye(10)[:2]
    F32, F16 = body(x, c_noise, labels), body(x.half(), c_noise, labels)
    assert F32.dtype == torch.float32 and F16.dtype == torch.float16
    assert torch.allclose(F16.float(), F32, rtol=0.02, atol=0.02 * F32.abs().max().item())
    assert torch.equal(net(x, c_noise.exp(), labels, force_fp32=True), net(x, c_noise.exp(), labels))  # CPU: fp32
