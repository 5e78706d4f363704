"""DDIM / DDPM sampling with any number of steps, any w (or a per-step w schedule).

``predict(z, t, y, w, y_uncond) -> model output`` is either the teacher's two-pass
guided prediction or the student's one pass; the sampler does not care which.
All noise comes from a seeded numpy generator, so the same seed gives the same images.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from distill.core import diffusion as dm
from distill.core import runtime
from distill.core.errors import UserError


ENGINES = ("step", "loop", "eager")


@dataclass(frozen=True)
class SamplerSettings:
    num_steps: int = 32
    kind: str = "ddim"                 # ddim (eta as given) or ddpm (ancestral posterior steps)
    eta: float = 0.0
    schedule: str = "cosine"
    prediction: str = "v"
    w_schedule: str = "constant"       # constant | linear | cosine (each has mean w)
    clip_x0: bool = True
    dynamic_threshold: Optional[float] = None  # percentile, e.g. 0.995; None = plain clip
    engine: str = "step"               # step | loop (compiled, see SamplerStep / SamplerLoop) | eager (reference)
    guidance: str = "cfg"              # cfg | cfgpp (two-pass cells and CFG++ students; w is then CFG++'s lambda) |
                                       # classifier (a cell with a noise-aware classifier; w is the scale s)
    guidance_interval: Optional[Tuple[float, float]] = None  # guide only at steps with t_lo <= t <= t_hi

    def validate(self) -> None:
        if self.kind not in ("ddim", "ddpm"):
            raise UserError(f"sampler: unknown kind '{self.kind}' (choose ddim or ddpm)")
        if isinstance(self.num_steps, bool) or int(self.num_steps) != self.num_steps or self.num_steps < 1:
            raise UserError(f"sampler: num_steps {self.num_steps} must be an integer >= 1")
        if not 0.0 <= self.eta <= 1.0:
            raise UserError(f"sampler: eta {self.eta} must be in [0, 1]")
        if self.dynamic_threshold is not None and not 0.5 < self.dynamic_threshold <= 1.0:
            raise UserError(f"sampler: dynamic_threshold {self.dynamic_threshold} must be a percentile in (0.5, 1]")
        if self.engine not in ENGINES:
            raise UserError(f"sampler: unknown engine '{self.engine}' (choose {', '.join(ENGINES)})")
        dm.check_guidance(self.guidance)
        dm.check_interval(self.guidance_interval)
        if self.guidance == "classifier" and self.guidance_interval is not None:
            raise UserError("sampler: guidance_interval applies to cfg and cfgpp; classifier guidance guides every step")

    @property
    def stochastic(self) -> bool:
        return self.kind == "ddpm" or self.eta > 0


NOISE_STREAM = 7  # a fixed sub-stream of the run's seed, apart from training's (seed, 1|2|3, step)


def initial_noise(seed: int, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """The starting noise of ``n`` samples: the same seed gives the same noise everywhere."""
    return np.random.default_rng((int(seed), NOISE_STREAM)).standard_normal((n, *shape)).astype(np.float32)


def step_times(settings: SamplerSettings) -> list[tuple[float, float, float, float, float, float]]:
    """(t, s, alpha_t, sigma_t, alpha_s, sigma_s) for each step, noisiest first."""
    times = dm.sampling_times(settings.num_steps)
    alpha, sigma = dm.alpha_sigma(dm.logsnr_schedule(settings.schedule, times))
    alpha, sigma = alpha.astype(np.float64), sigma.astype(np.float64)
    alpha[-1], sigma[-1] = 1.0, 0.0  # the last step lands on clean data
    return [(float(times[i]), float(times[i + 1]), float(alpha[i]), float(sigma[i]),
             float(alpha[i + 1]), float(sigma[i + 1])) for i in range(settings.num_steps)]


def guided_steps(settings: SamplerSettings) -> np.ndarray:
    """(N,) bool: which steps guide (by the time the network sees); the others take one conditional pass."""
    return dm.in_interval(dm.sampling_times(settings.num_steps)[:-1], settings.guidance_interval)


def step_scales(settings: SamplerSettings, w: float) -> np.ndarray:
    """(N,) float32 guidance scale per step: the w schedule inside the guidance interval, 1 (conditional) outside."""
    ws = dm.guidance_schedule(settings.w_schedule, w, settings.num_steps)
    return np.where(guided_steps(settings), ws, np.float32(1.0)).astype(np.float32)


def network_calls_per_image(settings: SamplerSettings, passes: int) -> int:
    """Network evaluations per image of one sampler run: a two-pass cell pays 2 per guided step and 1 per
    step outside the guidance interval; a one-pass cell (the student) 1 per step."""
    guided = int(guided_steps(settings).sum())
    return settings.num_steps if passes < 2 else passes * guided + (settings.num_steps - guided)


def classifier_calls_per_image(settings: SamplerSettings) -> int:
    """Noise-aware classifier evaluations per image (each a forward and a backward pass): one per step of
    classifier guidance, none otherwise."""
    return settings.num_steps if settings.guidance == "classifier" else 0


def check_guidance_for(settings: SamplerSettings, passes: int, w: float, has_classifier: bool = False,
                       cfgpp_heads: bool = False) -> None:
    """CFG++ needs both outputs of a two-pass cell, or a CFG++ student's two heads (``cfgpp_heads``; such a cell
    samples with nothing else), and its scale (``w``) is lambda in [0, 1]; classifier guidance needs a cell with a
    noise-aware classifier (and such a cell samples with nothing else), its scale s >= 0."""
    if (settings.guidance == "classifier") != has_classifier:
        if has_classifier:
            raise UserError(f"sampler: a classifier-guided prediction samples with guidance=classifier, "
                            f"not guidance={settings.guidance}")
        raise UserError("sampler: guidance=classifier needs the unconditional teacher with a noise-aware classifier "
                        "(teacher.guidance.ClassifierGuidedPrediction); a one-pass student or a CFG teacher has none")
    if settings.guidance == "classifier":
        dm.check_classifier_scale(w, "sampler")
    if cfgpp_heads and settings.guidance != "cfgpp":
        raise UserError(f"sampler: a CFG++ student (student.target=cfgpp) samples with guidance=cfgpp only (its w "
                        f"input is CFG++'s lambda), not guidance={settings.guidance}")
    if settings.guidance != "cfgpp":
        return
    if passes < 2 and not cfgpp_heads:
        raise UserError("sampler: guidance=cfgpp needs the two-pass teacher or a CFG++ student (the guided x0 and "
                        "the unconditional noise); a one-pass CFG student has one output: sample it with guidance=cfg")
    if cfgpp_heads and settings.guidance_interval is not None:
        raise UserError("sampler: a CFG++ student guides at every step; sample it with guidance_interval=null")
    dm.check_cfgpp_lambda(w, "sampler")


def step_coefficients(settings: SamplerSettings) -> np.ndarray:
    """(N, 5) float32 per step: alpha_t, sigma_t and the update's three coefficients.

    DDIM: z_s = c1 x0 + c2 eps + c3 noise; DDPM: z_s = c1 z_t + c2 x0 + c3 noise. Made on the
    host in float64 from the same formulas the eager sampler evaluates, then rounded once.
    """
    rows = []
    for _, _, a_t, s_t, a_s, s_s in step_times(settings):
        if settings.kind == "ddpm":
            c_z, c_x0, var = dm.ddpm_coefficients(a_t, s_t, a_s, s_s)
            update = (c_z, c_x0, dm._relu(var) ** 0.5)
        else:
            update = dm.ddim_coefficients(a_t, s_t, a_s, s_s, settings.eta)
        rows.append((a_t, s_t, *update))
    return np.asarray(rows, np.float64).astype(np.float32)


def step_conditioning(cond: tuple[Any, ...], passes: int, num_steps: int, batch: int, i: int,
                      keep: Optional[int] = None) -> tuple[Any, ...]:
    """Step ``i``'s rows of a conditioning computed for all steps in one call (rows ordered
    branch, step, example), of the first ``keep`` branches (all by default; 1 = the conditional branch);
    a tensor with another row count (a per-layer constant) passes as is.
    Works on numpy arrays (the step engine, on the host) and on tensors inside a graph (the loop)."""
    rows = passes * num_steps * batch
    keep = passes if keep is None else keep
    return tuple(c.reshape((passes, num_steps, batch) + c.shape[1:])[:keep, i].reshape((keep * batch,) + c.shape[1:])
                 if c.shape[0] == rows else c for c in cond)


def conditioning_rows(times: np.ndarray, ws: np.ndarray, labels: np.ndarray, uncond_labels: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(t, y, w, y_uncond) for every step and example, step-major: the input of a cell's
    ``conditioning`` for a whole sampler."""
    n, b = len(ws), len(labels)
    return (np.repeat(np.asarray(times[:n], np.float32), b), np.tile(labels.astype(np.int32), n),
            np.repeat(np.asarray(ws, np.float32), b), np.tile(uncond_labels.astype(np.int32), n))


