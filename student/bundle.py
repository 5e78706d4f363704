"""A published student bundle and :func:`from_pretrained`, its one-call loader.

A bundle is a folder of plain files: ``config.json`` (everything needed to rebuild and
sample), ``model.safetensors`` (the EMA weights), ``model.mindir`` (one network call) and
``sampler.mindir`` (the whole default sampler, noise / labels / w in, images out), both
fixed-batch exports for serving runtimes, ``README.md`` (model card), ``samples.png`` and
``manifest.json`` (SHA-256 and size of every other file). Loading verifies the manifest
first, then rebuilds the UNet from JSON and reads the weights from safetensors: no pickle
anywhere.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from distill.core.errors import UserError
from distill.core.fileio import json_text, sha256

FORMAT = "guidance-distilled-student"
FORMAT_VERSION = 1
CONFIG, WEIGHTS, MINDIR, SAMPLER_MINDIR = "config.json", "model.safetensors", "model.mindir", "sampler.mindir"
CARD, GRID, MANIFEST = "README.md", "samples.png", "manifest.json"
NEGATIVE_GRID = "negative_classes.png"  # rows: target class; columns: the null class, then each negative class
W_CONVENTION = "uncond + w * (cond - uncond)"


# ----------------------------------------------------------------------------- manifest
def write_manifest(folder: Path) -> dict[str, Any]:
    """SHA-256 and size of every file under ``folder`` (but the manifest itself)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "files": {p.relative_to(folder).as_posix(): {"sha256": sha256(p), "size": p.stat().st_size}
                          for p in files}}
    (folder / MANIFEST).write_text(json_text(manifest))
    return manifest


