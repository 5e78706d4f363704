"""Provenance and freshness: what made each output is recorded; resuming from a checkpoint made otherwise is
refused with the keys that differ (or, with restart=true, trained again); a changed input makes the stages
downstream of it stale."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_RUN, compose_cfg, copy_run
from distill.core import provenance
from distill.core.checkpoint import read_meta
from distill.core.data import load_data
from distill.core.errors import UserError
from distill.core.provenance import Restart, differences, may_resume, stage_config

CKPT = "checkpoint.safetensors"


def test_stage_config_leaves_out_logging_places_and_a_constant_schedules_steps(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path)
    teacher, student = stage_config(cfg, "teacher"), stage_config(cfg, "student")
    assert teacher["teacher.p_uncond"] == 0.1 and teacher["model.channels"] == 8 and teacher["seed"] == 0
    assert "teacher.train.log_every" not in teacher and "teacher.train.checkpoint_every" not in teacher
    assert "teacher.train.steps" not in teacher  # lr_decay constant: more steps continue the same run
    assert student["student.train.steps"] == 4  # lr_decay cosine: the schedule depends on the total
    assert "student.targets_dir" not in student and "student.targets" not in student
    assert "eval.ws" not in teacher and stage_config(cfg, "evaluate")["eval.ws"] == list(cfg.eval.ws)


def test_differences_name_the_keys_and_may_resume_decides() -> None:
    old = {"config": {"student.w_max": 5.0, "student.loss": "x_snr_trunc", "seed": 0}, "inputs": {"teacher": "aa"}}
    same = json.loads(json.dumps(old))
    settings = {"config": dict(old["config"], **{"student.w_max": 3, "student.loss": "eps"}), "inputs": old["inputs"]}
    inputs = {"config": old["config"], "inputs": {"teacher": "bb"}}
    assert differences(old, same) == [] and differences(old, {"config": {"seed": 0.0, "student.w_max": 5,
                                                                         "student.loss": "x_snr_trunc"},
                                                              "inputs": {"teacher": "aa"}}) == []
    assert differences(old, settings) == ["student.loss x_snr_trunc vs eps", "student.w_max 5.0 vs 3"]
    assert differences(old, inputs) == ["inputs.teacher aa vs bb"]
    meta = {"provenance": old, "step": 4}
    path = Path("run/student/checkpoint.safetensors")
    assert may_resume(path, meta, same, 4, Restart())
    with pytest.raises(UserError, match=r"made with other settings: student.loss x_snr_trunc vs eps; student.w_max "
                                        r"5.0 vs 3 \(checkpoint vs now\); set restart=true"):
        may_resume(path, meta, settings, 4, Restart(inputs=True))  # the pipeline does not override settings
    assert not may_resume(path, meta, settings, 4, Restart(settings=True, inputs=True))
    with pytest.raises(UserError, match="made with other inputs: inputs.teacher aa vs bb"):
        may_resume(path, meta, inputs, 4, Restart())
    assert not may_resume(path, meta, inputs, 4, Restart(inputs=True))
    with pytest.raises(UserError, match="steps 4 done vs 2 asked"):
        may_resume(path, meta, same, 2, Restart(inputs=True))
    with pytest.raises(UserError, match="no record of the settings"):
        may_resume(path, {"step": 1}, same, 4, Restart(inputs=True))


def test_a_record_made_before_a_key_existed_matches_only_at_that_keys_added_value(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, "task=evaluate")
    now = {"config": stage_config(cfg, "evaluate"), "inputs": {}}
    added = [k for k in now["config"] if k in provenance.ADDED_KEYS]
    assert "eval.methods" in added and "sampler.guidance" in added
    old = {"config": {k: v for k, v in now["config"].items() if k not in added}, "inputs": {}}
    assert differences(old, now) == []  # today's defaults make what the older code made
    other = compose_cfg(tmp_path, "task=evaluate", "eval.methods=[cfg,cfgpp]", "sampler.guidance_interval=[0.2,0.8]")
    assert differences(old, {"config": stage_config(other, "evaluate"), "inputs": {}}) == [
        "eval.methods (absent) vs [\"cfg\", \"cfgpp\"]", "sampler.guidance_interval (absent) vs [0.2, 0.8]"]
    assert differences({}, now) != []  # no record at all is never fresh


def test_resume_with_other_student_settings_is_refused_then_restart_trains_again(tiny_run: Path,
                                                                                  tmp_path: Path) -> None:
    """The issue's case: ``student.w_max=3 student.loss=eps`` on a finished student kept the old model."""
    from distill.jobs.distill import run_distill

    run = copy_run(tiny_run, tmp_path, ("teacher", "student"))
    before = (run / "student" / CKPT).read_bytes()
    for more in ([], ["student.train.steps=6"]):  # finished, or with more steps to go: both refused
        with pytest.raises(UserError, match=r"student.loss x_snr_trunc vs eps; (student.train.steps 4 vs 6; )?"
                                            r"student.w_max 5.0 vs 3.0"):
            run_distill(compose_cfg(run, *TINY_RUN, "student.w_max=3", "student.loss=eps", *more))
    assert (run / "student" / CKPT).read_bytes() == before
    run_distill(compose_cfg(run, *TINY_RUN, "student.w_max=3", "student.loss=eps", "restart=true"))
    meta = read_meta(run / "student" / CKPT)
    assert (meta["w_max"], meta["loss"], meta["step"]) == (3.0, "eps", 4)
    assert meta["provenance"]["config"]["student.w_max"] == 3.0
    run_distill(compose_cfg(run, *TINY_RUN, "student.w_max=3", "student.loss=eps"))  # now the same: resumes (done)
    assert read_meta(run / "student" / CKPT) == meta


