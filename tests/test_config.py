"""Typed configs: every YAML file names its group's schema, Hydra refuses wrong types and unknown keys
by name, and the preflight refuses bad ranges before any work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import compose_cfg
from distill.core.config import GROUP_SCHEMAS
from distill.core.errors import UserError
from distill.jobs.preflight import check_config
from student.bundle import read_config

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def test_every_config_file_names_its_schema_and_every_group_has_one() -> None:
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert groups - {"preset"} == set(GROUP_SCHEMAS)  # a preset merges at the top level: Config checks it
    for path in CONF_DIR.glob("*/*.yaml"):
        if path.parent.name != "preset":
            assert f"{path.parent.name}_schema" in OmegaConf.load(path).defaults, path
    assert OmegaConf.load(CONF_DIR / "config.yaml").defaults[0] == "config_schema"


@pytest.mark.parametrize("override, key", [
    ("seed=abc", "seed"),
    ("student.train.batch_size=abc", "student.train.batch_size"),
    ("progressive.start_steps=abc", "progressive.start_steps"),
    ("sampler.batch_size=1.5", "sampler.batch_size"),
    ("jit=maybe", "jit"),
    ("bench.step_counts=8", "bench.step_counts"),
    ("teacher.nonexistent=1", "teacher.nonexistent"),
    ("eval.students=[{name: a, bad: 1}]", "eval.students"),
])
def test_wrong_types_and_unknown_keys_are_refused_by_hydra_with_the_key(tmp_path: Path, override: str,
                                                                         key: str) -> None:
    with pytest.raises(ConfigCompositionException, match=key.replace(".", r"\.")):
        compose_cfg(tmp_path, override)


def test_a_user_preset_with_a_typo_is_refused(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    (tmp_path / "preset").mkdir()
    (tmp_path / "preset" / "mine.yaml").write_text("# @package _global_\nteacher:\n  trian:\n    steps: 3\n")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="trian"):
            compose("config", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "preset=mine"])


def test_values_keep_their_types_and_the_presets_still_compose(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, "eval.ws=[1,2]", "preset=quick", tiny=False)
    assert cfg.eval.ws == [1.0, 2.0] and all(isinstance(w, float) for w in cfg.eval.ws)
    assert cfg.run_name == "digits_quick" and cfg.progressive.start_steps == cfg.sampler.num_steps == 8
    assert cfg.negative_phase.enabled and cfg.negative_phase.train.steps == 30  # the quick run has the phase too
    check_config(cfg)
    check_config(compose_cfg(tmp_path))
    # CFG++ samples only the teacher (task=teacher checks it at sampler.guidance_lambda); a bad grid of a
    # method left out of eval.methods is not read
    check_config(compose_cfg(tmp_path, "sampler.guidance=cfgpp", "task=teacher", "sampler.guidance_interval=[0.2,0.9]"))
    check_config(compose_cfg(tmp_path, "eval.methods=[cfg,interval]", "eval.cfgpp_lambdas=[3.0]"))


@pytest.mark.parametrize("overrides, message", [
    (["eval.num_samples=0"], "eval.num_samples=0 must be an integer >= 1"),
    (["sampler.batch_size=0"], "sampler.batch_size=0 must be an integer >= 1"),
    (["model.groups=0"], "model.groups=0 must be an integer >= 1"),
    (["model.channel_mult=[]"], r"model.channel_mult=\[\] must be a non-empty list"),
    (["seed=-1"], "seed=-1 must be an integer >= 0"),
    (["eval.ws=[]"], "eval.ws is empty"),
    (["response.ws=[]"], "response.ws is empty"),
    (["teacher.check.ws=[2.0,-1.0]"], r"guidance weight w=-1.0 must be a finite number >= 0 \(teacher.check.ws\)"),
    (["eval.students=[{name: a, steps: 0}]"], r"eval.students\[0\].steps=0 must be an integer >= 1"),
    (["+teacher.train.stepz=3"], "unknown key teacher.train.stepz"),
    (["student.train.steps=0"], r"training: steps \(0\) and batch_size"),
    (["progressive.min_steps=3"], "halving start_steps 4 skips min_steps 3"),
    (["student.w_min=3", "student.w_max=1"], r"w range \[3.0, 1.0\]"),
    (["student.targets=disk"], "targets 'disk' must be online or shards"),
    (["progressive.loss=l1"], "unknown loss space 'l1'"),
    (["diffusion.schedule=sigmoid"], "unknown noise schedule 'sigmoid'"),
    (["teacher.p_uncond=1.0"], "p_uncond 1.0 must be in"),
    (["bench.repeats=0"], "bench: repeats"),
    (["sampler.guidance=cfg++"], "unknown guidance 'cfg\\+\\+' \\(choose cfg, cfgpp, classifier\\)"),
    (["sampler.guidance_lambda=1.5"], r"sampler.guidance_lambda: CFG\+\+ lambda 1.5 must be a number in \[0, 1\]"),
    (["sampler.guidance_interval=[0.8,0.2]"], r"guidance_interval: \[0.8, 0.2\] must be \[t_lo, t_hi\] with 0 <= t_lo"),
    (["sampler.guidance_interval=[0.5,1.5]"], r"\[0.5, 1.5\] must be \[t_lo, t_hi\]"),
    (["sampler.guidance=cfgpp", "task=evaluate"], "sampler.guidance=cfgpp cannot sample the one-pass student"),
    (["eval.methods=[cfg,pag]"], "eval.methods: unknown method 'pag' \\(choose from cfg, cfgpp, interval, classifier\\)"),
    (["eval.methods=[]"], r"eval.methods=\[\]: give at least one method"),
    (["eval.methods=[cfg,cfgpp]", "eval.cfgpp_lambdas=[0.5,2.0]"], "eval.cfgpp_lambdas: CFG\\+\\+ lambda 2.0"),
    (["eval.methods=[interval]", "eval.interval=[0.3,0.3]"], "eval.interval: \\[0.3, 0.3\\] must be"),
    (["student.negative=true", "student.class_gate=false"], "negative=true needs class_gate=true"),
    (["student.class_ramp=-1"], "class_ramp -1.0 must be >= 0"),
    (["sampler.classifier_scale=-1"], "sampler.classifier_scale: classifier guidance scale -1.0 must be a finite number"),
    (["eval.methods=[cfg,classifier]", "eval.classifier_scales=[1.0,-2.0]"],
     "eval.classifier_scales: classifier guidance scale -2.0 must be a finite number >= 0"),
    (["eval.methods=[classifier]", "eval.classifier_scales=[]"], "eval.classifier_scales is empty"),
    (["sampler.guidance=classifier", "task=sample"], "sampler.guidance=classifier cannot sample the one-pass student"),
    (["sampler.guidance=classifier", "sampler.guidance_interval=[0.2,0.9]", "task=teacher"],
     "guidance_interval applies to cfg and cfgpp; classifier guidance guides every step"),
    (["sampler.guidance=classifier", "task=teacher"],
     "sampler.guidance=classifier: the noise-aware classifier .*/classifier/checkpoint.safetensors is not there yet; "
     "make it first with task=classifier"),
    (["classifier.width=12"], "classifier: width 12 must be >= 1 and divisible by groups 8"),
    (["classifier.train.lr=0"], "training: lr 0.0 must be a finite number > 0"),
    (["student.negative=true", "negative_phase.enabled=true"], "adds negative classes to a stage-one student without"),
])
def test_bad_ranges_fail_before_any_work(tmp_path: Path, overrides: list[str], message: str) -> None:
    cfg = compose_cfg(tmp_path, *overrides)
    with pytest.raises(UserError, match=message):
        check_config(cfg)


@pytest.mark.parametrize("config, message", [
    ([], "is not a guidance-distilled-student config \\(a JSON list"),
    ({"format": "guidance-distilled-student", "format_version": 1, "model": {}}, "lacks the section\\(s\\) guidance"),
    ({"format": "guidance-distilled-student", "format_version": "1"}, "format_version '1'"),
])
def test_bundle_config_that_is_not_an_object_or_lacks_a_section(tmp_path: Path, config, message: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        read_config(tmp_path)