# ----------------------------------------------------------------------------- compiled engine
class SamplerStep(nn.Cell):
    """One sampler step as one graph: network, x0 / eps, clipping or thresholding, DDIM / DDPM update.

    The network part is the prediction cell's ``predict`` on the step's conditioning, which the
    sampler computed for all steps before the first one. The step's coefficients come in as a tensor
    (a row of :func:`step_coefficients`), so one compiled graph serves every step of every step count.
    Returns ``(z_s, x0)``; the last step of a sampler keeps ``x0``. With ``guidance=cfgpp`` the cell's
    ``predict_branches`` gives (cond, uncond) (a CFG++ student's ``predict_heads``: (guided, uncond) from its one
    pass) and the update re-noises with the unconditional noise (:func:`distill.core.diffusion.step_x0_eps`).
    With ``guidance=classifier`` the cell's ``predict_and_grad``
    gives the unconditional output and grad_z log p(y | z, t) (autodiff inside this graph), and ``w`` is the
    scale s of :func:`distill.core.diffusion.classifier_guided_output`.
    """

    def __init__(self, cell: nn.Cell, settings: SamplerSettings) -> None:
        super().__init__()
        self.cell = cell
        self.prediction = settings.prediction
        self.threshold = settings.dynamic_threshold
        self.clip = bool(settings.clip_x0) and settings.dynamic_threshold is None
        self.ddpm = settings.kind == "ddpm"
        self.stochastic = settings.stochastic
        self.cfgpp = settings.guidance == "cfgpp"
        self.heads = bool(getattr(cell, "cfgpp_heads", False))  # a CFG++ student: its one pass is already guided
        self.classifier = settings.guidance == "classifier"

    def construct(self, z, cond, w, coef, noise):
        a_t = coef[0]
        s_t = coef[1]
        if self.cfgpp:
            if self.heads:
                guided, uncond_out = self.cell.predict_heads(z, cond)
            else:
                cond_out, uncond_out = self.cell.predict_branches(z, cond)
                guided = dm.cfg_combine(cond_out, uncond_out, w.reshape(-1, 1, 1, 1))
            x0, eps = dm.step_x0_eps(z, guided, a_t, s_t, self.prediction, self.clip, self.threshold, uncond_out)
            z_t = dm.q_sample(x0, eps, a_t, s_t)  # DDPM: the posterior from the point CFG++ re-noises
        else:
            if self.classifier:
                uncond_out, grad = self.cell.predict_and_grad(z, cond)
                out = dm.classifier_guided_output(uncond_out, grad, a_t, s_t, w.reshape(-1, 1, 1, 1), self.prediction)
            else:
                out = self.cell.predict(z, cond, w)
            x0, eps = dm.step_x0_eps(z, out, a_t, s_t, self.prediction, self.clip, self.threshold)
            z_t = z
        if self.ddpm:
            z_s = coef[2] * z_t + coef[3] * x0 + coef[4] * noise
        elif self.stochastic:
            z_s = coef[2] * x0 + coef[3] * eps + coef[4] * noise
        else:
            z_s = coef[2] * x0 + coef[3] * eps
        return z_s, x0