def verify_manifest(folder: Path) -> dict[str, Any]:
    """Check every listed file's presence, size and SHA-256; a UserError names the first bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"bundle not found: {folder} (run task=publish first)")
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not a student bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
        files = {str(k): (str(v["sha256"]), int(v["size"])) for k, v in manifest["files"].items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path} is not a valid bundle manifest ({type(e).__name__}: {e})") from e
    for name in (CONFIG, WEIGHTS):
        if name not in files:
            raise UserError(f"bundle manifest {path} does not list {name}")
    for name, (digest, size) in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise UserError(f"bundle manifest {path} lists a path outside the bundle: {name}")
        p = folder / name
        if not p.is_file():
            raise UserError(f"bundle {folder}: missing file {name} (listed in {MANIFEST})")
        if p.stat().st_size != size:
            raise UserError(f"checksum mismatch for {name} in {folder}: {p.stat().st_size} bytes, "
                            f"manifest says {size} (truncated or altered)")
        if sha256(p) != digest:
            raise UserError(f"checksum mismatch for {name} in {folder} (the file was altered or is corrupt)")
    return manifest


def build_net(config: dict[str, Any], weights: Path) -> Any:
    """The student UNet described by ``config`` with the weights from ``weights``, in eval mode."""
    from distill.core.weights import load_weights
    from teacher.unet import UNet, UNetConfig

    ucfg = UNetConfig.from_dict(config["model"])
    if ucfg.guidance_embed_dim <= 0:
        raise UserError("bundle config describes a network without a guidance embedding: not a student")
    if ucfg.guidance_uncond_head:  # publish refuses them: sample() and the MINDIR sampler run CFG
        raise UserError("bundle config describes a CFG++ student (two output heads): bundles hold CFG students only")
    net = UNet(ucfg)
    load_weights(net, weights)
    net.set_train(False)
    return net


# ----------------------------------------------------------------------------- the loaded model
@dataclass
class Pretrained:
    """A loaded student: ``.net`` (the UNet), ``.config`` (config.json) and :meth:`sample`."""

    net: Any
    config: dict[str, Any]
    path: Optional[Path] = None
    _predictors: dict[bool, Callable[..., Any]] = field(default_factory=dict, repr=False)  # by use_jit
    _graph: Any = field(default=None, repr=False)  # sampler.mindir, loaded on first use

    @property
    def w_range(self) -> tuple[float, float]:
        g = self.config["guidance"]
        return float(g["w_min"]), float(g["w_max"])

    @property
    def class_names(self) -> list[str]:
        return list(self.config["classes"]["names"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        i = self.config["image"]
        return int(i["channels"]), int(i["height"]), int(i["width"])

    def settings(self, num_steps: Optional[int] = None, w_schedule: str = "constant", engine: str = "step") -> Any:
        from distill.core.sampling import SamplerSettings

        s, d = self.config["sampler"], self.config["diffusion"]
        settings = SamplerSettings(
            num_steps=int(num_steps if num_steps is not None else s["num_steps"]), kind=str(s["kind"]),
            eta=float(s["eta"]), schedule=str(d["schedule"]), prediction=str(d["prediction"]),
            w_schedule=str(w_schedule), clip_x0=bool(s["clip_x0"]),
            dynamic_threshold=None if s.get("dynamic_threshold") is None else float(s["dynamic_threshold"]),
            engine=str(engine),
            # a student trained with w input 1 outside its guidance interval is sampled so (older bundles: none)
            guidance_interval=tuple(s["guidance_interval"]) if s.get("guidance_interval") else None)
        settings.validate()
        return settings

    def noise(self, n: int, seed: int) -> np.ndarray:
        """The starting noise for ``n`` images: the same seed gives the same noise."""
        from distill.core.sampling import initial_noise

        return initial_noise(seed, n, self.image_shape)

    def check_w(self, w: float, w_schedule: str, num_steps: int, allow_extrapolation: bool = False) -> None:
        from distill.core import diffusion as dm

        if not np.isfinite(w):
            raise UserError(f"guidance weight w={w} must be a finite number")
        ws = dm.guidance_schedule(w_schedule, float(w), num_steps)
        lo, hi = self.w_range
        if not allow_extrapolation and (ws.min() < lo - 1e-6 or ws.max() > hi + 1e-6):
            reach = "" if w_schedule == "constant" else f" (the {w_schedule} schedule spans {ws.min():.3g}..{ws.max():.3g})"
            raise UserError(f"w={w:g}{reach} is outside the distilled range [{lo:g}, {hi:g}]; pass "
                            f"allow_extrapolation=True (task=sample: sample.allow_extrapolation=true) to sample anyway")

    def sample(self, labels: Sequence[int] | np.ndarray, w: float, num_steps: Optional[int] = None, seed: int = 0,
               w_schedule: str = "constant", batch_size: Optional[int] = None, allow_extrapolation: bool = False,
               noise: Optional[np.ndarray] = None, use_jit: bool = True, engine: str = "step",
               negative: Optional[int] = None) -> np.ndarray:
        """Images (N x C x H x W float32 in [-1, 1]) for class ``labels`` at guidance ``w``, one pass per step.

        ``negative``: a class to guide away from, ``out(neg) + w * (out(y) - out(neg))``, still one pass
        per step (students that take a negative class: :attr:`takes_negative`); None = the null class.
        ``engine``: ``step`` (each step one compiled call), ``loop`` (the whole loop one call) or ``eager``."""
        from distill.core.sampling import jit_predictor, sample_in_batches
        from teacher.guidance import ConditionalPrediction

        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        k = len(self.class_names)
        if labels.size == 0 or labels.min() < 0 or labels.max() >= k:
            raise UserError(f"labels must be a non-empty list of class indices in [0, {k})")
        uncond = self.negative_labels(labels, negative)
        settings = self.settings(num_steps, w_schedule, engine)
        self.check_w(float(w), settings.w_schedule, settings.num_steps, allow_extrapolation)
        n = labels.size
        noise = self._noise(n, seed, noise)
        if use_jit not in self._predictors:
            self._predictors[use_jit] = jit_predictor(ConditionalPrediction(self.net), use_jit)
        batch = int(min(n, int(self.config["sampler"]["batch_size"])) if batch_size is None else batch_size)
        return sample_in_batches(self._predictors[use_jit], noise, labels.astype(np.int32), float(w), settings, uncond,
                                 batch, seed=int(seed))

    @property
    def takes_negative(self) -> bool:
        """Whether the student guides away from a negative class in its one pass (``sample(negative=K)``)."""
        return bool(self.config["model"].get("guidance_negative", False))

    def negative_labels(self, labels: np.ndarray, negative: Optional[int]) -> np.ndarray:
        """The per-image class the student guides away from: the null class, or ``negative`` (checked)."""
        n, k = labels.size, len(self.class_names)
        if negative is None:
            return np.full(n, int(self.config["classes"]["null_class"]), np.int32)
        if isinstance(negative, bool) or not isinstance(negative, (int, np.integer)) or not 0 <= negative < k:
            raise UserError(f"negative class {negative!r} is not a class index in [0, {k})")
        if not self.takes_negative:
            others = list(self.config["guidance"].get("negative_variants") or [])
            if others:
                raise UserError(f"this variant ({self.config.get('variant')}) takes no negative class; the bundle's "
                                f"{others[0]} variant does: from_pretrained(path, variant={others[0]!r}) "
                                f"(command line: sample.variant={others[0]})")
            raise UserError("this bundle's student takes no negative class (distilled without negative classes); "
                            "sample without one, or train negative_phase.enabled=true and publish again")
        if np.any(labels == negative):
            raise UserError(f"negative class {negative} equals a target class of the labels: guide away from "
                            f"another class")
        return np.full(n, int(negative), np.int32)


    def _noise(self, n: int, seed: int, noise: Optional[np.ndarray]) -> np.ndarray:
        noise = self.noise(n, seed) if noise is None else np.asarray(noise, np.float32)
        if noise.shape != (n, *self.image_shape):
            raise UserError(f"noise has shape {noise.shape}, expected {(n, *self.image_shape)}")
        return noise

    def sample_mindir(self, labels: Sequence[int] | np.ndarray, w: float, seed: int = 0,
                      noise: Optional[np.ndarray] = None, num_steps: Optional[int] = None) -> np.ndarray:
        """:meth:`sample` through the bundle's ``sampler.mindir`` (what a serving runtime runs).

        The graph was built for one step count, w schedule and batch size (``config.json``
        ``mindir_sampler``); anything else is refused, never answered with other images.
        """
        import mindspore as ms
        from mindspore import nn

        spec = self.config.get("mindir_sampler")
        if not spec or self.path is None or not (self.path / spec["file"]).is_file():
            raise UserError(f"bundle {self.path} holds no whole-sampler MINDIR (config.json mindir_sampler)")
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        b, steps = int(spec["batch_size"]), int(spec["num_steps"])
        if num_steps is not None and int(num_steps) != steps:
            raise UserError(f"{spec['file']} was built for {steps} steps, not {num_steps}: use sample(num_steps="
                            f"{num_steps}), which compiles any step count")
        if labels.size != b:
            raise UserError(f"{spec['file']} was built for batch {b}, got {labels.size} labels")
        k = len(self.class_names)
        if labels.min() < 0 or labels.max() >= k:
            raise UserError(f"labels must be class indices in [0, {k})")
        self.check_w(float(w), str(spec["w_schedule"]), steps)
        if self._graph is None:
            self._graph = nn.GraphCell(ms.load(str(self.path / spec["file"])))
        out = self._graph(ms.Tensor(self._noise(b, seed, noise)), ms.Tensor(labels.astype(np.int32)),
                                     ms.Tensor(np.full(b, float(w), np.float32)))
        return out.asnumpy()


CONFIG_SECTIONS = ("model", "guidance", "classes", "image", "sampler", "diffusion")  # what loading a bundle reads


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({e})") from e
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a {FORMAT} config (a JSON {type(config).__name__}, not an object)")
    if config.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} config (format={config.get('format')!r})")
    version = config.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{path} has format_version {version!r}; this code reads integers up to {FORMAT_VERSION}")
    missing = [k for k in CONFIG_SECTIONS if not isinstance(config.get(k), dict)]
    if missing:
        raise UserError(f"{path} lacks the section(s) {', '.join(missing)} (or they are not JSON objects)")
    return config


def variant_config(config: dict[str, Any], variant: Optional[str], listed: set[str]) -> tuple[str, dict[str, Any]]:
    """(weights file, config with the variant's sampler steps) of ``variant`` (None = the bundle's default)."""
    variants = config.get("variants")
    if not variants:  # a bundle with one student
        if variant is not None:
            raise UserError(f"this bundle has one student and no variants (asked for variant {variant!r})")
        return WEIGHTS, config
    name = variant if variant is not None else str(config.get("default_variant"))
    if name not in variants:
        raise UserError(f"bundle has no variant {name!r} (it has: {', '.join(variants)})")
    entry = variants[name]
    if entry.get("weights") not in listed:
        raise UserError(f"bundle variant {name!r}: weights {entry.get('weights')!r} are not in manifest.json")
    # a variant's own network (a phase-two student beside progressive rounds without the negative input)
    config = dict(config, variant=name, sampler=dict(config["sampler"], num_steps=int(entry["num_steps"]),
                                                     guidance_interval=entry.get("guidance_interval")),
                  model=entry.get("model", config["model"]))
    return str(entry["weights"]), config


def from_pretrained(path: str | Path, variant: Optional[str] = None) -> Pretrained:
    """Verify a published bundle's manifest, rebuild the student from config.json, load its weights.

    ``variant`` picks one of the bundle's students by its steps, e.g. ``"16step"`` (the stage-one student);
    None = the bundle's default (the few-step student). ``sample`` then uses that variant's steps.
    """
    folder = Path(path).expanduser()
    manifest = verify_manifest(folder)
    weights, config = variant_config(read_config(folder), variant, set(manifest["files"]))
    return Pretrained(build_net(config, folder / weights), config, folder)
