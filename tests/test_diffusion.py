"""Unit tests for distill.diffusion against closed-form values."""

import math

import numpy as np
import pytest

from distill.core import diffusion as D
from distill.core.errors import UserError


def _ms():
    import mindspore

    mindspore.set_device("CPU")
    return mindspore


def _alpha_sigma_at(t, schedule="cosine"):
    """Exactly variance-preserving float64 (alpha, sigma) at time t."""
    logsnr = float(D.logsnr_schedule(schedule, t))
    return math.sqrt(1.0 / (1.0 + math.exp(-logsnr))), math.sqrt(1.0 / (1.0 + math.exp(logsnr)))


def _data(seed=0, shape=(3, 2, 4, 4)):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape), rng.standard_normal(shape), rng.standard_normal(shape)


# --------------------------------------------------------------------------- schedules
def test_cosine_endpoints_and_midpoint():
    ls = D.logsnr_schedule("cosine", np.array([0.0, 0.5, 1.0]))
    assert ls.dtype == np.float32
    np.testing.assert_allclose(ls, [20.0, 0.0, -20.0], atol=1e-4)
    ls = D.logsnr_schedule("cosine", np.array([0.0, 1.0]), logsnr_min=-8.0, logsnr_max=12.0)
    np.testing.assert_allclose(ls, [12.0, -8.0], atol=1e-4)
    assert np.all(np.diff(D.logsnr_schedule("cosine", np.linspace(0, 1, 11))) < 0)


def test_linear_schedule_by_hand():
    # t = 0.5: 0.1 * 0.5 + 0.5 * 19.9 * 0.25 = 2.5375
    expected = -math.log(math.exp(2.5375) - 1.0)
    assert D.logsnr_schedule("linear", 0.5) == pytest.approx(expected, abs=1e-5)
    assert D.logsnr_schedule("linear", 0.0) == pytest.approx(20.0)  # +inf clipped
    assert D.logsnr_schedule("linear", 1.0) == pytest.approx(-math.log(math.expm1(10.05)), abs=1e-5)
    assert D.logsnr_schedule("linear", 1.0, logsnr_min=-5.0) == pytest.approx(-5.0)


def test_alpha_sigma():
    a, s = D.alpha_sigma(0.0)
    assert a == pytest.approx(math.sqrt(0.5)) and s == pytest.approx(math.sqrt(0.5))
    ls = np.linspace(-30, 30, 61)
    a, s = D.alpha_sigma(ls)
    assert a.dtype == np.float32 and np.all(np.isfinite(a)) and np.all(np.isfinite(s))
    np.testing.assert_allclose(a**2 + s**2, 1.0, atol=1e-6)
    np.testing.assert_allclose(np.log(a.astype(np.float64) ** 2 / s.astype(np.float64) ** 2), ls, rtol=1e-5, atol=1e-4)
    a, s = D.alpha_sigma(1000.0)  # no overflow
    assert a == 1.0 and s == 0.0


def test_snr_weight_truncated():
    np.testing.assert_allclose(D.snr_weight_truncated(np.array([-3.0, 0.0, math.log(4.0)])), [1.0, 1.0, 4.0], rtol=1e-6)


def test_sampling_times():
    np.testing.assert_allclose(D.sampling_times(4), [1.0, 0.75, 0.5, 0.25, 0.0])
    assert D.sampling_times(1).tolist() == [1.0, 0.0]
    with pytest.raises(UserError):
        D.sampling_times(0)


def test_guidance_schedules():
    n, w = 8, 3.0
    for kind in D.GUIDANCE_KINDS:
        ws = D.guidance_schedule(kind, w, n)
        assert ws.shape == (n,) and ws.dtype == np.float32
        assert ws.mean() == pytest.approx(w, rel=1e-6)
    np.testing.assert_allclose(D.guidance_schedule("constant", w, n), w)
    np.testing.assert_allclose(D.guidance_schedule("linear", 2.0, 4), [0.5, 1.5, 2.5, 3.5])
    cos = D.guidance_schedule("cosine", w, n)
    c = math.cos(math.pi / (2 * n))
    assert cos[0] == pytest.approx(w * (1 - c), rel=1e-5) and cos[-1] == pytest.approx(w * (1 + c), rel=1e-5)
    assert np.all(np.diff(cos) > 0) and np.all(np.diff(D.guidance_schedule("linear", w, n)) > 0)


def test_errors_on_bad_names():
    with pytest.raises(UserError, match="unknown noise schedule 'foo' \\(choose cosine or linear\\)"):
        D.logsnr_schedule("foo", 0.5)
    with pytest.raises(UserError, match="unknown guidance schedule"):
        D.guidance_schedule("quadratic", 1.0, 4)
    x = np.zeros(2)
    with pytest.raises(UserError, match="unknown prediction"):
        D.x0_eps_from_output(x, x, 1.0, 0.0, "x0")
    with pytest.raises(UserError, match="unknown prediction"):
        D.output_from_x0_eps(x, x, 1.0, 0.0, "score")