class SamplerLoop(nn.Cell):
    """The whole N-step sampler as one graph: ``(noise, y, w, y_uncond, step_noise) -> x0``.

    The step times, coefficients and the w schedule's per-step factors are constants of the
    cell (made once); the conditioning of all steps is one batched call; the loop unrolls at
    compile time, so one graph serves one step count. ``w`` is per example (B,); ``step_noise``
    (N, B, C, H, W) is read only by stochastic samplers. Outside the guidance interval a two-pass cell's
    step is a second step cell on its one conditional pass (the choice is static per step, so it unrolls).
    """

    def __init__(self, cell: nn.Cell, settings: SamplerSettings) -> None:
        super().__init__()
        self.step = SamplerStep(cell, settings)
        self.cell = cell
        self.passes = int(getattr(cell, "passes", 1))
        self.num_steps = int(settings.num_steps)
        self.times = ms.Tensor(dm.sampling_times(settings.num_steps)[:-1].reshape(-1, 1))
        self.coef = ms.Tensor(step_coefficients(settings))
        guided = guided_steps(settings)
        self.guided = [bool(g) for g in guided]
        factor = dm.guidance_schedule(settings.w_schedule, 1.0, settings.num_steps)
        self.w_factor = ms.Tensor(np.where(guided, factor, 0.0).astype(np.float32).reshape(-1, 1))
        self.w_outside = ms.Tensor((~guided).astype(np.float32).reshape(-1, 1))  # w = 1 outside the interval
        self.one_pass = self.passes > 1 and not all(self.guided)
        if self.one_pass:
            self.conditional_step = SamplerStep(cell.one_pass(), dataclasses.replace(settings, guidance="cfg"))

    def construct(self, noise, y, w, y_uncond, step_noise):
        b = noise.shape[0]
        n = self.num_steps
        w_steps = self.w_factor * w.reshape(1, -1) + self.w_outside  # (N, B)
        cond = self.cell.conditioning((self.times * ops.ones((1, b), ms.float32)).reshape(-1), ops.tile(y, (n,)),
                                      w_steps.reshape(-1), ops.tile(y_uncond, (n,)))
        z = noise
        x0 = noise
        for i in range(n):
            noise_i = step_noise[i] if self.step.stochastic else z
            if self.guided[i] or not self.one_pass:
                cond_i = step_conditioning(cond, self.passes, n, b, i)
                z, x0 = self.step(z, cond_i, w_steps[i], self.coef[i], noise_i)
            else:
                cond_i = step_conditioning(cond, self.passes, n, b, i, keep=1)
                z, x0 = self.conditional_step(z, cond_i, w_steps[i], self.coef[i], noise_i)
        return x0


