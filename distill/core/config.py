"""The config's schema: one dataclass per config group, registered in Hydra's ConfigStore.

Every YAML file under ``conf/`` names its group's schema first in its defaults list
(``- data_schema``), and ``config.yaml`` names ``config_schema``, so Hydra rejects an unknown key
or a value of the wrong type (``seed=abc``, ``teacher.train.nonexistent=1``) with the key's name
before any work. The schema holds types only: the values and their comments stay in the YAML files
(``MISSING`` here = "the YAML file sets it"). Ranges and relations between values are checked by
:func:`check_ranges` (and the checks of the floors above, gathered by ``distill.jobs.preflight``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from distill.core.errors import UserError


@dataclass
class DataConfig:
    name: str = MISSING
    root: Optional[str] = MISSING
    image_size: Optional[int] = MISSING
    held_out_fraction: float = MISSING
    split_seed: int = MISSING
    max_train: Optional[int] = MISSING
    class_names: Optional[List[str]] = MISSING
    channels: Optional[int] = MISSING
    stream: bool = MISSING


@dataclass
class ModelConfig:
    channels: int = MISSING
    channel_mult: List[int] = MISSING
    num_res_blocks: int = MISSING
    attention: bool = MISSING
    attention_resolutions: List[int] = MISSING
    groups: int = MISSING
    scale_shift_norm: bool = MISSING


@dataclass
class DiffusionConfig:
    schedule: str = MISSING
    prediction: str = MISSING


@dataclass
class TrainConfig:
    steps: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    warmup_steps: int = MISSING
    lr_decay: str = MISSING
    grad_clip: float = MISSING
    ema_decay: float = MISSING
    log_every: int = MISSING
    checkpoint_every: int = MISSING
    param_lr_scale: Dict[str, float] = field(default_factory=dict)  # optional: only the student's YAML sets it


@dataclass
class TeacherCheckConfig:
    ws: List[float] = MISSING
    num_samples: int = MISSING


@dataclass
class TeacherConfig:
    checkpoint: Optional[str] = MISSING
    p_uncond: float = MISSING
    train: TrainConfig = MISSING
    check: TeacherCheckConfig = MISSING


@dataclass
class StudentConfig:
    embed_dim: int = MISSING
    w_scale: float = MISSING
    film: bool = MISSING
    class_gate: bool = MISSING
    class_ramp: float = MISSING
    negative: bool = MISSING
    p_null_negative: float = MISSING
    w_min: float = MISSING
    w_max: float = MISSING
    w_power: float = MISSING
    w_loss_power: float = MISSING
    ws_per_input: int = MISSING
    target: str = MISSING
    interval: Optional[List[float]] = MISSING
    interval_input: bool = MISSING
    lambda_range: List[float] = MISSING
    by_target: Dict[str, Dict[str, float]] = MISSING
    loss: str = MISSING
    targets: str = MISSING
    targets_dir: Optional[str] = MISSING
    targets_per_shard: int = MISSING
    train: TrainConfig = MISSING


@dataclass
class SamplerConfig:
    kind: str = MISSING
    num_steps: int = MISSING
    eta: float = MISSING
    w: float = MISSING
    w_schedule: str = MISSING
    negative_class: Optional[int] = MISSING
    clip_x0: bool = MISSING
    dynamic_threshold: Optional[float] = MISSING
    batch_size: int = MISSING
    engine: str = MISSING
    guidance: str = MISSING
    guidance_lambda: float = MISSING
    guidance_interval: Optional[List[float]] = MISSING
    classifier_scale: float = MISSING


@dataclass
class EvalStudent:
    """One entry of ``eval.students``: ``path`` null = the run's student, ``steps`` null = its own."""

    name: str = MISSING
    path: Optional[str] = None
    steps: Optional[int] = None


@dataclass
class ClassifierConfig:
    steps: int = MISSING
    batch_size: int = MISSING
    min_accuracy: float = MISSING


@dataclass
class EvalConfig:
    ws: List[float] = MISSING
    num_samples: int = MISSING
    student: Optional[str] = MISSING
    students: List[EvalStudent] = MISSING
    progressive: bool = MISSING
    teacher_steps: Optional[int] = MISSING
    negative_classes: List[List[int]] = MISSING
    negative_samples: int = MISSING
    classifier: ClassifierConfig = MISSING
    methods: List[str] = MISSING
    cfgpp_lambdas: List[float] = MISSING
    interval: List[float] = MISSING
    classifier_scales: List[float] = MISSING


