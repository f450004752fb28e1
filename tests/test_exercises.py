import torch

from ldm_teach import diffusion, exercises


def test_correct_answers_pass(capsys):
    assert exercises.check_q_sample(diffusion.q_sample)
    assert exercises.check_posterior_mean(diffusion.q_posterior_mean)
    assert exercises.check_ddim_step(exercises.reference_ddim_step)
    assert capsys.readouterr().out.count("✅") == 3


def test_wrong_answer_names_the_worst_value_and_the_mistake():
    def no_sqrt(x0, t, noise, alphas_cumprod):
        a = alphas_cumprod[t].reshape(-1, *[1] * (x0.ndim - 1))
        return a * x0 + (1 - a) * noise

    result = exercises.check_q_sample(no_sqrt)
    assert not result
    assert "worst |difference|" in result.message and "at index" in result.message
    assert "√ᾱ_t" in result.message


def test_shape_errors_and_exceptions_are_reported():
    def unbroadcast(x0, t, noise, alphas_cumprod):
        return alphas_cumprod[t].sqrt() * x0 + (1 - alphas_cumprod[t]).sqrt() * noise

    result = exercises.check_q_sample(unbroadcast)
    assert not result and ("raised RuntimeError" in result.message or "expected shape" in result.message)

    result = exercises.check_ddim_step(lambda eps, x_t, alpha_prod_t, alpha_prod_prev: x_t.sum(dim=0))
    assert not result and "expected shape" in result.message

    result = exercises.check_posterior_mean(lambda x0, x_t, t, alphas_cumprod: None)
    assert not result and "returned NoneType" in result.message


def test_ddim_mistake_is_recognised():
    def forgot(eps, x_t, alpha_prod_t, alpha_prod_prev):
        return (x_t - (1 - alpha_prod_t).sqrt() * eps) / alpha_prod_t.sqrt()

    result = exercises.check_ddim_step(forgot)
    assert not result and "previous noise level" in result.message
    assert torch.is_tensor(forgot(torch.zeros(1), torch.zeros(1), torch.tensor(0.5), torch.tensor(0.6)))


# --- chapter 02: the VAE ---


# --- chapter 03: CLIP ---


# --- chapter 04: the U-Net ---