class ServingSampler(nn.Cell):
    """The whole sampler for serving: ``(noise, labels, w) -> images`` in [-1, 1], the unconditional
    branch on ``null_class``; deterministic samplers only (a stochastic one would need its step noise)."""

    def __init__(self, cell: nn.Cell, settings: SamplerSettings, null_class: int) -> None:
        super().__init__()
        if settings.stochastic:
            raise UserError(f"sampler: a {settings.kind} sampler with eta={settings.eta} draws noise every step; "
                            f"only deterministic samplers (ddim, eta 0) export as one graph")
        self.loop = SamplerLoop(cell, settings)
        self.null_class = int(null_class)

    def construct(self, noise, labels, w):
        y_uncond = ops.ones_like(labels) * self.null_class
        return ops.clamp(self.loop(noise, labels, w, y_uncond, noise), -1.0, 1.0)


class Predictor:
    """A prediction cell (``(z, t, y, w, y_uncond) -> output``) and its compiled samplers.

    Callable like the cell (jitted when ``use_jit``); :func:`sample` finds the cell here to
    compile the whole step (engine ``step``) or the whole loop (engine ``loop``) around it.
    """

    def __init__(self, cell: nn.Cell, use_jit: bool = True) -> None:
        self.cell = cell
        self.use_jit = bool(use_jit)
        self._call = _compiled(cell) if use_jit else cell
        self._methods: dict[str, Callable[..., Any]] = {}  # the cell's other methods, compiled on first use
        self._one_pass: Optional["Predictor"] = None  # a two-pass cell's conditional pass alone (guidance interval)
        self._samplers: dict[tuple, Callable[..., Any]] = {}
        self._plans: dict[tuple, list[tuple[ms.Tensor, ...]]] = {}

    @property
    def passes(self) -> int:
        return int(getattr(self.cell, "passes", 1))

    def __call__(self, z: ms.Tensor, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor, y_uncond: ms.Tensor) -> ms.Tensor:
        return self._call(z, t, y, w, y_uncond)

    def branches(self, z: ms.Tensor, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor, y_uncond: ms.Tensor
                 ) -> tuple[ms.Tensor, ms.Tensor]:
        """(cond, uncond) outputs of a two-pass cell from its one doubled-batch call (eager CFG++)."""
        return self._method("branches")(z, t, y, w, y_uncond)

    @property
    def cfgpp_heads(self) -> bool:
        """Whether the cell is a CFG++ student: one pass gives (guided, uncond) (:meth:`heads`)."""
        return bool(getattr(self.cell, "cfgpp_heads", False))

    def heads(self, z: ms.Tensor, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor, y_uncond: ms.Tensor
              ) -> tuple[ms.Tensor, ms.Tensor]:
        """A CFG++ student's (guided, uncond) outputs from its one call (eager CFG++)."""
        return self._method("heads")(z, t, y, w, y_uncond)

    @property
    def has_classifier(self) -> bool:
        return bool(getattr(self.cell, "has_classifier", False))

    def output_and_grad(self, z: ms.Tensor, t: ms.Tensor, y: ms.Tensor, w: ms.Tensor, y_uncond: ms.Tensor
                        ) -> tuple[ms.Tensor, ms.Tensor]:
        """A classifier-guided cell's unconditional output and grad_z log p(y | z, t), for the eager sampler."""
        return self._method("output_and_grad")(z, t, y, w, y_uncond)

    def _method(self, name: str) -> Callable[..., Any]:
        """The cell's method ``name``, compiled (when ``use_jit``) on its first use and kept."""
        if name not in self._methods:
            fn = getattr(self.cell, name)
            self._methods[name] = _compiled(fn) if self.use_jit else fn
        return self._methods[name]

    def one_pass(self) -> "Predictor":
        """A two-pass cell's conditional pass alone (the network on (z, t, y)), sharing its weights."""
        if self._one_pass is None:
            self._one_pass = Predictor(self.cell.one_pass(), self.use_jit)
        return self._one_pass

    def compiled(self, settings: SamplerSettings) -> Callable[..., Any]:
        """The compiled step or loop for ``settings`` (one graph per static choice, cached)."""
        static = (settings.engine, settings.kind, settings.stochastic, settings.prediction, settings.clip_x0,
                  settings.dynamic_threshold, settings.guidance)
        if settings.engine == "loop":  # the loop's constants depend on the step count and schedules too
            static += (settings.num_steps, settings.schedule, settings.eta, settings.w_schedule,
                       settings.guidance_interval)
        if static not in self._samplers:
            cls = SamplerLoop if settings.engine == "loop" else SamplerStep
            cell = cls(self.cell, settings)
            cell.set_train(False)
            self._samplers[static] = _compiled(cell) if self.use_jit else cell
        return self._samplers[static]


    def plan(self, settings: SamplerSettings, labels: np.ndarray, uncond_labels: np.ndarray, ws: np.ndarray
             ) -> list[tuple[tuple[ms.Tensor, ...], ms.Tensor, ms.Tensor]]:
        """Per step (conditioning, w, coefficients) as tensors: the conditioning of every step from
        one compiled call, the rest made once per sampler and batch (a few recent kept)."""
        b, n = len(labels), settings.num_steps
        key = (settings, b, ws.tobytes())
        if key not in self._plans:
            coef = step_coefficients(settings)
            self._plans[key] = [(ms.Tensor(np.full(b, ws[i], np.float32)), ms.Tensor(coef[i])) for i in range(n)]
            while len(self._plans) > PLANS_KEPT:
                self._plans.pop(next(iter(self._plans)))
        rows = conditioning_rows(dm.sampling_times(n), ws, labels, uncond_labels)
        cond = tuple(c.asnumpy() for c in self._method("conditioning")(*(ms.Tensor(r) for r in rows)))
        guided = guided_steps(settings)
        # mutable: a plain tuple of tensors would be a constant of the graph, compiled again per value
        return [(ms.mutable(tuple(ms.Tensor(np.ascontiguousarray(c)) for c in step_conditioning(
                    cond, self.passes, n, b, i, keep=None if guided[i] else 1))), w_vec, coef)
                for i, (w_vec, coef) in enumerate(self._plans[key])]


