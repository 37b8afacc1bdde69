"""Sigma/timestep tables of the Helios schedulers (host) and their per-step updates (device).

Two schedulers ship with Helios checkpoints:
- `HeliosDMDScheduler` (distilled): per pyramid stage a few timesteps; each step converts the flow
  prediction to x0 in float64 and re-noises it towards the stage's start point.
- `HeliosScheduler` (base/mid): UniPC (B(h) "bh1"/"bh2", multistep) or Euler over the same
  per-stage tables (or one global table when `stages == 1`).

Everything that depends on Python values (tables, mu shift, which sigma a step reads, the UniPC
order and coefficients of every step) is computed here once into a frozen `StagePlan`. The step
functions then take tensors only and make no decision on tensor values, so a CUDA graph can
capture them; per-step sigmas are 0-dim float64 tensors read from the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor

# Keys a scheduler_config.json carries that change no math.
_BOOKKEEPING = frozenset({"_class_name", "_diffusers_version", "_use_default_values", "_name_or_path"})
_CLASS_KIND = {"HeliosDMDScheduler": "dmd", "HeliosScheduler": None}  # None: read `scheduler_type`
# Keys each scheduler class understands (diffusers keeps the calculate_shift keys as extra config).
_SHIFT_KEYS = {"base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift"}
_COMMON_KEYS = {
    "num_train_timesteps",
    "shift",
    "stages",
    "stage_range",
    "gamma",
    "prediction_type",
    "use_flow_sigmas",
    "use_dynamic_shifting",
    "time_shift_type",
} | _SHIFT_KEYS
_UNIPC_KEYS = {
    "thresholding",
    "solver_order",
    "predict_x0",
    "solver_type",
    "lower_order_final",
    "disable_corrector",
    "solver_p",
    "scheduler_type",
}
_SOLVER_ALIASES = {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}  # as HeliosScheduler maps them


@dataclass(frozen=True)
class ScheduleConfig:
    """A Helios scheduler config (`scheduler/scheduler_config.json`), validated.

    `kind` is "dmd" (HeliosDMDScheduler), "unipc" or "euler" (HeliosScheduler). Defaults are the
    diffusers class defaults; note `time_shift_type` defaults differ by class (linear for DMD).
    """

    kind: str = "dmd"
    num_train_timesteps: int = 1000
    shift: float = 1.0
    stages: int = 3
    stage_range: tuple[float, ...] = (0.0, 1 / 3, 2 / 3, 1.0)
    gamma: float = 1 / 3
    prediction_type: str = "flow_prediction"
    use_flow_sigmas: bool = True
    use_dynamic_shifting: bool = False
    time_shift_type: str = "linear"
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    # HeliosScheduler only
    solver_order: int = 2
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"ScheduleConfig.{name}={getattr(self, name)!r}: {why}")

        if self.kind not in ("dmd", "unipc", "euler"):
            raise bad("kind", "must be 'dmd', 'unipc' or 'euler'")
        if self.num_train_timesteps < 2:
            raise bad("num_train_timesteps", "must be >= 2")
        if self.stages < 1:
            raise bad("stages", "must be >= 1")
        object.__setattr__(self, "stage_range", _used_stage_range(self.stage_range, self.stages))
        if len(self.stage_range) != self.stages + 1:
            raise bad("stage_range", f"needs stages + 1 = {self.stages + 1} entries")
        if any(b < a for a, b in zip(self.stage_range, self.stage_range[1:], strict=False)):
            raise bad("stage_range", "must be non-decreasing")
        if not self.gamma > 0:
            raise bad("gamma", "must be > 0 (it sets the block-noise correlation)")
        if self.prediction_type != "flow_prediction":
            raise bad("prediction_type", "only 'flow_prediction' is supported by the Helios samplers")
        if self.time_shift_type not in ("linear", "exponential"):
            raise bad("time_shift_type", "must be 'linear' or 'exponential'")
        if self.use_dynamic_shifting and self.shift != 1.0:
            raise bad("shift", "must be 1.0 when use_dynamic_shifting is on (the reference asserts it)")
        if self.solver_order < 1:
            raise bad("solver_order", "must be >= 1")
        if self.solver_type not in ("bh1", "bh2"):
            raise bad("solver_type", "must be 'bh1' or 'bh2' (midpoint/heun/logrho map to bh2)")

    @classmethod
    def from_dict(cls, config: dict[str, Any], kind: str | None = None) -> ScheduleConfig:
        """Read a diffusers scheduler config dict, honouring every value.

        The class comes from `_class_name` (or `kind` when the dict has none). Keys that change
        math but are not supported raise ValueError naming the key; bookkeeping keys are ignored.
        """
        class_name = config.get("_class_name")
        if class_name is None and kind is None:
            raise ValueError("scheduler config has no _class_name: pass kind='dmd', 'unipc' or 'euler'")
        if class_name is not None and class_name not in _CLASS_KIND:
            raise ValueError(f"_class_name={class_name!r}: expected HeliosDMDScheduler or HeliosScheduler")
        is_dmd = class_name == "HeliosDMDScheduler" or (class_name is None and kind == "dmd")
        allowed = _COMMON_KEYS if is_dmd else _COMMON_KEYS | _UNIPC_KEYS
        kw: dict[str, Any] = {}
        for key, value in config.items():
            if key in _BOOKKEEPING:
                continue
            if key not in allowed:
                owner = "HeliosDMDScheduler" if is_dmd else "HeliosScheduler"
                raise ValueError(f"scheduler config key {key!r} is not a {owner} option this runtime implements")
            kw[key] = value
        kw.setdefault("time_shift_type", "linear" if is_dmd else "exponential")
        resolved = "dmd" if is_dmd else kw.pop("scheduler_type", kind or "unipc")
        if not is_dmd and resolved == "dmd":
            raise ValueError("scheduler_type='dmd' of HeliosScheduler cannot step; use HeliosDMDScheduler")
        if kind is not None and kind != resolved:
            raise ValueError(f"kind={kind!r} contradicts the config, which describes {resolved!r}")
        _check_unipc_only_keys(kw)
        if "stage_range" in kw:
            kw["stage_range"] = tuple(float(v) for v in kw["stage_range"])
        if "disable_corrector" in kw:
            kw["disable_corrector"] = tuple(int(v) for v in kw["disable_corrector"])
        if "solver_type" in kw:
            kw["solver_type"] = _SOLVER_ALIASES.get(kw["solver_type"], kw["solver_type"])
        return cls(kind=resolved, **kw)


def _used_stage_range(values, stages: int) -> tuple[float, ...]:
    """The stage boundaries the schedulers read: the first `stages + 1` entries.

    diffusers indexes `stage_range[s]` and `stage_range[s + 1]` for `s < stages` and never looks
    further, so a config saved with the class default (four entries) and `stages=1` is valid there;
    the unread tail cannot change the result. Too few entries stay an error (in `__post_init__`).
    """
    values = tuple(float(v) for v in values)
    return values[: stages + 1] if isinstance(stages, int) and stages >= 1 else values


def _check_unipc_only_keys(kw: dict[str, Any]) -> None:
    """Pop the HeliosScheduler keys that have exactly one supported value; reject the others."""
    supported = {"thresholding": False, "predict_x0": True, "solver_p": None}
    for key, want in supported.items():
        if key in kw and kw.pop(key) != want:
            raise ValueError(f"scheduler config key {key!r} must be {want!r} for flow prediction")


# ---------------------------------------------------------------- host: stage geometry


@dataclass(frozen=True)
class _StageGeometry:
    """The per-stage tables both Helios schedulers build in `init_sigmas_for_each_stage`."""

    train_sigmas: np.ndarray  # [N] float64, descending
    ori_start_sigmas: tuple[float, ...]
    stage_timesteps: tuple[np.ndarray, ...]  # each [N] float64


def _train_sigmas(n: int, shift: float) -> np.ndarray:
    s = 1.0 - np.linspace(1, 1 / n, n + 1)
    return np.flip(shift * s / (1 + (shift - 1) * s))[:-1].copy()


@lru_cache(maxsize=16)
def _geometry(cfg: ScheduleConfig) -> _StageGeometry:
    n = cfg.num_train_timesteps
    sigmas = _train_sigmas(n, cfg.shift)
    timesteps = sigmas * n
    ori, distance = [], []
    for s in range(cfg.stages):
        start = sigmas[max(int(cfg.stage_range[s] * n), 0)].item()
        end_i = min(int(cfg.stage_range[s + 1] * n), n)
        end = sigmas[end_i].item() if end_i < n else 0.0
        ori.append(start)
        if s:
            # the transition re-noises an upsampled latent: its start sigma moves (see transition_coefficients)
            signal = 1 - start
            start = 1 - signal / (math.sqrt(1 + 1 / cfg.gamma) * (1 - signal) + signal)
        distance.append(start - end)
    total = sum(distance)
    per_stage = []
    for s in range(cfg.stages):
        r0 = sum(distance[:s]) / total if s else 0.0
        r1 = 0.9999999999999999 if s == cfg.stages - 1 else sum(distance[: s + 1]) / total
        t_max = min(timesteps[int(r0 * n)].item(), 999)
        t_min = timesteps[min(int(r1 * n), n - 1)].item()
        per_stage.append(np.linspace(t_max, t_min, n + 1)[:-1])
    return _StageGeometry(sigmas, tuple(ori), tuple(per_stage))


def ori_start_sigma(cfg: ScheduleConfig, stage: int) -> float:
    """Sigma at the start of `stage` before the block-noise correction (sets the transition's alpha/beta)."""
    _check_stage(cfg, stage)
    return _geometry(cfg).ori_start_sigmas[stage]


def _check_stage(cfg: ScheduleConfig, stage: int | None) -> None:
    if cfg.stages == 1:
        if stage not in (None, 0):
            raise ValueError(f"stage={stage}: this config has a single stage (stages=1)")
    elif stage is None or not 0 <= stage < cfg.stages:
        raise ValueError(f"stage={stage}: must be in [0, {cfg.stages}) for a {cfg.stages}-stage config")


def calculate_shift(cfg: ScheduleConfig, image_seq_len: int) -> float:
    """mu of the dynamic time shift: linear in the token count, as Flux's `calculate_shift`."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return image_seq_len * m + (cfg.base_shift - m * cfg.base_image_seq_len)


def _time_shift(cfg: ScheduleConfig, mu: float, t):
    """Shift sigmas towards the noisy end; t == 0 maps to 0 (1/0 is inf on tensors)."""
    if cfg.time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    return mu / (mu + (1 / t - 1))


# ---------------------------------------------------------------- host: plans


def _moved(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_moved(v, device) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return replace(value, **{f.name: _moved(getattr(value, f.name), device) for f in fields(value)})
    return value


@dataclass(frozen=True, eq=False)
class UniPCStepPlan:
    """Everything UniPC step i needs besides tensors; coefficients are 0-dim float64/latent-dtype tensors.

    Predictor: `x_new = cp_x * x - cp_m * m0 - cp_r * sum_k rho_p[k] * (m_{k+1} - m0) / r_p[k]`.
    Corrector (when `use_corrector`): `x = cc_x * x_last - cc_m * m0 - cc_r * (sum_k rho_c[k] *
    (m_{k+1} - m0) / r_c[k] + rho_c[-1] * (m_new - m0))`, m0 being the previous step's x0.
    `slot` is where this step's x0 goes in the ring of `solver_order` buffers; `hist_slots[k]` is m_k.
    """

    sigma: Tensor
    use_corrector: bool
    order_c: int
    order_p: int
    slot: int
    hist_slots_c: tuple[int, ...]
    hist_slots_p: tuple[int, ...]
    cc: tuple[Tensor, Tensor, Tensor]
    r_c: tuple[Tensor, ...]
    rho_c: Tensor | None
    cp: tuple[Tensor, Tensor, Tensor]
    r_p: tuple[Tensor, ...]
    rho_p: Tensor | None


@dataclass(frozen=True, eq=False)
class StagePlan:
    """The schedule of one stage (or of the whole base run): host tables as small tensors.

    timesteps: float64 [n], the scheduler's timesteps. model_timesteps: [n], the timestep the
    reference hands the transformer (int64-truncated in the pyramid pipeline, float in the base).
    sigmas: float64 [n+1], the scheduler's sigma table (last entry 0). sigma_t / sigma_next: float64
    [n], per-step values for the step functions (DMD: sigma_next = -1 on the last step, meaning
    "return x0"; Euler/UniPC: sigma_next = sigmas[i+1]). unipc: per-step UniPC plans (kind unipc).
    """

    kind: str
    stage: int | None
    mu: float | None
    timesteps: Tensor
    model_timesteps: Tensor
    sigmas: Tensor
    sigma_t: Tensor
    sigma_next: Tensor
    unipc: tuple[UniPCStepPlan, ...] = ()

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def to(self, device: torch.device | str) -> StagePlan:
        """The same plan with every table on `device` (once, before capture: steps then read device scalars)."""
        return _moved(self, device)


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: must be a positive int")


def _dmd_tables(cfg: ScheduleConfig, steps: int, stage: int | None, mu: float | None, amplify: bool):
    """timesteps [n] and sigmas [n+1] of HeliosDMDScheduler.set_timesteps, float64 like diffusers."""
    n = 2 * steps + 1 if amplify else steps + 1
    geo = _geometry(cfg)
    if cfg.stages == 1:
        sig = np.linspace(1, 1 / cfg.num_train_timesteps, n + 1)[:-1].astype(np.float32)
        if cfg.shift != 1.0:
            sig = _time_shift(cfg, cfg.shift, sig)
        timesteps = torch.from_numpy(sig * cfg.num_train_timesteps)
        sigmas = torch.from_numpy(sig)
    else:
        st = geo.stage_timesteps[stage]
        timesteps = torch.from_numpy(np.linspace(st[0], st[-1], n))
        sigmas = torch.from_numpy(np.linspace(0.999, np.linspace(0.999, 0, cfg.num_train_timesteps + 1)[-2], n))
    sigmas = torch.cat([sigmas, torch.zeros(1)])
    # DMD drops the last timestep and the second-to-last sigma: each step lands on the next one
    timesteps, sigmas = timesteps[:-1], torch.cat([sigmas[:-2], sigmas[-1:]])
    return _apply_dynamic_shift(cfg, timesteps, sigmas, stage, mu)


def _apply_dynamic_shift(cfg: ScheduleConfig, timesteps: Tensor, sigmas: Tensor, stage: int | None, mu):
    if not cfg.use_dynamic_shifting:
        return timesteps, sigmas
    if mu is None:
        raise ValueError("mu is required when use_dynamic_shifting is on (see calculate_shift)")
    sigmas = _time_shift(cfg, mu, sigmas)
    if cfg.stages == 1:
        return sigmas[:-1] * cfg.num_train_timesteps, sigmas
    st = torch.from_numpy(_geometry(cfg).stage_timesteps[stage])
    return st.min() + sigmas[:-1] * (st.max() - st.min()), sigmas


def _nearest_sigma(timesteps: Tensor, sigmas: Tensor, t: Tensor) -> Tensor:
    """The reference's lookup: truncate t to int64, take the sigma of the closest table timestep."""
    idx = torch.argmin((timesteps.double() - t.to(torch.int64).double()).abs())
    return sigmas.double()[idx]


def dmd_stage_plan(
    cfg: ScheduleConfig, steps: int, stage: int | None, mu: float | None = None, amplify: bool = False
) -> StagePlan:
    """HeliosDMDScheduler.set_timesteps(steps, stage, mu=mu, is_amplify_first_chunk=amplify) as a plan.

    amplify (first chunk of the distilled pipeline) doubles the step count. sigma_t/sigma_next are
    resolved once here the way the DMD step looks them up (timestep truncated, nearest match).
    """
    if cfg.kind != "dmd":
        raise ValueError(f"dmd_stage_plan needs a HeliosDMDScheduler config, got kind={cfg.kind!r}")
    _check_steps(steps)
    _check_stage(cfg, stage)
    timesteps, sigmas = _dmd_tables(cfg, steps, stage, mu, amplify)
    sig_t = torch.stack([_nearest_sigma(timesteps, sigmas, t) for t in timesteps])
    nxt = [_nearest_sigma(timesteps, sigmas, t) for t in timesteps[1:]] + [torch.tensor(-1.0, dtype=torch.float64)]
    return StagePlan("dmd", stage, mu, timesteps, timesteps.to(torch.int64), sigmas.double(), sig_t, torch.stack(nxt))


def helios_stage_plan(
    cfg: ScheduleConfig,
    steps: int,
    stage: int | None = None,
    mu: float | None = None,
    sigmas: np.ndarray | None = None,
    dtype: torch.dtype = torch.float32,
    int_model_timesteps: bool = True,
) -> StagePlan:
    """HeliosScheduler.set_timesteps(steps, stage, sigmas=sigmas, mu=mu) as a plan (UniPC or Euler).

    sigmas: explicit table for `stages == 1` (the base pipeline passes linspace(0.999, 0, steps+1)[:-1];
    see `base_sigmas`). dtype: the latent dtype the UniPC coefficients are rounded to, as the
    reference rounds its rho vectors to the sample's dtype. int_model_timesteps: the pyramid
    pipeline truncates the transformer's timestep to int64, the base pipeline does not.
    """
    if cfg.kind not in ("unipc", "euler"):
        raise ValueError(f"helios_stage_plan needs a HeliosScheduler config, got kind={cfg.kind!r}")
    _check_steps(steps)
    _check_stage(cfg, stage)
    if cfg.stages == 1:
        if sigmas is None:
            sigmas = np.linspace(1, 1 / cfg.num_train_timesteps, steps + 1)[:-1].astype(np.float32)
            if cfg.shift != 1.0:
                sigmas = _time_shift(cfg, cfg.shift, sigmas)
        sigmas = np.asarray(sigmas)
        if sigmas.shape != (steps,):
            raise ValueError(f"sigmas has shape {sigmas.shape}, expected ({steps},)")
        timesteps, sig = torch.from_numpy(sigmas * cfg.num_train_timesteps), torch.from_numpy(sigmas)
    else:
        if sigmas is not None:
            raise ValueError("explicit sigmas are only used when stages == 1")
        st = _geometry(cfg).stage_timesteps[stage]
        timesteps = torch.from_numpy(np.linspace(st[0], st[-1], steps))
        sig = torch.from_numpy(np.linspace(0.999, np.linspace(0.999, 0, cfg.num_train_timesteps + 1)[-2], steps))
    timesteps, table = _apply_dynamic_shift(cfg, timesteps, torch.cat([sig, torch.zeros(1)]), stage, mu)
    model_t = timesteps.to(torch.int64) if int_model_timesteps else timesteps
    unipc = _unipc_plan(cfg, table, dtype) if cfg.kind == "unipc" else ()
    return StagePlan(cfg.kind, stage, mu, timesteps, model_t, table, table[:-1].clone(), table[1:].clone(), unipc)


def base_sigmas(steps: int) -> np.ndarray:
    """The sigma table the base pipeline (HeliosPipeline) passes to set_timesteps."""
    return np.linspace(0.999, 0.0, steps + 1)[:-1]


# ---------------------------------------------------------------- host: UniPC coefficients


def _alpha_sigma(cfg: ScheduleConfig, sigma: Tensor) -> tuple[Tensor, Tensor]:
    if cfg.use_flow_sigmas:
        return 1 - sigma, torch.clamp(sigma, min=1e-8)
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def _lam(cfg: ScheduleConfig, sigma: Tensor) -> Tensor:
    a, s = _alpha_sigma(cfg, sigma)
    return torch.log(a) - torch.log(s)


def _bh_coefficients(cfg: ScheduleConfig, table: Tensor, s_to: int, s_from: int, hist: list[int], order: int):
    """The UniP/UniC scalars between table[s_from] and table[s_to]: (coef_x, coef_m0, coef_res), rks, R, b."""
    alpha_t, sigma_t = _alpha_sigma(cfg, table[s_to])
    sigma_s0 = _alpha_sigma(cfg, table[s_from])[1]
    lam_s0 = _lam(cfg, table[s_from])
    h = _lam(cfg, table[s_to]) - lam_s0
    rks = [(_lam(cfg, table[si]) - lam_s0) / h for si in hist]
    hh = -h  # predict_x0
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if cfg.solver_type == "bh1" else torch.expm1(hh)
    r_vec = torch.tensor([*rks, 1.0])
    rows, b, fact = [], [], 1
    for i in range(1, order + 1):
        rows.append(torch.pow(r_vec, i - 1))
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    coefs = (sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * b_h)
    return coefs, tuple(rks), torch.stack(rows), torch.tensor(b)


def _unipc_plan(cfg: ScheduleConfig, table: Tensor, dtype: torch.dtype) -> tuple[UniPCStepPlan, ...]:
    """Replay HeliosScheduler.step_unipc's bookkeeping (orders, warm-up, corrector) on the host."""
    n, q = table.shape[0] - 1, cfg.solver_order
    plans, lower, prev_order = [], 0, None
    for i in range(n):
        use_c = i > 0 and (i - 1) not in cfg.disable_corrector
        cc, r_c, rho_c, slots_c = (None,) * 3, (), None, ()
        if use_c:
            hist = [i - (k + 1) for k in range(1, prev_order)]
            cc, r_c, rr, bb = _bh_coefficients(cfg, table, i, i - 1, hist, prev_order)
            rho_c = torch.tensor([0.5], dtype=dtype) if prev_order == 1 else torch.linalg.solve(rr, bb).to(dtype)
            slots_c = tuple((i - 1 - k) % q for k in range(prev_order))  # m0 = previous step's x0
        order = min(q, n - i) if cfg.lower_order_final else q
        order = min(order, lower + 1)
        hist = [i - k for k in range(1, order)]
        cp, r_p, rr, bb = _bh_coefficients(cfg, table, i + 1, i, hist, order)
        rho_p = None
        if order == 2:
            rho_p = torch.tensor([0.5], dtype=dtype)
        elif order > 2:
            rho_p = torch.linalg.solve(rr[:-1, :-1], bb[:-1]).to(dtype)
        slots_p = tuple((i - k) % q for k in range(order))
        plans.append(
            UniPCStepPlan(
                table[i], use_c, prev_order or 0, order, i % q, slots_c, slots_p, cc, r_c, rho_c, cp, r_p, rho_p
            )
        )
        lower, prev_order = min(lower + 1, q), order
    return tuple(plans)


# ---------------------------------------------------------------- device: step functions


def _scalar(v: Tensor | float, device: torch.device) -> Tensor:
    """A per-step scalar as a 0-dim float64 tensor: 0-dim so it never promotes the latent dtype."""
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"a per-step scalar must have one element, got shape {tuple(v.shape)}")
        return v.reshape(())
    return torch.tensor(float(v), dtype=torch.float64, device=device)


