"""Provenance: the config values and input digests that made a stage's output, and what differs now.

Every stage output (training checkpoints, reports, the bundle) records ``{"config": {dotted key:
value}, "inputs": {name: digest}}`` made by :func:`record`. A training run resumes only from a
checkpoint whose record equals today's (:func:`may_resume`); the pipeline remakes a report whose
record differs. Which config keys make which stage is :data:`STAGE_KEYS`, the one table of it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from distill.core.data import digest_source
from distill.core.errors import UserError
from distill.core.fileio import digest, sha256

# Config keys (a section means every key under it) whose values make each stage's output.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "teacher": ("seed", "precision", "model", "diffusion", "teacher.p_uncond", "teacher.train"),
    "teacher_check": ("seed", "diffusion", "sampler", "teacher.check", "eval.classifier"),
    "classifier": ("seed", "precision", "diffusion.schedule", "classifier.width", "classifier.levels",
                   "classifier.groups", "classifier.train"),
    "classifier_check": ("seed", "diffusion.schedule", "classifier.check"),
    "student": ("seed", "precision", "model", "diffusion", "student"),
    "student_negative": ("seed", "precision", "diffusion", "student", "negative_phase"),
    "progressive": ("seed", "precision", "diffusion", "progressive"),
    "evaluate": ("seed", "diffusion", "sampler", "eval"),
    "bench": ("seed", "jit", "device", "cpu_max_isa", "cpu_threads", "precision", "graph_mode_options", "diffusion", "sampler",
              "bench"),
    "publish": ("diffusion", "sampler", "publish"),
}
# Keys that never change what a stage makes: logging, checkpoint cadence, where things are read or
# written, and how targets reach the student (online or from shards: the same targets).
NEUTRAL = ("train.log_every", "train.checkpoint_every", "student.targets", "student.targets_dir",
           "student.targets_per_shard", "progressive.student", "progressive.start_steps", "progressive.min_steps",
           "publish.dir", "publish.overwrite")
# Tables of defaults that other keys read (student.w_power etc. take their target's row): what made an output is
# the value those keys resolved to, recorded under them, not the rows of targets it was not made with.
DEFAULT_TABLES = ("student.by_target.",)
# Keys that count only while another key has a given value (key -> (that key, value)): the student's guidance
# interval makes its targets, and interval_input its w input, only with student.target=interval; its lambda range
# counts only with student.target=cfgpp; the class ramp scales the class gate, so it counts only with the gate.
ONLY_WHEN: dict[str, tuple[str, Any]] = {"student.interval": ("student.target", "interval"),
                                         "student.interval_input": ("student.target", "interval"),
                                         "student.lambda_range": ("student.target", "cfgpp"),
                                         "student.class_ramp": ("student.class_gate", True)}

# Keys added to a stage after outputs were recorded without them: a record that lacks one still matches
# when today's value is the one here, the value that makes what the record's code made (an upgrade that
# adds an option does not make every existing run stale).
ADDED_KEYS: dict[str, Any] = {
    "sampler.guidance": "cfg", "sampler.guidance_lambda": 0.6, "sampler.guidance_interval": None,
    "sampler.classifier_scale": 1.0, "eval.methods": ["cfg"], "eval.cfgpp_lambdas": [0.2, 0.4, 0.6, 0.8, 1.0],
    "eval.interval": [0.17, 0.88], "eval.classifier_scales": [1.0, 2.0, 4.0, 8.0, 16.0], "cpu_threads": None,
    "bench.single_thread_max_batch": None, "student.target": "cfg", "progressive.w0_share": 0.0,
    "progressive.round_steps": None, "student.interval_input": False, "student.class_ramp": 0.0,
}


@dataclass(frozen=True)
class Restart:
    """When a training checkpoint made otherwise is trained again from step 0 instead of refused:
    ``settings`` = its own config values differ (``restart=true``); ``inputs`` = only what it was made
    from differs (``restart=true``, or the pipeline, where an upstream stage was just made again)."""

    settings: bool = False
    inputs: bool = False


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values), from a DictConfig or plain dicts."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, Mapping):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def stage_config(cfg: Any, stage: str) -> dict[str, Any]:
    """The config values that make ``stage``'s output, by dotted key.

    A training section's ``steps`` counts only when the learning rate depends on it (``lr_decay`` not
    constant): with a constant schedule, a run extended to more steps is the same run, continued. The
    same holds for ``progressive.round_steps`` (the rounds' own step counts) under ``progressive.train``. A
    key of :data:`ONLY_WHEN` counts only while its condition holds."""
    values: dict[str, Any] = {}
    for key in STAGE_KEYS[stage]:
        node = cfg
        for part in key.split("."):
            node = node[part]
        values.update(flatten(node, key))
    for key in list(values):
        if key.endswith(NEUTRAL) or key.startswith(DEFAULT_TABLES) \
                or (key.endswith("train.steps") and values.get(key[:-5] + "lr_decay") == "constant"):
            del values[key]
        elif key == "progressive.round_steps" and values.get("progressive.train.lr_decay") == "constant":
            del values[key]
    for key, (other, value) in ONLY_WHEN.items():
        if key in values and values.get(other, ADDED_KEYS.get(other)) != value:
            del values[key]
    return values


def record(cfg: Any, stage: str, inputs: Mapping[str, Optional[str]]) -> dict[str, Any]:
    """What made ``stage``'s output: its config values and the digests of its inputs (None = absent)."""
    return {"config": stage_config(cfg, stage), "inputs": dict(sorted(inputs.items()))}


def file_digest(path: Path) -> Optional[str]:
    """SHA-256 (first 16 hex digits) of a file's bytes; None when it does not exist."""
    path = Path(path)
    return sha256(path)[:16] if path.is_file() else None


def data_digest(data: Any) -> str:
    """Digest of a data set's content (train and held-out images and labels, class names)."""
    names = "\n".join(map(str, data.class_names)).encode()
    return digest(digest_source(data.train_images), data.train_labels, data.test_images, data.test_labels, names)[:16]


def differences(old: Optional[Mapping[str, Any]], new: Mapping[str, Any]) -> list[str]:
    """``["student.w_max 5.0 vs 3.0", "inputs.teacher 1a2b vs 3c4d"]``: what differs, old vs new."""
    old = old or {}
    diffs = []
    for section in ("config", "inputs"):
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if section == "config" and a and key not in a and key in ADDED_KEYS and _same(ADDED_KEYS[key], b[key]):
                continue  # recorded before the key existed, and today's value makes the same output
            if not _same(a.get(key, "(absent)"), b.get(key, "(absent)")):
                name = key if section == "config" else f"inputs.{key}"
                diffs.append(f"{name} {_show(a.get(key, '(absent)'))} vs {_show(b.get(key, '(absent)'))}")
    return diffs


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return a == b or (math.isnan(a) and math.isnan(b))  # 5 and 5.0 are the same value
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def is_fresh(recorded: Optional[Mapping[str, Any]], now: Mapping[str, Any]) -> bool:
    return recorded is not None and not differences(recorded, now)


def read_recorded(path: Path) -> Optional[dict[str, Any]]:
    """The ``provenance`` a JSON output recorded; None when the file is absent, unreadable or has none."""
    try:
        found = json.loads(Path(path).read_text()).get("provenance")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, dict) else None


def may_resume(path: Path, meta: Mapping[str, Any], now: Mapping[str, Any], steps: int, restart: Restart) -> bool:
    """True: resume from checkpoint ``path`` (its ``meta``) toward ``steps``; False: train again from
    step 0 (allowed by ``restart``). Otherwise a UserError names what differs."""
    recorded = meta.get("provenance")
    diffs = differences(recorded, now) if recorded else ["(no record of the settings that made it)"]
    done = int(meta.get("step", 0))
    if done > steps:
        diffs.append(f"steps {done} done vs {steps} asked")
    if not diffs:
        return True
    only_inputs = bool(recorded) and all(d.startswith("inputs.") for d in diffs)
    if restart.settings or (only_inputs and restart.inputs):
        return False
    what = "inputs" if only_inputs else "settings"
    raise UserError(f"{path} was made with other {what}: {'; '.join(diffs)} (checkpoint vs now); set "
                    f"restart=true to train it again from step 0, or use another run_dir")