PLANS_KEPT = 16


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a cell or a cell's method) as one compiled graph."""
    def call(*args):
        return fn(*args)
    return runtime.jit(call)


def jit_predictor(cell: nn.Cell, use_jit: bool = True) -> Predictor:
    """The cell as a :class:`Predictor` (jitted when ``use_jit``); what :func:`sample` takes."""
    return Predictor(cell, use_jit)


# ----------------------------------------------------------------------------- sampling
def sample(
    predict: Callable[..., ms.Tensor],
    noise: np.ndarray,
    labels: np.ndarray,
    w: float,
    settings: SamplerSettings,
    uncond_labels: np.ndarray,
    seed: int = 0,
) -> np.ndarray:
    """Run the reverse process from ``noise`` (N,C,H,W) and return images in [-1, 1].

    ``predict`` is a :class:`Predictor` (any engine) or a plain callable (eager engine only, one pass).
    ``w`` is the guidance scale: CFG's w, CFG++'s lambda with ``settings.guidance == "cfgpp"``, or classifier
    guidance's s with ``"classifier"`` (``predict`` then a Predictor of a ClassifierGuidedPrediction).
    Every engine gives the same images (the step graph bit for bit, the loop to float rounding).
    """
    settings.validate()
    if noise.ndim < 2 or noise.shape[0] < 1:
        raise UserError(f"sampler: noise of shape {noise.shape} holds no image (batch must be >= 1)")
    check_guidance_for(settings, int(getattr(predict, "passes", 1)), w, bool(getattr(predict, "has_classifier", False)),
                       bool(getattr(predict, "cfgpp_heads", False)))
    if settings.engine == "eager" or not isinstance(predict, Predictor):
        return _sample_eager(predict, noise, labels, w, settings, uncond_labels, seed)
    b = noise.shape[0]
    ws = step_scales(settings, w)  # float32 per step, as the eager sampler uses
    z = ms.Tensor(noise.astype(np.float32))
    step_noise = _step_noise(settings, noise.shape, seed)
    run = predict.compiled(settings)
    if settings.engine == "loop":  # step noise is read by stochastic samplers only
        noise_all = ms.Tensor(step_noise) if step_noise is not None else z
        x0 = run(z, ms.Tensor(labels.astype(np.int32)), ms.Tensor(np.full(b, w, np.float32)),
                 ms.Tensor(uncond_labels.astype(np.int32)), noise_all)
        return np.clip(x0.asnumpy(), -1.0, 1.0)
    guided = guided_steps(settings)
    if predict.passes > 1 and not guided.all():  # outside the interval: the conditional pass alone, its own graph
        run_one_pass = predict.one_pass().compiled(dataclasses.replace(settings, guidance="cfg"))
    x0 = z
    for i, (cond, w_vec, coef) in enumerate(predict.plan(settings, labels, uncond_labels, ws)):
        noise_i = ms.Tensor(step_noise[i]) if step_noise is not None else z
        z, x0 = (run if guided[i] or predict.passes == 1 else run_one_pass)(z, cond, w_vec, coef, noise_i)
    return np.clip(x0.asnumpy(), -1.0, 1.0)