def _finish(result: Tensor, out: Tensor | None) -> Tensor:
    if out is None:
        return result
    if out.shape != result.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(result.shape)}")
    return out.copy_(result)


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match: {shapes}")


def dmd_step(
    flow: Tensor,
    x: Tensor,
    start: Tensor,
    sigma_t: Tensor | float,
    sigma_next: Tensor | float,
    out: Tensor | None = None,
) -> Tensor:
    """One DMD step: `x0 = x - sigma_t * flow` in float64, then `(1 - sigma_next) * x0 + sigma_next * start`.

    flow: model output `[B, C, T, H, W]`; x: current latents; start: the stage's start point (the
    noise it began from). x0 is rounded to flow.dtype and the re-noised sample to start.dtype, as in
    the reference. sigma_next < 0 (the stage's last step) returns x0 instead; the choice is a
    `torch.where`, not a Python branch, so the step is graph-capturable. Scalars: plan.sigma_t[i],
    plan.sigma_next[i].
    """
    _check_same_shape(flow=flow, x=x, start=start)
    st, sn = _scalar(sigma_t, x.device).double(), _scalar(sigma_next, x.device).double()
    x0 = (x.double() - st * flow.double()).to(flow.dtype)
    renoised = ((1 - sn) * x0.double() + sn * start.double()).to(start.dtype)
    return _finish(torch.where(sn < 0, x0.to(renoised.dtype), renoised), out)


