"""The EDM2 sampler (architectures.md Part 3) and the batched image generator."""

import pytest
import torch

from edm_opt.networks import build_network
from edm_opt.sampling import Guided, PerSampleGenerator, euler_sample, generate, guided, heun_sample, time_steps


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: see conftest.py

S = 0.5  # data standard deviation of the Gaussian test data N(0, S^2 I)


def gaussian_denoiser(x, sigma, class_labels=None):
    """Exact denoiser of N(0, S^2 I): D(x; sigma) = x S^2 / (S^2 + sigma^2)."""
    return x * (S ** 2 / (S ** 2 + sigma ** 2))


def step_factors(t, heun):
    """Per-step factors x_{i+1} = a_i x_i of the sampler applied to the Gaussian denoiser, in float64."""
    t = t.double().tolist()
    slope = lambda s: s / (S ** 2 + s ** 2)  # d / x = (x - D) / (sigma x)
    factors = []
    for i, (tc, tn) in enumerate(zip(t[:-1], t[1:])):
        a = 1 + (tn - tc) * slope(tc)
        if heun and i < len(t) - 2:
            a = 1 + (tn - tc) * (0.5 * slope(tc) + 0.5 * a * slope(tn))
        factors.append(a)
    return factors


def test_time_steps_are_float32_in_the_official_order():
    t = time_steps(32, 0.002, 80, 7)
    assert t.dtype == torch.float32 and t.shape == (33,) and t[-1] == 0
    assert t[0].item() == 79.99998474121094  # not exactly 80
    assert t[31].item() == 0.0019999996293336153
    assert torch.all(t[1:] < t[:-1])
    with pytest.raises(ValueError):
        time_steps(1)


@pytest.mark.parametrize("sampler,heun", [(heun_sample, True), (euler_sample, False)])
def test_sampler_is_the_product_of_step_factors(sampler, heun):
    noise = torch.randn(1000)
    for N in (18, 32, 64):
        t = time_steps(N)
        expected = noise.double() * t[0].double()
        for a in step_factors(t, heun):
            expected = expected * a
        assert torch.allclose(sampler(gaussian_denoiser, noise, num_steps=N).double(), expected, rtol=1e-5)


def test_network_evaluations():
    calls = []
    counting = lambda x, sigma, y: calls.append(float(sigma)) or gaussian_denoiser(x, sigma)
    heun_sample(counting, torch.randn(4), num_steps=32)
    assert len(calls) == 63 and calls[0] == time_steps(32)[0].item() and 0 not in calls
    calls.clear()
    euler_sample(counting, torch.randn(4), num_steps=32)
    assert len(calls) == 32


def test_many_steps_recover_the_data_variance():
    noise = torch.randn(30_000, generator=torch.Generator().manual_seed(0))  # below the threading grain
    var_256 = heun_sample(gaussian_denoiser, noise, num_steps=256).double().var().item()
    stderr = S ** 2 * (2 / noise.numel()) ** 0.5
    assert abs(var_256 - S ** 2) < 4 * stderr
    var_18 = heun_sample(gaussian_denoiser, noise, num_steps=18).double().var().item()
    assert 0.08 < var_18 / S ** 2 - 1 < 0.14  # 18 steps are ~11% off at S = 0.5, by design


CHURN = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)


def test_churn_is_per_seed_whatever_the_batch():
    seeds = list(range(100, 108))

    def run(batch_seeds):
        rnd = PerSampleGenerator(batch_seeds)
        return heun_sample(gaussian_denoiser, rnd.randn([3, 4, 4]), num_steps=12, seeds=rnd, **CHURN)

    whole = run(seeds)
    parts = torch.cat([run(seeds[:3]), run(seeds[3:])])
    assert torch.equal(whole, parts)
    rnd = PerSampleGenerator(seeds)
    noise = rnd.randn([3, 4, 4])
    assert torch.equal(heun_sample(gaussian_denoiser, noise, num_steps=12, seeds=rnd, **CHURN), whole)
    assert not torch.allclose(heun_sample(gaussian_denoiser, noise, num_steps=12), whole)  # churn matters
    with pytest.raises(ValueError, match="seeds for a batch"):
        heun_sample(gaussian_denoiser, noise, num_steps=12, seeds=seeds[:3], **CHURN)


def test_no_draws_without_active_churn():
    rnd = PerSampleGenerator([1, 2])
    states = [g.get_state() for g in rnd.generators]
    global_state = torch.get_rng_state()
    heun_sample(gaussian_denoiser, torch.randn(2, 1, 2, 2), num_steps=8, seeds=rnd)
    heun_sample(gaussian_denoiser, torch.randn(2, 1, 2, 2), num_steps=8, seeds=rnd, S_churn=40, S_min=100)
    global_after = torch.get_rng_state()
    assert all(torch.equal(s, g.get_state()) for s, g in zip(states, rnd.generators))
    torch.set_rng_state(global_state)
    torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)  # the two noise tensors drawn above
    assert torch.equal(torch.get_rng_state(), global_after)


@pytest.fixture(scope="module")
def conditional_net():
    torch.manual_seed(0)
    net = build_network("edm2-nano", img_resolution=8, img_channels=1, label_dim=10)
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)  # let the network shape the samples
    return net