@dataclass
class BenchConfig:
    batch_sizes: List[int] = MISSING
    step_counts: List[int] = MISSING
    reference_steps: Optional[int] = MISSING
    engine: str = MISSING
    eager_models: List[str] = MISSING
    repeats: int = MISSING
    warmup: int = MISSING
    peak_matmul_size: int = MISSING
    single_thread_max_batch: Optional[int] = MISSING
    student: Optional[str] = MISSING
    few_step: bool = MISSING


@dataclass
class PublishConfig:
    dir: Optional[str] = MISSING
    few_step: bool = MISSING
    overwrite: bool = MISSING
    mindir_batch: int = MISSING
    card_ws: List[float] = MISSING


@dataclass
class SampleConfig:
    bundle: Optional[str] = MISSING
    variant: Optional[str] = MISSING
    classes: Optional[List[Any]] = MISSING  # class indices or names
    w: Optional[float] = MISSING
    negative_class: Optional[Any] = MISSING  # a class index or name
    steps: Optional[int] = MISSING
    seed: int = MISSING
    per_class: int = MISSING
    out: Optional[str] = MISSING
    allow_extrapolation: bool = MISSING


@dataclass
class ProgressiveConfig:
    student: Optional[str] = MISSING
    start_steps: int = MISSING
    min_steps: int = MISSING
    first_teacher: str = MISSING
    w_power: Optional[float] = MISSING
    w_loss_power: Optional[float] = MISSING
    loss: str = MISSING
    clip_x0: bool = MISSING
    w0_share: float = MISSING
    round_steps: Optional[List[int]] = MISSING
    train: TrainConfig = MISSING


@dataclass
class GuideClassifierCheck:
    ts: List[float] = MISSING
    num_images: Optional[int] = MISSING


@dataclass
class GuideClassifierConfig:
    """``classifier``: the noise-aware classifier of classifier guidance (``task=classifier``), not ``eval.classifier``."""

    checkpoint: Optional[str] = MISSING
    width: int = MISSING
    levels: int = MISSING
    groups: int = MISSING
    train: TrainConfig = MISSING
    check: GuideClassifierCheck = MISSING


@dataclass
class NegativePhaseConfig:
    enabled: bool = MISSING
    train: TrainConfig = MISSING


@dataclass
class ResponseConfig:
    ws: List[float] = MISSING
    num_images: int = MISSING
    student: Optional[str] = MISSING


@dataclass
class Config:
    """The top level; a preset (``@package _global_``) is checked against it as it merges in."""

    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    diffusion: DiffusionConfig = MISSING
    teacher: TeacherConfig = MISSING
    student: StudentConfig = MISSING
    sampler: SamplerConfig = MISSING
    eval: EvalConfig = MISSING
    bench: BenchConfig = MISSING
    publish: PublishConfig = MISSING
    sample: SampleConfig = MISSING
    progressive: ProgressiveConfig = MISSING
    negative_phase: NegativePhaseConfig = MISSING
    response: ResponseConfig = MISSING
    classifier: GuideClassifierConfig = MISSING
    task: str = MISSING
    run_name: str = MISSING
    run_dir: Optional[str] = MISSING
    restart: bool = MISSING
    device: str = MISSING
    cpu_max_isa: Optional[str] = MISSING
    cpu_threads: Optional[int] = MISSING
    seed: int = MISSING
    jit: bool = MISSING
    precision: str = MISSING
    distributed: bool = MISSING
    graph_mode_options: Dict[str, Any] = MISSING  # keyword arguments of mindspore.jit (checked by the runtime)


# group -> schema; each stored as <group>/<group>_schema (the name its YAML files put in their defaults list)
GROUP_SCHEMAS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "diffusion": DiffusionConfig, "teacher": TeacherConfig,
    "student": StudentConfig, "sampler": SamplerConfig, "eval": EvalConfig, "bench": BenchConfig,
    "publish": PublishConfig, "sample": SampleConfig, "progressive": ProgressiveConfig, "response": ResponseConfig,
    "classifier": GuideClassifierConfig,
    "negative_phase": NegativePhaseConfig,
}


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent; before any config is composed)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)