def euler_step(
    model_output: Tensor, sample: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, out: Tensor | None = None
) -> Tensor:
    """Flow-matching Euler: `sample + (sigma_next - sigma) * v`, sample upcast to float32, result in v's dtype."""
    _check_same_shape(model_output=model_output, sample=sample)
    dt = _scalar(sigma_next, sample.device) - _scalar(sigma, sample.device)
    return _finish((sample.to(torch.float32) + dt * model_output).to(model_output.dtype), out)


class UniPCState:
    """UniPC's multistep memory: a ring of `solver_order` x0 predictions and the last pre-predictor sample.

    Allocated once per shape; `reset()` is not needed between stages because every step's plan
    says which slots hold valid history (the reference resets its lists in set_timesteps).
    """

    def __init__(self, solver_order: int, shape: tuple[int, ...], dtype: torch.dtype, device=None) -> None:
        self.x0 = torch.zeros((solver_order, *shape), dtype=dtype, device=device)
        self.last_sample = torch.zeros(shape, dtype=dtype, device=device)


def _weighted_diffs(
    state: UniPCState, slots: tuple[int, ...], rks: tuple[Tensor, ...], rho: Tensor | None, m0: Tensor
) -> Tensor | None:
    """sum_k rho[k] * (m_{k+1} - m0) / rk[k] over the older x0 predictions (None when there are none)."""
    res = None
    for k, rk in enumerate(rks):
        term = rho[k] * ((state.x0[slots[k + 1]] - m0) / rk)
        res = term if res is None else res + term
    return res