# --------------------------------------------------------------------------- conversions
@pytest.mark.parametrize("t", [0.05, 0.5, 0.95])
def test_round_trips(t):
    x0, eps, _ = _data()
    a, s = _alpha_sigma_at(t)
    z = D.q_sample(x0, eps, a, s)
    np.testing.assert_allclose(D.x0_from_eps(z, eps, a, s), x0, atol=1e-9)
    np.testing.assert_allclose(D.eps_from_x0(z, x0, a, s), eps, atol=1e-9)
    v = D.v_from_x0_eps(x0, eps, a, s)
    np.testing.assert_allclose(D.x0_from_v(z, v, a, s), x0, atol=1e-9)
    np.testing.assert_allclose(D.eps_from_v(z, v, a, s), eps, atol=1e-9)
    for pred in D.PREDICTIONS:
        out = D.output_from_x0_eps(x0, eps, a, s, pred)
        x0_hat, eps_hat = D.x0_eps_from_output(z, out, a, s, pred)
        np.testing.assert_allclose(x0_hat, x0, atol=1e-9)
        np.testing.assert_allclose(eps_hat, eps, atol=1e-9)


def test_per_sample_broadcast():
    x0, eps, _ = _data()
    a, s = D.alpha_sigma(D.logsnr_schedule("cosine", np.array([0.1, 0.5, 0.9])))
    a, s = a.reshape(3, 1, 1, 1).astype(np.float64), s.reshape(3, 1, 1, 1).astype(np.float64)
    z = D.q_sample(x0, eps, a, s)
    np.testing.assert_allclose(z[1], a[1, 0, 0, 0] * x0[1] + s[1, 0, 0, 0] * eps[1])
    np.testing.assert_allclose(D.x0_eps_from_output(z, D.v_from_x0_eps(x0, eps, a, s), a, s, "v")[0], x0, atol=1e-9)


def test_cfg_combine():
    cond, uncond = np.array([1.0, 2.0]), np.array([0.5, -1.0])
    np.testing.assert_allclose(D.cfg_combine(cond, uncond, 0.0), uncond)
    np.testing.assert_allclose(D.cfg_combine(cond, uncond, 1.0), cond)
    np.testing.assert_allclose(D.cfg_combine(cond, uncond, 3.0), [0.5 + 3 * 0.5, -1.0 + 3 * 3.0])
    w = np.array([0.0, 2.0])  # per-sample weights broadcast
    np.testing.assert_allclose(D.cfg_combine(cond, uncond, w), [0.5, 5.0])


# --------------------------------------------------------------------------- samplers
def test_ddim_eta0_reconstructs_exactly():
    x0, eps, _ = _data()
    a, s = zip(*(_alpha_sigma_at(t) for t in D.sampling_times(5)))
    z = D.q_sample(x0, eps, a[0], s[0])
    for i in range(5):  # a perfect model keeps z on the same (x0, eps) trajectory
        z = D.ddim_step(x0, eps, a[i], s[i], a[i + 1], s[i + 1])
        np.testing.assert_allclose(z, D.q_sample(x0, eps, a[i + 1], s[i + 1]), atol=1e-12)
    np.testing.assert_allclose(z, x0, atol=s[-1] * np.abs(eps).max() + 1e-6)  # sigma(0) ~ 4.5e-5


def test_ddim_needs_noise_when_stochastic():
    x0, eps, _ = _data()
    with pytest.raises(ValueError):
        D.ddim_step(x0, eps, 0.5, 0.8, 0.9, 0.4, eta=1.0)


@pytest.mark.parametrize("t,s", [(1.0, 0.8), (0.6, 0.3), (0.2, 0.0)])
def test_ddpm_equals_ddim_eta1(t, s):
    x0, eps, noise = _data(1)
    a_t, s_t = _alpha_sigma_at(t)
    a_s, s_s = _alpha_sigma_at(s)
    z_t = D.q_sample(x0, eps, a_t, s_t)
    x0_pred = 0.7 * x0 + 0.1  # any prediction; eps is made consistent with (z_t, x0_pred)
    eps_pred = D.eps_from_x0(z_t, x0_pred, a_t, s_t)
    ddpm = D.ddpm_step(z_t, x0_pred, a_t, s_t, a_s, s_s, noise)
    ddim = D.ddim_step(x0_pred, eps_pred, a_t, s_t, a_s, s_s, eta=1.0, noise=noise)
    np.testing.assert_allclose(ddpm, ddim, atol=1e-6)


@pytest.mark.parametrize("t,s", [(1.0, 0.8), (0.6, 0.3), (0.2, 0.05)])
def test_posterior_closed_form(t, s):
    a_t, s_t = _alpha_sigma_at(t)
    a_s, s_s = _alpha_sigma_at(s)
    abar_t, abar_s = a_t**2, a_s**2
    beta = 1.0 - abar_t / abar_s  # DDPM beta for the step s -> t
    z_t, x0 = np.array([0.3]), np.array([-1.2])
    mean, var = D.ddpm_posterior(z_t, x0, a_t, s_t, a_s, s_s)
    assert var == pytest.approx((1 - abar_s) / (1 - abar_t) * beta, rel=1e-6)
    mean_ho = math.sqrt(abar_s) * beta / (1 - abar_t) * x0 + math.sqrt(1 - beta) * (1 - abar_s) / (1 - abar_t) * z_t
    np.testing.assert_allclose(mean, mean_ho, rtol=1e-6)
    # marginalising z_t ~ q(z_t | x0) recovers q(z_s | x0): A^2 sigma_t^2 + var = sigma_s^2
    coef_z = float(D.ddpm_posterior(np.array([1.0]), np.array([0.0]), a_t, s_t, a_s, s_s)[0][0])
    assert coef_z**2 * s_t**2 + float(var) == pytest.approx(s_s**2, rel=1e-6)