def test_a_retrained_teacher_makes_the_student_stale(tiny_run: Path, tmp_path: Path) -> None:
    """Alone, ``task=distill`` refuses a student of the old teacher; the pipeline's way (follow_inputs) trains it
    again. The teacher itself continues to more steps (constant lr) and its check report follows it."""
    from distill.jobs.distill import run_distill
    from distill.jobs.teacher import run_teacher

    run = copy_run(tiny_run, tmp_path, ("teacher", "student"))
    old_report = json.loads((run / "teacher" / "report.json").read_text())
    run_teacher(compose_cfg(run, "teacher.train.steps=6"))
    teacher = run / "teacher" / CKPT
    assert read_meta(teacher)["step"] == 6
    report = json.loads((run / "teacher" / "report.json").read_text())
    assert report["provenance"]["inputs"]["teacher"] == provenance.file_digest(teacher) != \
        old_report["provenance"]["inputs"]["teacher"]
    cfg = compose_cfg(run, *TINY_RUN, "teacher.train.steps=6")
    with pytest.raises(UserError, match=r"student/checkpoint.safetensors was made with other inputs: inputs.teacher"):
        run_distill(cfg)
    run_distill(cfg, follow_inputs=True)
    assert read_meta(run / "student" / CKPT)["provenance"]["inputs"]["teacher"] == provenance.file_digest(teacher)


def test_report_stages_record_what_made_them(tiny_run: Path, tmp_path: Path) -> None:
    from distill.jobs.bench import bench_provenance
    from distill.jobs.evaluate import evaluate_provenance
    from distill.jobs.publish import publish_provenance

    cfg = compose_cfg(tiny_run, *TINY_RUN)
    data = load_data(cfg.data)
    made = evaluate_provenance(cfg, data)
    assert set(made["inputs"]) == {"data", "teacher", "student_4step", "student_2step"}
    assert made["inputs"]["student_2step"] == provenance.file_digest(tiny_run / "progressive/steps_2" / CKPT)
    assert differences(made, evaluate_provenance(compose_cfg(tiny_run, *TINY_RUN, "eval.ws=[1.0]"), data)) == \
        [f"eval.ws {json.dumps(list(cfg.eval.ws))} vs [1.0]"]
    assert set(bench_provenance(cfg, data)["inputs"]) == {"teacher", "student", "student_2step"}
    assert "bench.repeats" in bench_provenance(cfg, data)["config"]
    published = publish_provenance(cfg, data)
    assert published["inputs"]["evaluation"] == provenance.file_digest(tiny_run / "evaluate" / "report.json")
    assert "publish.overwrite" not in published["config"] and published["config"]["publish.card_ws"] == [0, 1, 2, 4]