def test_generate_is_independent_of_batch_size(conditional_net):
    seeds = [0, 1, 2, 3, 2 ** 32 + 4]
    w0 = conditional_net.unet.out_conv.weight.detach().clone()
    img_a, lab_a = generate(conditional_net, seeds, batch_size=5, num_steps=4)
    img_b, lab_b = generate(conditional_net, seeds, batch_size=2, num_steps=4)
    assert img_a.dtype == torch.uint8 and img_a.shape == (5, 1, 8, 8)
    assert torch.equal(lab_a, lab_b)
    assert (img_a.int() - img_b.int()).abs().max() <= 1  # equal up to a rounding flip at a .5 boundary
    g = torch.Generator().manual_seed(4)  # seed mod 2^32; noise first, then the class index
    g.manual_seed(4)
    torch.randn([1, 8, 8], generator=g)
    assert lab_a[4].item() == torch.randint(10, size=[1], generator=g).item()
    assert conditional_net.training  # mode given back (built in training mode)
    assert torch.equal(conditional_net.unet.out_conv.weight, w0)  # sampled in eval mode: weights untouched


def test_generate_label_options(conditional_net):
    img, labels = generate(conditional_net, [7, 8], num_steps=2, class_labels=3)
    assert labels.tolist() == [3, 3]
    img, labels = generate(conditional_net, [7, 8], num_steps=2, class_labels=None)
    assert labels is None and img.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError):
        generate(conditional_net, [7], num_steps=2, class_labels=10)


class AnalyticGaussian(torch.nn.Module):
    """Exact denoiser of 2-D data N(0, diag(s^2)) as a 2-channel 1x1 image: D(x; sigma) = x s^2 / (s^2 + sigma^2)."""

    img_channels, img_resolution = 2, 1

    def __init__(self, s, label_dim=0):
        super().__init__()
        self.s2 = torch.tensor(s, dtype=torch.float32).view(1, 2, 1, 1) ** 2
        self.label_dim = label_dim

    def forward(self, x, sigma, class_labels=None):
        return x * (self.s2 / (self.s2 + sigma ** 2))


def test_guidance_one_is_the_network_bit_for_bit(conditional_net):
    calls = []

    class Counting(torch.nn.Module):
        img_channels, img_resolution, label_dim = 1, 8, 10

        def forward(self, x, sigma, class_labels=None):
            calls.append(1)
            return x

    assert guided(conditional_net, Counting(), 1.0) is conditional_net
    a, la = generate(conditional_net, range(6), num_steps=4)
    b, lb = generate(guided(conditional_net, Counting(), 1.0), range(6), num_steps=4)
    assert torch.equal(a, b) and torch.equal(la, lb) and calls == []  # the guide is never run at w = 1
    with pytest.raises(ValueError, match="--gnet"):
        guided(conditional_net, None, 2.0)
    # w != 1: D_g + w (D - D_g); an unconditional guide (classifier-free guidance) gets no labels
    torch.manual_seed(1)
    uncond = build_network("edm2-nano", img_resolution=8, img_channels=1, label_dim=0).eval()
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor(1.3)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 4, 9]), 10).float()
    with torch.no_grad():
        want = uncond(x, sigma, None) + 2.5 * (conditional_net.eval()(x, sigma, labels) - uncond(x, sigma, None))
        torch.testing.assert_close(Guided(conditional_net, uncond, 2.5)(x, sigma, labels), want)
    with pytest.raises(ValueError, match="img_resolution"):
        Guided(conditional_net, build_network("edm2-nano", img_resolution=16, img_channels=1), 2.0)
    with pytest.raises(ValueError, match="classes"):
        Guided(conditional_net, build_network("edm2-nano", img_resolution=8, img_channels=1, label_dim=3), 2.0)


@pytest.mark.parametrize("w", [1.0, 2.0, 3.0, 0.5])
def test_guided_sampling_moves_mass_as_the_formula_says(w):
    """Data N(0, s^2) guided by N(0, g^2): the guided probability-flow ODE dx/dsigma = (x - D_w) / sigma is linear,
    D_w = x [g^2/(g^2+sigma^2) + w (s^2/(s^2+sigma^2) - g^2/(g^2+sigma^2))], so every sample is its noise times
    sigma_max [g / sqrt(g^2 + sigma_max^2)]^(1-w) [s / sqrt(s^2 + sigma_max^2)]^w: the samples' std is
    ~ s^w g^(1-w), sharper than the data where the guide is broader (w > 1), broader for w < 1."""
    s, g = torch.tensor([0.5, 0.2]), torch.tensor([1.0, 0.4])
    net, gnet = AnalyticGaussian(s.tolist()), AnalyticGaussian(g.tolist())
    noise = torch.randn(4000, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    x = heun_sample(guided(net, gnet, w), noise, num_steps=256).double()
    t0 = time_steps(256)[0].double()
    gain = t0 * (g / (g ** 2 + t0 ** 2).sqrt()).double() ** (1 - w) * (s / (s ** 2 + t0 ** 2).sqrt()).double() ** w
    torch.testing.assert_close(x / noise.double(), gain.view(1, 2, 1, 1).expand_as(x), rtol=2e-3, atol=0)
    assert x.std(dim=0).flatten().tolist() == pytest.approx((s ** w * g ** (1 - w)).tolist(), rel=0.05)
