"""Samplers: turning a trained noise predictor into a loop that walks from noise to data.

Chapter 01 builds this file after ``diffusion.py``. Every scheduler answers two questions:

1. *which* training timesteps to visit when sampling with n steps instead of T = 1000
   (``set_timesteps``; the answer is ``.timesteps``, largest first), and
2. *how* to go from the current sample x_t to a less noisy one, given the model's output
   (``step``).

The five schedulers, in the order the chapter meets them:

* ``DDPMScheduler``: ancestral sampling from the learned reverse Gaussians (Ho et al. 2020);
* ``DDIMScheduler``: the deterministic (eta = 0) or partly stochastic DDIM update (Song et al. 2021);
* ``PNDMScheduler``: pseudo linear multistep, Stable Diffusion 1.5's default (Liu et al. 2022);
* ``EulerDiscreteScheduler``: Euler's method on the probability-flow ODE in σ (Karras et al. 2022);
* ``DPMSolverMultistepScheduler``: DPM-Solver++(2M), a second-order exponential integrator (Lu et al. 2022).

The class names, configuration keys and numbers are diffusers', so a learner can read one
beside the other: on the same inputs every step agrees with diffusers' to float32 rounding,
and stochastic steps draw their noise exactly as diffusers does (same generator calls, same
shape and dtype, same order), so a seeded run repeats diffusers' seeded run. Where diffusers
has a quirk (DDIM's previous timestep, PNDM's repeated timestep), we reproduce it and say so.
Chapter 08 adds Karras et al.'s noise levels to Euler and DPM-Solver++ (``use_karras_sigmas``,
computed in ``sigmas.py``) and Euler ancestral (``samplers.py``).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .checks import as_bool, as_float, as_int
from .diffusion import BETA_SCHEDULES, alphas_cumprod_from_betas, check_betas, make_betas, q_sample
from .sigmas import karras_sigmas, sigma_to_timestep

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def draw_noise(like: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, drawn as diffusers' ``randn_tensor`` draws it.

    The noise comes from the generator's device (a CPU generator draws on the CPU, and the
    result is moved), in ``like``'s dtype, so the same seed gives the same numbers as diffusers.
    A list of generators, one per sample of the batch, draws sample i's noise from generator i.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != like.shape[0]:
            raise ValueError(f"{len(generator)} generators were passed for a batch of {like.shape[0]}; pass one "
                             "generator, or one per sample.")
        if len(generator) > 1:
            return torch.cat([draw_noise(like[i:i + 1], one) for i, one in enumerate(generator)])  # (B, ...)
        generator = generator[0]
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def spaced_timesteps(timestep_spacing: str, num_inference_steps: int, num_train_timesteps: int,
                     steps_offset: int = 0) -> np.ndarray:
    """Which of the T training timesteps an n-step sampler visits, largest first, as float64.

    * ``leading``: 0, T//n, 2·T//n, ... shifted up by ``steps_offset`` (SD 1.5: 981, 961, ..., 1);
    * ``trailing``: counted down from T - 1 in steps of T/n (starts at the noisiest step, 999);
    * ``linspace``: n evenly spaced points from 0 to T - 1, not rounded here.

    NumPy, not torch, on purpose: diffusers rounds values that sit near x.5 and the float
    error of np.linspace decides which way they go, so only the same arithmetic gives the
    same integers.
    """
    T, n = num_train_timesteps, num_inference_steps
    if timestep_spacing == "leading":
        if (n - 1) * (T // n) + steps_offset > T - 1:
            raise ValueError(
                f"steps_offset={steps_offset} with {n} 'leading' steps would visit timestep "
                f"{(n - 1) * (T // n) + steps_offset}, past the last one ({T - 1}); use fewer steps, "
                "steps_offset=0 or timestep_spacing='trailing'."
            )
        return (np.arange(n) * (T // n))[::-1].astype(np.float64) + steps_offset
    if timestep_spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    return np.linspace(0, T - 1, n)[::-1]


def as_index(t) -> int:
    """A timestep given as an int, a NumPy integer, a 0-d tensor or a one-element tensor, as a Python int."""
    if isinstance(t, str):
        raise TypeError(f"t={t!r} is a string; pass a timestep from scheduler.timesteps.")
    return int(torch.as_tensor(t).reshape(-1)[0])


class SchedulerConfig(dict):
    """A scheduler's configuration: a dict whose keys also read as attributes, as in diffusers.

    ``scheduler.config["steps_offset"]`` and ``scheduler.config.steps_offset`` are the same,
    and ``dict(scheduler.config)`` gives the keys to build an identical scheduler.
    """

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"this scheduler's config has no key {key!r}; its keys are {sorted(self)}.") from None


COMMON_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
}

# diffusers keys that ldm_teach does not implement, with the one value (diffusers' default,
# the value that turns the feature off) that we accept.
THRESHOLDING_DEFAULTS = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
SIGMA_SCHEDULE_DEFAULTS = {"use_exponential_sigmas": False, "use_beta_sigmas": False}  # (Karras σ are implemented)


class Scheduler:
    """What every scheduler shares: the configuration, the noise schedule and ``add_noise``.

    A subclass lists its configuration keys with their defaults (``config_defaults``),
    the diffusers keys it does not implement with the one value it accepts
    (``unsupported_defaults``) and the allowed values of keys with a fixed set of choices
    (``choices``). Chapter 01, section "Samplers share one schedule".
    """

    config_defaults: dict = COMMON_DEFAULTS
    unsupported_defaults: dict = {}
    choices: dict = {}

    def __init__(self, **config):
        self.config = SchedulerConfig(self.read_config(config))
        if self.config.trained_betas is not None:
            self.betas = torch.tensor(self.config.trained_betas, dtype=torch.float32).reshape(-1)
            if len(self.betas) != self.config.num_train_timesteps:
                raise ValueError(
                    f"trained_betas has {len(self.betas)} values, but num_train_timesteps="
                    f"{self.config.num_train_timesteps}: give one beta per training timestep, or set "
                    f"num_train_timesteps={len(self.betas)}."
                )
            check_betas(self.betas, "trained_betas")
        else:
            self.betas = make_betas(self.config.beta_schedule, self.config.num_train_timesteps,
                                    self.config.beta_start, self.config.beta_end)
        self.alphas_cumprod = alphas_cumprod_from_betas(self.betas)  # ᾱ_t, shape (T,)
        self.num_inference_steps = None
        self.timesteps = None

    @classmethod
    def read_config(cls, config: dict) -> dict:
        """Our defaults overridden by ``config``, checked key by key.

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) and keys that
        belong to other schedulers are ignored, as diffusers ignores them (SD 1.5's PNDM
        config carries DDIM's ``clip_sample``). A diffusers feature we do not implement is
        accepted only at the value that switches it off.
        """
        values = dict(cls.config_defaults)
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key in cls.config_defaults:
                values[key] = value
            elif key in cls.unsupported_defaults:
                default = cls.unsupported_defaults[key]
                if value != default and not (default is False and value is None):
                    raise ValueError(
                        f"{key}={value!r} is not supported by ldm_teach's {cls.__name__}; set {key}={default!r} "
                        f"(or leave it out), or use diffusers' {cls.__name__} for this feature."
                    )
            elif key not in ALL_CONFIG_KEYS:
                warnings.warn(f"{cls.__name__} ignores the unknown config key {key!r}; is it misspelt?", stacklevel=3)
        allowed = {"beta_schedule": BETA_SCHEDULES, "timestep_spacing": TIMESTEP_SPACINGS, **cls.choices}
        for key, options in allowed.items():
            if values[key] not in options:
                raise ValueError(f"{cls.__name__} got {key}={values[key]!r}; use one of {options}.")
        values["num_train_timesteps"] = as_int(values["num_train_timesteps"], "num_train_timesteps", minimum=1)
        values["steps_offset"] = as_int(values["steps_offset"], "steps_offset", minimum=0)
        values["beta_start"] = as_float(values["beta_start"], "beta_start")
        values["beta_end"] = as_float(values["beta_end"], "beta_end")
        return values

    def check_num_inference_steps(self, num_inference_steps: int) -> int:
        """The number of steps as a Python int, refused unless a whole number in 1..T."""
        num_inference_steps = as_int(num_inference_steps, "num_inference_steps")
        T = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} must lie between 1 and num_train_timesteps={T}: "
                "a sampler can only visit timesteps the model was trained on."
            )
        return num_inference_steps

    def check_timestep(self, t) -> int:
        """t as a Python int, refused unless it is one of ``self.timesteps`` (DDIM and PNDM step from it)."""
        self.check_ready()
        t = as_index(t)
        T = self.config.num_train_timesteps
        if not 0 <= t < T:
            raise ValueError(f"t={t} lies outside the training timesteps 0..{T - 1}; pass values from "
                             "scheduler.timesteps.")
        if not (self.timesteps.cpu() == t).any():
            shown = ", ".join(str(v) for v in self.timesteps[:5].tolist())
            raise ValueError(f"t={t} is not one of this scheduler's {len(self.timesteps)} timesteps ({shown}, ...); "
                             "loop over scheduler.timesteps, or call set_timesteps again with the number of steps "
                             "you want.")
        return t

    def index_for_timestep(self, t) -> int:
        """The position of t in ``self.timesteps`` (the first, if it is there twice)."""
        self.check_ready()
        value = torch.as_tensor(t).cpu().reshape(-1)[0]
        matches = (self.timesteps.cpu() == value).nonzero()
        if len(matches) == 0:
            shown = ", ".join(f"{v:g}" for v in self.timesteps[:5].tolist())
            raise ValueError(f"t={value.item():g} is not one of this scheduler's {len(self.timesteps)} timesteps "
                             f"({shown}, ...); pass values from scheduler.timesteps.")
        return matches[0].item()

    @staticmethod
    def check_step_inputs(model_output: torch.Tensor, x: torch.Tensor) -> None:
        """The model's output and the sample must have one shape (broadcasting would silently mix the batch)."""
        if model_output.shape != x.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but the sample x has shape "
                             f"{tuple(x.shape)}; pass the model's prediction for this very x.")

    def check_ready(self) -> None:
        if self.timesteps is None:
            raise RuntimeError(
                f"this {type(self).__name__} has no timesteps yet; call scheduler.set_timesteps(num_inference_steps) "
                "before step (and, for Euler and DPM-Solver, before scale_model_input and add_noise)."
            )

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Visit n of the T timesteps, spaced by ``config.timestep_spacing`` (DDPM and DDIM; the others refine it)."""
        num_inference_steps = self.check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        timesteps = spaced_timesteps(self.config.timestep_spacing, num_inference_steps,
                                     self.config.num_train_timesteps, self.config.steps_offset)
        self.timesteps = torch.from_numpy(timesteps.round().astype(np.int64)).to(device)

    def scale_model_input(self, x: torch.Tensor, t) -> torch.Tensor:
        """The model's input at step t: x itself for the ᾱ-parameterised schedulers."""
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Forward-noise clean samples to timestep t: √ᾱ_t x_0 + √(1 - ᾱ_t) ε (``diffusion.q_sample``)."""
        return q_sample(x0, t, noise, self.alphas_cumprod)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"


class DDPMScheduler(Scheduler):
    """Ancestral sampling: draw x_{t-1} from the Gaussian the model estimates (Ho et al. 2020).

    From the model's noise estimate, predict x̂_0 = (x_t - √(1 - ᾱ_t) ε̂) / √ᾱ_t, then sample
    the posterior q(x_{t-1} | x_t, x̂_0) = N(μ̃, σ²I) with

        μ̃ = √ᾱ_{t'} β_t / (1 - ᾱ_t) · x̂_0 + √α_t (1 - ᾱ_{t'}) / (1 - ᾱ_t) · x_t,

    where t' is the next timestep visited and β_t = 1 - ᾱ_t / ᾱ_{t'} (so skipping steps works),
    and σ² = (1 - ᾱ_{t'}) / (1 - ᾱ_t) · β_t (``fixed_small``) or β_t (``fixed_large``).
    Every step but the last adds fresh noise, so sampling needs many steps (DDPM used 1000).
    Chapter 01, section "Reverse sampling".
    """

    config_defaults = {**COMMON_DEFAULTS, "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0}
    unsupported_defaults = {**THRESHOLDING_DEFAULTS, "rescale_betas_zero_snr": False}
    choices = {"prediction_type": ("epsilon", "v_prediction", "sample"), "variance_type": ("fixed_small", "fixed_large")}
    init_noise_sigma = 1.0

    def previous_timestep(self, t: int) -> int:
        """The timestep after t in ``self.timesteps``, or -1 after the last one."""
        index = self.index_for_timestep(t)
        return self.timesteps[index + 1].item() if index + 1 < len(self.timesteps) else -1

    def step(self, model_output: torch.Tensor, t, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One ancestral step x_t -> x_{t'}; noise is drawn from ``generator`` unless t is 0."""
        self.check_step_inputs(model_output, x)
        self.check_ready()
        t = as_index(t)
        prev_t = self.previous_timestep(t)
        alpha_prod = self.alphas_cumprod[t]
        alpha_prod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        beta_prod = 1 - alpha_prod
        beta_prod_prev = 1 - alpha_prod_prev
        alpha = alpha_prod / alpha_prod_prev  # α_t over the skipped stretch
        beta = 1 - alpha

        x0 = predict_original_sample(self.config.prediction_type, model_output, x, alpha_prod, beta_prod)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

        x0_coefficient = alpha_prod_prev**0.5 * beta / beta_prod
        xt_coefficient = alpha**0.5 * beta_prod_prev / beta_prod
        mean = x0_coefficient * x0 + xt_coefficient * x
        if t == 0:
            return mean
        noise = draw_noise(model_output, generator)
        if self.config.variance_type == "fixed_small":
            variance = torch.clamp(beta_prod_prev / beta_prod * beta, min=1e-20)
        else:
            variance = beta
        return mean + variance**0.5 * noise


def predict_original_sample(prediction_type: str, model_output, x, alpha_prod, beta_prod):
    """x̂_0 from the model's output at a step where ᾱ = ``alpha_prod`` and 1 - ᾱ = ``beta_prod``.

    epsilon: x̂_0 = (x - √(1-ᾱ) ε̂) / √ᾱ;  v_prediction: x̂_0 = √ᾱ x - √(1-ᾱ) v̂;  sample: the output itself.
    """
    if prediction_type == "epsilon":
        return (x - beta_prod**0.5 * model_output) / alpha_prod**0.5
    if prediction_type == "v_prediction":
        return alpha_prod**0.5 * x - beta_prod**0.5 * model_output
    return model_output


class DDIMScheduler(Scheduler):
    """DDIM: the same trained model, a non-Markovian reverse process (Song et al. 2021).

    Predict x̂_0 and ε̂ from the model's output, then jump straight to the previous timestep:

        x_{t'} = √ᾱ_{t'} x̂_0 + √(1 - ᾱ_{t'} - σ_t²) ε̂ + σ_t z,
        σ_t = eta · √((1 - ᾱ_{t'}) / (1 - ᾱ_t) · (1 - ᾱ_t / ᾱ_{t'})).

    With eta = 0 the step is deterministic (the same noise always gives the same image) and
    50 steps replace DDPM's 1000; eta = 1 gives DDPM's variance back. After the last step
    ᾱ_{t'} is 1 (``set_alpha_to_one``) or ᾱ_0. As in diffusers, t' = t - T // n whatever the
    spacing, which is the next visited timestep only for ``leading`` spacing (and ``trailing``
    when n divides T). Chapter 01, section "DDIM: fewer, deterministic steps".
    """

    config_defaults = {**COMMON_DEFAULTS, "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True}
    unsupported_defaults = {**THRESHOLDING_DEFAULTS, "rescale_betas_zero_snr": False}
    choices = {"prediction_type": ("epsilon", "v_prediction", "sample")}
    init_noise_sigma = 1.0

    def __init__(self, **config):
        super().__init__(**config)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def step(self, model_output: torch.Tensor, t, x: torch.Tensor, eta: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One DDIM step x_t -> x_{t'}; with eta > 0 (at most 1, DDPM's variance), noise is drawn from ``generator``."""
        self.check_step_inputs(model_output, x)
        t = self.check_timestep(t)
        eta = as_float(eta, "eta")
        if not 0 <= eta <= 1:
            raise ValueError(f"eta={eta} must lie in [0, 1]: 0 is deterministic DDIM, 1 adds DDPM's noise; "
                             "outside that range the step's variance is negative or larger than the noise left.")
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod = self.alphas_cumprod[t]
        alpha_prod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod = 1 - alpha_prod

        x0 = predict_original_sample(self.config.prediction_type, model_output, x, alpha_prod, beta_prod)
        if self.config.prediction_type == "epsilon":
            eps = model_output
        elif self.config.prediction_type == "v_prediction":
            eps = alpha_prod**0.5 * model_output + beta_prod**0.5 * x
        else:
            eps = (x - alpha_prod**0.5 * x0) / beta_prod**0.5
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

        variance = (1 - alpha_prod_prev) / beta_prod * (1 - alpha_prod / alpha_prod_prev)
        std = eta * variance**0.5
        direction = (1 - alpha_prod_prev - std**2) ** 0.5 * eps  # "direction pointing to x_t"
        x_prev = alpha_prod_prev**0.5 * x0 + direction
        if eta > 0:
            x_prev = x_prev + std * draw_noise(model_output, generator)
        return x_prev


class PNDMScheduler(Scheduler):
    """Pseudo numerical methods (PNDM, Liu et al. 2022): Stable Diffusion 1.5's default sampler.

    PNDM treats the DDIM update as the "transfer" φ(x_t, ε, t -> t') and feeds it a better ε:

        φ = √(ᾱ_{t'} / ᾱ_t) x_t - (ᾱ_{t'} - ᾱ_t) ε / (ᾱ_t √(1 - ᾱ_{t'}) + √(ᾱ_t (1 - ᾱ_t) ᾱ_{t'})).

    Pseudo linear multistep (PLMS) combines the last four model outputs like Adams-Bashforth:
    ε' = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24 (with the 1-, 2- and 3-term formulas while
    the history fills up). The history must start somewhere:

    * ``skip_prk_steps=True`` (what SD uses): the first step is a plain transfer, then the
      model is asked again at the *same* timestep to average the two outputs (a Heun-like
      correction); that is why ``timesteps`` lists one timestep twice (…, 21, 1 becomes
      981, 961, 961, 941, …, 1) and has n + 1 entries;
    * ``skip_prk_steps=False``: three pseudo Runge-Kutta steps, four model calls each at
      t, t - δ/2, t - δ/2 and t - δ (δ = T // n), then PLMS; this needs n >= 4.

    Chapter 01, section "PNDM: Stable Diffusion's default".
    """

    config_defaults = {**COMMON_DEFAULTS, "skip_prk_steps": False, "set_alpha_to_one": False}
    choices = {"prediction_type": ("epsilon", "v_prediction")}
    init_noise_sigma = 1.0

    def __init__(self, **config):
        super().__init__(**config)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.reset_history()

    def reset_history(self) -> None:
        self.counter = 0  # steps taken since set_timesteps
        self.eps_history = []  # model outputs at the full timesteps, oldest first (PLMS's e_3..e_0)
        self.start_sample = None  # the sample a two-call (Heun) or four-call (Runge-Kutta) step starts from
        self.runge_kutta_sum = 0  # the Runge-Kutta average being built

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """The visited timesteps, with the extra calls that start the multistep history."""
        num_inference_steps = self.check_num_inference_steps(num_inference_steps)
        if not self.config.skip_prk_steps and num_inference_steps < 4:
            raise ValueError(
                f"PNDMScheduler with skip_prk_steps=False needs num_inference_steps >= 4 for its three "
                f"Runge-Kutta steps plus one more, got {num_inference_steps}; use more steps or skip_prk_steps=True."
            )
        self.num_inference_steps = num_inference_steps
        steps = spaced_timesteps(self.config.timestep_spacing, num_inference_steps,
                                 self.config.num_train_timesteps, self.config.steps_offset)
        steps = steps.round().astype(np.int64)  # e.g. 981, 961, ..., 21, 1
        if self.config.skip_prk_steps:
            # the second timestep is visited twice: 981, 961, 961, 941, ..., 1
            timesteps = np.concatenate([steps[:1], steps[1:2], steps[1:]])  # (n + 1,)
        else:
            half = self.config.num_train_timesteps // num_inference_steps // 2
            # three Runge-Kutta steps over the four largest timesteps, each visiting
            # s, s' + δ/2, s' + δ/2, s' on its way from s to s'
            top = steps[:4]
            runge_kutta = [[s, s_next + half, s_next + half, s_next] for s, s_next in zip(top[:-1], top[1:])]
            timesteps = np.concatenate([np.array(runge_kutta).reshape(-1), steps[3:]])  # (12 + n - 3,)
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64)).to(device)
        self.reset_history()

    def transfer(self, x: torch.Tensor, t: int, prev_t: int, eps: torch.Tensor) -> torch.Tensor:
        """PNDM's transfer φ(x_t, ε, t -> t'): the DDIM step (eta = 0) rewritten in terms of ε."""
        alpha_prod = self.alphas_cumprod[t]
        alpha_prod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod = 1 - alpha_prod
        beta_prod_prev = 1 - alpha_prod_prev
        if self.config.prediction_type == "v_prediction":
            eps = alpha_prod**0.5 * eps + beta_prod**0.5 * x
        sample_coefficient = (alpha_prod_prev / alpha_prod) ** 0.5
        eps_denominator = alpha_prod * beta_prod_prev**0.5 + (alpha_prod * beta_prod * alpha_prod_prev) ** 0.5
        return sample_coefficient * x - (alpha_prod_prev - alpha_prod) * eps / eps_denominator

    def step(self, model_output: torch.Tensor, t, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One call of the model's output; Runge-Kutta while warming up (unless skipped), then PLMS.

        ``generator`` is accepted for a uniform interface; PNDM adds no noise.
        """
        self.check_step_inputs(model_output, x)
        t = self.check_timestep(t)
        if not self.config.skip_prk_steps and self.counter < 12:
            return self.step_runge_kutta(model_output, t, x)
        return self.step_linear_multistep(model_output, t, x)

    def step_runge_kutta(self, model_output: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """Call k (0..3) of a four-call Runge-Kutta step from timestep s to s - δ.

        The four model outputs are averaged with weights 1/6, 1/3, 1/3, 1/6; the first also
        enters the PLMS history. Calls 0 and 1 transfer to s - δ/2, calls 2 and 3 to s - δ,
        always from the sample the step started from.
        """
        half = self.config.num_train_timesteps // self.num_inference_steps // 2
        call = self.counter % 4
        prev_t = t - half if call % 2 == 0 else t
        start_t = self.timesteps[self.counter - call].item()
        if call == 0:
            self.runge_kutta_sum = 1 / 6 * model_output
            self.eps_history.append(model_output)
            self.start_sample = x
        elif call in (1, 2):
            self.runge_kutta_sum = self.runge_kutta_sum + 1 / 3 * model_output
        else:
            model_output = self.runge_kutta_sum + 1 / 6 * model_output
        self.counter += 1
        return self.transfer(self.start_sample, start_t, prev_t, model_output)

    def step_linear_multistep(self, model_output: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """A PLMS step: combine the model outputs so far into ε' and transfer t -> t - δ."""
        delta = self.config.num_train_timesteps // self.num_inference_steps
        prev_t = t - delta
        if self.counter == 1 and self.config.skip_prk_steps:
            # the repeated timestep: redo the first step from its start with the average of the
            # two model outputs (the one at t + δ and this one at t)
            eps = (model_output + self.eps_history[-1]) / 2
            x, self.start_sample = self.start_sample, None
            prev_t, t = t, t + delta
        else:
            self.eps_history = self.eps_history[-3:] + [model_output]
            e = self.eps_history[::-1]  # e[0] newest
            if len(e) == 1:
                eps = e[0]
                self.start_sample = x
            elif len(e) == 2:
                eps = (3 * e[0] - e[1]) / 2
            elif len(e) == 3:
                eps = (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
            else:
                eps = 1 / 24 * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])
        self.counter += 1
        return self.transfer(x, t, prev_t, eps)


def interpolate_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """σ at (possibly fractional) timesteps, linear between the training timesteps 0..T-1 (np.interp)."""
    return np.interp(timesteps, np.arange(len(sigmas)), sigmas)


class SigmaScheduler(Scheduler):
    """What the σ-parameterised samplers share: Euler, DPM-Solver++ and Chapter 08's Euler ancestral.

    Each visited timestep has its noise level σ = √((1 - ᾱ_t) / ᾱ_t) in ``self.sigmas``, which
    holds one more: the level the last step lands on. A step counter (``step_index``, as in
    diffusers) says which σ belongs to the current step, because a timestep can come twice:
    Karras σ (``use_karras_sigmas``, see ``sigmas.py``) rounded to whole timesteps repeat the
    smallest ones, e.g. DPM-Solver++ with 50 steps visits t = 1 twice, at two different σ.
    """

    def __init__(self, **config):
        super().__init__(**config)
        self.step_index = None  # the position in ``timesteps`` of the next step

    @classmethod
    def read_config(cls, config: dict) -> dict:
        """The common checks, plus the σ-schedule keys: ``use_karras_sigmas`` a bool, ``sigma_min`` and
        ``sigma_max`` non-negative numbers (or None)."""
        values = super().read_config(config)
        if "use_karras_sigmas" in values:
            values["use_karras_sigmas"] = as_bool(values["use_karras_sigmas"], "use_karras_sigmas")
        for key in ("sigma_min", "sigma_max"):
            if values.get(key) is not None:
                values[key] = as_float(values[key], key)
                if values[key] < 0:
                    raise ValueError(f"{key}={values[key]} is a noise level and cannot be negative; pass a "
                                     f"positive {key}, or None for the trained schedule's own.")
        return values

    def training_sigmas(self) -> np.ndarray:
        """σ_t of the T training timesteps, (T,) float32, smallest (t = 0) first."""
        return (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()

    def use_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray, device=None) -> None:
        """Keep n timesteps and their n + 1 noise levels (float32), and restart the step counter."""
        self.num_inference_steps = len(timesteps)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self.sigmas = torch.from_numpy(sigmas.astype(np.float32))  # (n + 1,)
        self.step_index = None

    def set_begin_index(self, begin_index: int) -> None:
        """Start at position ``begin_index`` of ``timesteps`` (img2img skips the first steps), as diffusers'
        pipelines tell their schedulers; call it after ``set_timesteps``."""
        self.check_ready()
        begin_index = as_int(begin_index, "begin_index", minimum=0)
        if begin_index >= len(self.timesteps):
            raise ValueError(f"begin_index={begin_index} is past the last of the {len(self.timesteps)} timesteps; "
                             f"pass a position from 0 to {len(self.timesteps) - 1}.")
        self.step_index = begin_index

    def sigma_index(self, t) -> int:
        """The position of the step at timestep t: the step counter's when t is the timestep it expects,
        otherwise the first place t has in ``timesteps``.

        (Without ``set_begin_index``, diffusers takes the *second* place of a repeated timestep for
        the first step, a rule meant for img2img; it makes DPM-Solver++ with Karras σ on the cosine
        schedule, whose first timesteps repeat, skip a σ and fail. Our editing pipelines, like
        diffusers', set the begin index.)
        """
        self.check_ready()
        value = torch.as_tensor(t).cpu().reshape(-1)[0]
        if self.step_index is not None and self.step_index < len(self.timesteps) \
                and self.timesteps[self.step_index].cpu() == value:
            return self.step_index
        return self.index_for_timestep(t)

    def sigmas_for(self, t, like: torch.Tensor) -> torch.Tensor:
        """σ at each of the timesteps t (one per sample, or one for all), shaped to broadcast against ``like``."""
        t = torch.as_tensor(t).reshape(-1)
        sigma = self.sigmas[[self.sigma_index(step) for step in t]].to(like.device, like.dtype)
        return sigma.reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, ...)


class EulerDiscreteScheduler(SigmaScheduler):
    """Euler's method on the probability-flow ODE, written in σ (Karras et al. 2022, "k-diffusion").

    Rescale the noisy sample as x = x_t / √ᾱ_t; then x = x_0 + σ ε with σ_t = √((1 - ᾱ_t) / ᾱ_t),
    and the ODE is dx/dσ = (x - x̂_0) / σ. One Euler step from σ_i to σ_{i+1}:

        x_{i+1} = x_i + (σ_{i+1} - σ_i) · (x_i - x̂_0) / σ_i,   x̂_0 = x_i - σ_i ε̂.

    Sampling starts from pure noise of standard deviation σ_max (``init_noise_sigma``), and
    the model, trained on x_t, sees x / √(σ² + 1) (``scale_model_input``). Timesteps may be
    fractional (``linspace`` spacing, the default); σ is interpolated between training steps,
    and the last σ is 0 (``final_sigmas_type="zero"``) or σ_0 (``"sigma_min"``). With
    ``use_karras_sigmas=True`` the n levels are Karras et al.'s, between the spaced schedule's
    first and last σ (or ``sigma_max`` and ``sigma_min`` when given), and the timesteps the
    fractional ones they map back to (Chapter 08). Chapter 01, section "Samplers as ODE solvers: Euler".
    """

    config_defaults = {**COMMON_DEFAULTS, "timestep_spacing": "linspace", "final_sigmas_type": "zero",
                       "use_karras_sigmas": False, "sigma_min": None, "sigma_max": None}
    unsupported_defaults = {**SIGMA_SCHEDULE_DEFAULTS, "interpolation_type": "linear", "timestep_type": "discrete",
                            "rescale_betas_zero_snr": False}
    choices = {"prediction_type": ("epsilon", "v_prediction", "sample"), "final_sigmas_type": ("zero", "sigma_min")}

    def __init__(self, **config):
        super().__init__(**config)
        training_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # (T,)
        self.sigmas = torch.cat([training_sigmas.flip(0), torch.zeros(1)])  # (T + 1,), largest first

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """The standard deviation of the starting noise: σ_max, or √(σ_max² + 1) for ``leading``."""
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return self.sigmas.max()
        return (self.sigmas.max() ** 2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """The n (float) timesteps and their n + 1 sigmas, the last one final."""
        num_inference_steps = self.check_num_inference_steps(num_inference_steps)
        timesteps = spaced_timesteps(self.config.timestep_spacing, num_inference_steps,
                                     self.config.num_train_timesteps, self.config.steps_offset).astype(np.float32)
        training_sigmas = self.training_sigmas()  # (T,)
        sigmas = interpolate_sigmas(timesteps, training_sigmas)  # (n,)
        if self.config.use_karras_sigmas:
            sigma_min = sigmas[-1] if self.config.sigma_min is None else self.config.sigma_min
            sigma_max = sigmas[0] if self.config.sigma_max is None else self.config.sigma_max
            sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps)  # (n,)
            timesteps = sigma_to_timestep(sigmas, np.log(training_sigmas)).astype(np.float32)  # (n,), fractional
        final_sigma = training_sigmas[0] if self.config.final_sigmas_type == "sigma_min" else 0
        self.use_schedule(timesteps, np.concatenate([sigmas, [final_sigma]]), device)  # n + 1 sigmas

    def scale_model_input(self, x: torch.Tensor, t) -> torch.Tensor:
        """x / √(σ² + 1): back from the σ-parameterisation to the x_t the model was trained on."""
        sigma = self.sigmas[self.sigma_index(t)]
        return x / (sigma**2 + 1) ** 0.5

    def step(self, model_output: torch.Tensor, t, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One Euler step from σ_i to σ_{i+1} (deterministic; ``generator`` is unused)."""
        self.check_step_inputs(model_output, x)
        index = self.sigma_index(t)
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        x = x.to(torch.float32)
        x0 = self.predict_x0(model_output, x, sigma)
        derivative = (x - x0) / sigma
        x_next = x + derivative * (sigma_next - sigma)
        self.step_index = index + 1
        return x_next.to(model_output.dtype)

    def predict_x0(self, model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x̂_0 from the model's output at noise level σ, for x = x_0 + σ ε (the σ-parameterised sample).

        epsilon: x - σ ε̂;  v_prediction: x / (σ² + 1) - σ / √(σ² + 1) · v̂;  sample: the output itself.
        """
        if self.config.prediction_type == "epsilon":
            return x - sigma * model_output
        if self.config.prediction_type == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        return model_output

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_0 + σ_t ε, in the σ-parameterisation (t from ``self.timesteps``, one per sample or one for all)."""
        return x0 + noise * self.sigmas_for(t, x0)


class DPMSolverMultistepScheduler(SigmaScheduler):
    """DPM-Solver++(2M): a second-order multistep solver of the diffusion ODE (Lu et al. 2022).

    With α_t = √ᾱ_t, σ_t = √(1 - ᾱ_t) and the half log-SNR λ_t = log(α_t / σ_t), the ODE in
    terms of the model's x̂_0 prediction has an exact linear part; integrating it from s to t
    with h = λ_t - λ_s gives the first-order step (DDIM again):

        x_t = (σ_t / σ_s) x_s - α_t (e^{-h} - 1) x̂_0(s).

    The second-order "2M" step also uses the previous step's x̂_0 to estimate its slope in λ
    (midpoint rule): D = x̂_0(s) + (1 / 2r) (x̂_0(s) - x̂_0(s')), r = h_prev / h, and puts D in
    place of x̂_0. The first step has no history and is first order; the last one is too when
    it lands on σ = 0 or, with ``lower_order_final``, when there are fewer than 15 steps.
    Twenty steps usually look as good as PNDM's fifty. With ``use_karras_sigmas=True`` (A1111's
    "DPM++ 2M Karras", Chapter 08) the n levels are Karras et al.'s over the whole trained range
    and the timesteps the whole ones nearest to them. Chapter 01, section "DPM-Solver++".
    """

    config_defaults = {**COMMON_DEFAULTS, "timestep_spacing": "linspace", "solver_order": 2,
                       "lower_order_final": True, "euler_at_final": False, "final_sigmas_type": "zero",
                       "use_karras_sigmas": False}
    unsupported_defaults = {**THRESHOLDING_DEFAULTS, **SIGMA_SCHEDULE_DEFAULTS, "algorithm_type": "dpmsolver++",
                            "solver_type": "midpoint", "use_lu_lambdas": False, "use_flow_sigmas": False,
                            "flow_shift": 1.0, "lambda_min_clipped": -float("inf"), "variance_type": None,
                            "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
                            "time_shift_type": "exponential"}
    choices = {"prediction_type": ("epsilon", "v_prediction", "sample"), "solver_order": (1, 2),
               "final_sigmas_type": ("zero", "sigma_min")}
    init_noise_sigma = 1.0

    def __init__(self, **config):
        super().__init__(**config)
        self.previous_x0 = None  # x̂_0 of the step before, for the second-order update

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """n timesteps out of n + 1 spaced points (the last, t = 0, is replaced by the final σ), or
        with ``use_karras_sigmas`` n Karras levels from σ_{T-1} to σ_0 (the spacing is not used) and
        their timesteps, rounded, so that the smallest can repeat (truncated by the integer cast for
        the cosine schedule, as diffusers does)."""
        num_inference_steps = self.check_num_inference_steps(num_inference_steps)
        T, n, spacing = self.config.num_train_timesteps, num_inference_steps, self.config.timestep_spacing
        if spacing == "linspace":
            timesteps = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            timesteps = (np.arange(n + 1) * (T // (n + 1)))[::-1][:-1] + self.config.steps_offset
        else:
            timesteps = spaced_timesteps("trailing", n, T)
        training_sigmas = self.training_sigmas()  # (T,)
        if self.config.use_karras_sigmas:
            sigmas = karras_sigmas(training_sigmas[0], training_sigmas[-1], n)  # (n,)
            timesteps = sigma_to_timestep(sigmas, np.log(training_sigmas))
            if self.config.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = interpolate_sigmas(timesteps.astype(np.int64), training_sigmas)  # (n,)
        final_sigma = training_sigmas[0] if self.config.final_sigmas_type == "sigma_min" else 0
        self.use_schedule(timesteps.astype(np.int64), np.concatenate([sigmas, [final_sigma]]), device)  # n + 1 sigmas
        self.previous_x0 = None

    @staticmethod
    def alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) = (√ᾱ_t, √(1 - ᾱ_t)) from the ratio σ = σ_t / α_t, as diffusers computes them."""
        alpha_t = 1 / (sigma**2 + 1) ** 0.5
        return alpha_t, sigma * alpha_t

    def step(self, model_output: torch.Tensor, t, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One DPM-Solver++ step from timestep t to the next (deterministic; ``generator`` is unused)."""
        self.check_step_inputs(model_output, x)
        index = self.sigma_index(t)
        n = len(self.timesteps)
        alpha_s, sigma_s = self.alpha_sigma(self.sigmas[index])
        alpha_t, sigma_t = self.alpha_sigma(self.sigmas[index + 1])

        if self.config.prediction_type == "epsilon":
            x0 = (x - sigma_s * model_output) / alpha_s
        elif self.config.prediction_type == "v_prediction":
            x0 = alpha_s * x - sigma_s * model_output
        else:
            x0 = model_output
        x = x.to(torch.float32)

        last_step = index == n - 1
        first_order = (
            self.config.solver_order == 1
            or self.previous_x0 is None
            or (last_step and (self.config.euler_at_final or self.config.final_sigmas_type == "zero"
                               or (self.config.lower_order_final and n < 15)))
        )
        lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        h = lambda_t - lambda_s
        if first_order:
            x_next = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            alpha_prev, sigma_prev = self.alpha_sigma(self.sigmas[index - 1])
            lambda_prev = torch.log(alpha_prev) - torch.log(sigma_prev)
            r = (lambda_s - lambda_prev) / h
            D0, D1 = x0, (1.0 / r) * (x0 - self.previous_x0)
            x_next = (
                (sigma_t / sigma_s) * x
                - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
            )
        self.previous_x0 = x0
        self.step_index = index + 1
        return x_next.to(model_output.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """α_t x_0 + σ_t ε with σ from ``self.sigmas`` (t from ``self.timesteps``)."""
        alpha_t, sigma_t = self.alpha_sigma(self.sigmas_for(t, x0))
        return alpha_t * x0 + sigma_t * noise


SCHEDULERS = {cls.__name__: cls for cls in (DDPMScheduler, DDIMScheduler, PNDMScheduler,
                                             EulerDiscreteScheduler, DPMSolverMultistepScheduler)}
ALL_CONFIG_KEYS = {key for cls in SCHEDULERS.values() for key in (*cls.config_defaults, *cls.unsupported_defaults)}