def unipc_step(
    model_output: Tensor, sample: Tensor, state: UniPCState, step: UniPCStepPlan, out: Tensor | None = None
) -> Tensor:
    """One HeliosScheduler UniPC step (corrector on the incoming sample, then predictor), as planned.

    model_output: flow prediction at `sample`; state: ring buffers, updated in place; step:
    plan.unipc[i]. Returns the next sample in sample.dtype.
    """
    _check_same_shape(model_output=model_output, sample=sample)
    x0 = sample - step.sigma * model_output
    if step.use_corrector:
        m0 = state.x0[step.hist_slots_c[0]]
        c_x, c_m, c_r = step.cc
        corr = _weighted_diffs(state, step.hist_slots_c, step.r_c, step.rho_c, m0)
        inner = step.rho_c[-1] * (x0 - m0)
        inner = inner if corr is None else corr + inner
        sample = (c_x * state.last_sample - c_m * m0 - c_r * inner).to(sample.dtype)
    state.x0[step.slot].copy_(x0)
    state.last_sample.copy_(sample)
    m0 = state.x0[step.slot]
    c_x, c_m, c_r = step.cp
    x_new = c_x * sample - c_m * m0
    pred = _weighted_diffs(state, step.hist_slots_p, step.r_p, step.rho_p, m0)
    if pred is not None:
        x_new = x_new - c_r * pred
    return _finish(x_new.to(sample.dtype), out)