def _step_noise(settings: SamplerSettings, shape: tuple[int, ...], seed: int) -> Optional[np.ndarray]:
    """The per-step noise of a stochastic sampler, (N, *shape), drawn in the eager sampler's order
    (one draw per step but the last, which lands on x0); None for deterministic samplers."""
    if not settings.stochastic:
        return None
    rng = np.random.default_rng(seed)
    out = np.zeros((settings.num_steps, *shape), np.float32)
    for i in range(settings.num_steps - 1):
        out[i] = rng.standard_normal(shape).astype(np.float32)
    return out


def _sample_eager(predict, noise, labels, w, settings, uncond_labels, seed) -> np.ndarray:
    """The reference sampler: the update as eager MindSpore ops between network calls."""
    b = noise.shape[0]
    rng = np.random.default_rng(seed)
    z = ms.Tensor(noise.astype(np.float32))
    y = ms.Tensor(labels.astype(np.int32))
    y_uncond = ms.Tensor(uncond_labels.astype(np.int32))
    ws = step_scales(settings, w)
    guided = guided_steps(settings)
    passes = int(getattr(predict, "passes", 1))
    eta = 1.0 if settings.kind == "ddpm" else settings.eta
    x0_opts = (settings.prediction, bool(settings.clip_x0), settings.dynamic_threshold)
    for i, (t, _, a_t, s_t, a_s, s_s) in enumerate(step_times(settings)):
        t_vec = ms.Tensor(np.full(b, t, np.float32))
        w_vec = ms.Tensor(np.full(b, ws[i], np.float32))
        if guided[i] and settings.guidance == "cfgpp":
            if getattr(predict, "cfgpp_heads", False):
                out, uncond = predict.heads(z, t_vec, y, w_vec, y_uncond)
            else:
                cond, uncond = predict.branches(z, t_vec, y, w_vec, y_uncond)
                out = dm.cfg_combine(cond, uncond, w_vec.reshape(-1, 1, 1, 1))
            x0, eps = dm.step_x0_eps(z, out, a_t, s_t, *x0_opts, uncond)
            z_t = dm.q_sample(x0, eps, a_t, s_t)  # DDPM: the posterior from the point CFG++ re-noises
        elif settings.guidance == "classifier":
            uncond, grad = predict.output_and_grad(z, t_vec, y, w_vec, y_uncond)
            out = dm.classifier_guided_output(uncond, grad, a_t, s_t, w_vec.reshape(-1, 1, 1, 1), settings.prediction)
            x0, eps = dm.step_x0_eps(z, out, a_t, s_t, *x0_opts)
            z_t = z
        else:
            call = predict if guided[i] or passes == 1 else predict.one_pass()
            x0, eps = dm.step_x0_eps(z, call(z, t_vec, y, w_vec, y_uncond), a_t, s_t, *x0_opts)
            z_t = z
        if s_s == 0.0:
            z = x0
            break
        step_noise = ms.Tensor(rng.standard_normal(noise.shape).astype(np.float32)) if eta > 0 else None
        if settings.kind == "ddpm":
            z = dm.ddpm_step(z_t, x0, a_t, s_t, a_s, s_s, step_noise)
        else:
            z = dm.ddim_step(x0, eps, a_t, s_t, a_s, s_s, eta=eta, noise=step_noise)
    return np.clip(z.asnumpy(), -1.0, 1.0)