# --------------------------------------------------------------------------- thresholding
def test_dynamic_threshold_numpy():
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.9, 0.9, size=(2, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(D.dynamic_threshold(x), x)  # in range: s = 1, unchanged
    y = x.copy()
    y[0] *= 4.0  # sample 0 far out of range; sample 1 untouched
    y[0, 0, 0, 0] = 100.0  # one outlier above the percentile
    out = D.dynamic_threshold(y, percentile=0.9)
    flat = np.sort(np.abs(y[0]).ravel())
    s0 = flat[int(math.floor(0.9 * 63))]
    assert s0 > 1.0
    np.testing.assert_allclose(out[0], np.clip(y[0], -s0, s0) / s0, rtol=1e-6)
    assert np.abs(out[0]).max() == pytest.approx(1.0)
    np.testing.assert_array_equal(out[1], y[1])


def test_ddim_eta_between_0_and_1_matches_textbook_formula():
    x0, eps, noise = _data(4)
    a_t, s_t = _alpha_sigma_at(0.7)
    a_s, s_s = _alpha_sigma_at(0.4)
    eta = 0.5
    c = eta * math.sqrt((1 - a_s**2) / (1 - a_t**2) * (1 - a_t**2 / a_s**2))
    want = a_s * x0 + math.sqrt(s_s**2 - c**2) * eps + c * noise
    np.testing.assert_allclose(D.ddim_step(x0, eps, a_t, s_t, a_s, s_s, eta=eta, noise=noise), want, atol=1e-12)


# --------------------------------------------------------------------------- mindspore
def test_functions_on_mindspore_tensors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the failed compile below writes rank_0/om/analyze_fail.ir
    ms = _ms()
    x0, eps, noise = (v.astype(np.float32) for v in _data(2))

    @ms.jit
    def bad_prediction(z, a_t, s_t):
        return D.x0_eps_from_output(z, z, a_t, s_t, "x0")

    a, s = D.alpha_sigma(D.logsnr_schedule("cosine", np.array([0.2, 0.5, 0.9])))
    a_s, s_s = D.alpha_sigma(D.logsnr_schedule("cosine", np.array([0.1, 0.3, 0.6])))
    sh = (3, 1, 1, 1)
    args_np = [a.reshape(sh), s.reshape(sh), a_s.reshape(sh), s_s.reshape(sh)]
    args_ms = [ms.Tensor(v) for v in args_np]
    T = ms.Tensor

    @ms.jit
    def step(x0, eps, noise, a_t, s_t, a_s, s_s):
        z = D.q_sample(x0, eps, a_t, s_t)
        x0_hat, eps_hat = D.x0_eps_from_output(z, D.v_from_x0_eps(x0, eps, a_t, s_t), a_t, s_t, "v")
        guided = D.cfg_combine(x0_hat, 0.5 * x0_hat, 2.0)
        return (D.ddim_step(guided, eps_hat, a_t, s_t, a_s, s_s),
                D.ddim_step(guided, eps_hat, a_t, s_t, a_s, s_s, eta=1.0, noise=noise),
                D.ddpm_step(z, guided, a_t, s_t, a_s, s_s, noise))

    got = step(T(x0), T(eps), T(noise), *args_ms)
    with pytest.raises(UserError, match="unknown prediction"):  # UserError survives jit
        bad_prediction(T(x0), *args_ms[:2])
    z = D.q_sample(x0, eps, args_np[0], args_np[1])
    want = (D.ddim_step(1.5 * x0, eps, *args_np),
            D.ddim_step(1.5 * x0, eps, *args_np, eta=1.0, noise=noise),
            D.ddpm_step(z, 1.5 * x0, *args_np, noise))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.asnumpy(), w, atol=1e-4)


def test_dynamic_threshold_mindspore_matches_numpy():
    ms = _ms()
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 3, 8, 8)) * np.array([0.2, 1.0, 3.0, 10.0]).reshape(4, 1, 1, 1)).astype(np.float32)
    for p in (0.995, 0.9, 0.5, 1.0):
        want = D.dynamic_threshold(x, p)
        got = D.dynamic_threshold(ms.Tensor(x), p)
        np.testing.assert_allclose(got.asnumpy(), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(want[0], x[0])  # sample 0 lies in [-1, 1]

    @ms.jit
    def jitted(t):
        return D.dynamic_threshold(t, 0.995)

    np.testing.assert_allclose(jitted(ms.Tensor(x)).asnumpy(), D.dynamic_threshold(x), rtol=1e-6, atol=1e-7)
