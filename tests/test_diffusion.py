import pytest
import torch
from diffusers import DDPMScheduler

from ldm_teach import diffusion


@pytest.mark.parametrize("schedule,start,end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012),
                                                 ("squaredcos_cap_v2", 1e-4, 0.02)])
def test_betas_match_diffusers_bit_for_bit(schedule, start, end):
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule, beta_start=start, beta_end=end)
    betas = diffusion.make_betas(schedule, 1000, start, end)
    assert torch.equal(betas, reference.betas)
    assert torch.equal(diffusion.alphas_cumprod_from_betas(betas), reference.alphas_cumprod)


def test_q_sample_matches_add_noise():
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    ours = diffusion.q_sample(x0, t, noise, reference.alphas_cumprod)
    torch.testing.assert_close(ours, reference.add_noise(x0, noise, t), atol=1e-6, rtol=0)


def test_velocity_matches_get_velocity_and_the_v_loss():
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    v = diffusion.velocity(x0, noise, t, reference.alphas_cumprod)
    torch.testing.assert_close(v, reference.get_velocity(x0, noise, t), atol=1e-6, rtol=0)
    x_t = diffusion.q_sample(x0, t, noise, reference.alphas_cumprod)  # x̂_0 = √ᾱ x_t - √(1-ᾱ) v recovers x_0
    alpha_prod = reference.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(alpha_prod**0.5 * x_t - (1 - alpha_prod) ** 0.5 * v, x0, atol=1e-5, rtol=0)

    def oracle(x_t, steps, predict="v"):  # knows x0, so reads the drawn noise off x_t
        alpha_prod = reference.alphas_cumprod[steps].reshape(-1, 1, 1, 1)
        eps = (x_t - alpha_prod**0.5 * x0) / (1 - alpha_prod) ** 0.5
        return diffusion.velocity(x0, eps, steps, reference.alphas_cumprod) if predict == "v" else eps

    for predict, low in (("v", True), ("eps", False)):
        loss = diffusion.diffusion_loss(oracle, x0, reference.alphas_cumprod, predict, prediction_type="v_prediction",
                                        generator=torch.Generator().manual_seed(0))
        assert (float(loss) < 1e-6) == low  # the v-loss's target is the velocity, not the noise
    with pytest.raises(ValueError, match=r"noise has shape \(4, 3\) but x0 has shape \(4, 3, 8, 8\)"):
        diffusion.velocity(x0, torch.zeros(4, 3), t, reference.alphas_cumprod)


def test_closed_form_equals_step_by_step_in_distribution():
    # Noising one fixed x0 step by step 500 times, many times over, gives the mean and variance
    # that the closed form q(x_t | x_0) promises.
    betas = diffusion.make_betas("linear", 1000)
    alphas_cumprod = diffusion.alphas_cumprod_from_betas(betas)
    x0 = torch.full((20000, 1), 1.5, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    x = x0.clone()
    for t in range(500):
        x = diffusion.q_step(x, t, torch.randn(x.shape, generator=generator, dtype=x.dtype), betas.double())
    mean, var = float(x.mean()), float(x.var())
    assert abs(mean - 1.5 * float(alphas_cumprod[499]) ** 0.5) < 0.02
    assert abs(var - (1 - float(alphas_cumprod[499]))) < 0.03


def test_posterior_mean_and_variance_match_ddpm():
    reference = DDPMScheduler(beta_schedule="linear")
    alphas_cumprod = reference.alphas_cumprod
    x0, x_t = torch.randn(5, 2), torch.randn(5, 2)
    for t in (0, 1, 400, 999):
        alpha_prod_prev = alphas_cumprod[t - 1] if t > 0 else torch.tensor(1.0)
        beta = 1 - alphas_cumprod[t] / alpha_prod_prev
        expected = (alpha_prod_prev**0.5 * beta * x0 + (1 - beta) ** 0.5 * (1 - alpha_prod_prev) * x_t) / (
            1 - alphas_cumprod[t])
        torch.testing.assert_close(diffusion.q_posterior_mean(x0, x_t, t, alphas_cumprod), expected)
        if t > 0:
            torch.testing.assert_close(diffusion.q_posterior_variance(t, alphas_cumprod), reference._get_variance(t))


def test_predict_x0_inverts_q_sample():
    alphas_cumprod = diffusion.NoiseSchedule.make("scaled_linear", 1000, 0.00085, 0.012).alphas_cumprod
    x0, noise, t = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([5, 300, 900])
    x_t = diffusion.q_sample(x0, t, noise, alphas_cumprod)
    torch.testing.assert_close(diffusion.predict_x0(x_t, t, noise, alphas_cumprod), x0, atol=1e-4, rtol=1e-4)


def test_snr_falls_monotonically():
    snr = diffusion.signal_to_noise(diffusion.NoiseSchedule.make("linear").alphas_cumprod)
    assert (snr[1:] < snr[:-1]).all()


def test_loss_is_zero_for_an_oracle_and_positive_otherwise():
    alphas_cumprod = diffusion.NoiseSchedule.make().alphas_cumprod
    x0 = torch.zeros(6, 2)  # with x0 = 0, x_t / sqrt(1 - abar) is exactly the noise
    oracle = lambda x_t, t: x_t / (1 - alphas_cumprod[t]).sqrt()[:, None]  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    assert float(diffusion.diffusion_loss(oracle, x0, alphas_cumprod, generator=generator)) < 1e-10
    assert float(diffusion.diffusion_loss(lambda x_t, t: torch.zeros_like(x_t), x0, alphas_cumprod)) > 0.1


def test_bad_inputs_name_the_value():
    alphas_cumprod = diffusion.NoiseSchedule.make().alphas_cumprod
    with pytest.raises(ValueError, match=r"noise has shape \(4, 2\) but x0 has shape \(4, 3\)"):
        diffusion.q_sample(torch.zeros(4, 3), 10, torch.zeros(4, 2), alphas_cumprod)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\], got values from 0 to 1000"):
        diffusion.q_sample(torch.zeros(2, 3), torch.tensor([0, 1000]), torch.zeros(2, 3), alphas_cumprod)
    with pytest.raises(ValueError, match="B=4"):
        diffusion.q_sample(torch.zeros(4, 3), torch.tensor([1, 2]), torch.zeros(4, 3), alphas_cumprod)
    with pytest.raises(ValueError, match="'cubic'"):
        diffusion.make_betas("cubic")
    with pytest.raises(ValueError, match="'x0'"):
        diffusion.diffusion_loss(lambda x, t: x, torch.zeros(2, 2), alphas_cumprod, prediction_type="x0")


@pytest.mark.parametrize("schedule, start, end", [("linear", 0.0001, 1.0), ("linear", -0.001, 0.02),
                                                  ("scaled_linear", 0.00085, 1.2)])
def test_make_betas_refuses_betas_outside_zero_one(schedule, start, end):
    with pytest.raises(ValueError, match=rf"beta_start={start} to beta_end={end} gives betas"):
        diffusion.make_betas(schedule, 1000, start, end)


@pytest.mark.parametrize("T, error, message", [(2.5, TypeError, "num_train_timesteps=2.5 is not an int"),
                                               ("10", TypeError, "num_train_timesteps='10' is a string"),
                                               (0, ValueError, "num_train_timesteps=0 must be at least 1")])
def test_make_betas_names_a_bad_number_of_timesteps(T, error, message):
    with pytest.raises(error, match=message):
        diffusion.make_betas("linear", T)