def sample_in_batches(
    predict: Callable[..., ms.Tensor],
    noise: np.ndarray,
    labels: np.ndarray,
    w: float,
    settings: SamplerSettings,
    uncond_labels: np.ndarray,
    batch_size: int,
    seed: int = 0,
    across_ranks: bool = False,
) -> np.ndarray:
    """:func:`sample` over fixed-size chunks (the last one padded, so one compiled shape).

    ``across_ranks`` (every data-parallel worker calls it): chunk c is drawn by rank c mod world
    size, exactly as one process draws it (same rows, padding and step-noise seed), and every
    rank gets all the images back; so the images are those of one process, whatever the worker count.
    """
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise UserError(f"sampler: batch size {batch_size} must be an integer >= 1")
    n = noise.shape[0]
    if n < 1:
        raise UserError("sampler: no images to sample (0 noise samples)")
    starts = list(range(0, n, batch_size))
    chunks = runtime.my_items(len(starts)) if across_ranks else range(len(starts))
    out, mine = [], []
    for c in chunks:
        start = starts[c]
        idx = np.arange(start, start + batch_size) % n  # pad by wrapping; dropped below
        imgs = sample(predict, noise[idx], labels[idx], w, settings, uncond_labels[idx], seed=seed + start)
        out.append(imgs[: min(batch_size, n - start)])
        mine.append(np.arange(start, min(start + batch_size, n)))
    if not across_ranks:
        return np.concatenate(out, axis=0)
    local = np.concatenate(out, axis=0) if out else np.zeros((0, *noise.shape[1:]), np.float32)
    return runtime.gather_rows(local, np.concatenate(mine) if mine else np.zeros(0, np.int64), n)