def config_error_line(e: BaseException) -> str:
    """Hydra's or OmegaConf's message (several lines, with hints about +key and the search path) as one
    line naming the key."""
    from omegaconf.errors import OmegaConfBaseException

    text = str(e).split("Config search path:")[0]  # a missing group option lists the search path after this
    text = re.sub(r"\s*To append to your config use \S+", "", text)
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else None
    if cause is not None:
        text = text.rstrip().rstrip(".") + ": " + str(cause)
    text = re.sub(r"\s+\w+_schema(?=\s)", "", text)  # the schemas are not options to pick
    text = re.sub(r"\s*full_key: (\S+)[\s\S]*", r" (key \1)", text)  # OmegaConf's key / type lines
    return " ".join(text.split())


def check_known_keys(cfg: Any, where: str = "") -> None:
    """Refuse keys the schema does not have (Hydra lets ``+key=value`` add them even to a typed section)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if not isinstance(cfg, (DictConfig, ListConfig)) or cfg._is_none() or cfg._is_missing() \
            or cfg._is_interpolation():  # e.g. student.interval: ${eval.interval}, checked where it points
        return
    if isinstance(cfg, ListConfig):
        for i, item in enumerate(cfg):
            check_known_keys(item, f"{where}[{i}]")
        return
    schema = OmegaConf.get_type(cfg)
    known = set(getattr(schema, "__dataclass_fields__", ()))
    for key in cfg.keys():
        name = f"{where}.{key}" if where else str(key)
        if known and key not in known:
            raise UserError(f"config: unknown key {name} (the keys of {schema.__name__} are: "
                            f"{', '.join(sorted(known))})")
        if known:
            check_known_keys(cfg._get_node(key), name)


# ----------------------------------------------------------------------------- ranges
# Counts that must be integers >= 1 (types are Hydra's business; these are the ranges).
AT_LEAST_ONE = (
    "model.channels", "model.groups", "model.num_res_blocks", "sampler.batch_size",
    "eval.num_samples", "eval.negative_samples", "eval.classifier.batch_size", "teacher.check.num_samples",
    "student.embed_dim", "student.ws_per_input", "student.targets_per_shard", "progressive.min_steps", "progressive.start_steps",
    "publish.mindir_batch", "sample.per_class", "response.num_images", "classifier.width", "classifier.levels",
    "classifier.groups",
)
AT_LEAST_ZERO = ("eval.classifier.steps", "seed")
OPTIONAL_AT_LEAST_ONE = ("eval.teacher_steps", "sample.steps", "classifier.check.num_images")
# Lists of guidance weights: at least one, each finite and >= 0.
W_LISTS = ("eval.ws", "teacher.check.ws", "response.ws", "publish.card_ws")


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_ranges(cfg: Any) -> None:
    """Counts and lists of guidance weights (one-line UserError naming the key); the data, sampler and
    training sections check their own ranges where they are built."""
    for key in AT_LEAST_ONE:
        _at_least(key, _get(cfg, key), 1)
    for key in AT_LEAST_ZERO:
        _at_least(key, _get(cfg, key), 0)
    for key in OPTIONAL_AT_LEAST_ONE:
        if _get(cfg, key) is not None:
            _at_least(key, _get(cfg, key), 1)
    mult = list(cfg.model.channel_mult)
    if not mult or any(m < 1 for m in mult):
        raise UserError(f"model.channel_mult={mult} must be a non-empty list of integers >= 1")
    for key in W_LISTS:
        ws = list(_get(cfg, key))
        if not ws:
            raise UserError(f"{key} is empty: give at least one guidance weight, e.g. {key}=[1.0]")
        bad = [w for w in ws if not (math.isfinite(w) and w >= 0)]
        if bad:
            raise UserError(f"guidance weight w={bad[0]} must be a finite number >= 0 ({key})")
    for i, entry in enumerate(cfg.eval.students):
        if entry.steps is not None:
            _at_least(f"eval.students[{i}].steps", entry.steps, 1)


def _at_least(key: str, value: Any, minimum: int) -> None:
    if value < minimum:
        raise UserError(f"{key}={value} must be an integer >= {minimum}")
