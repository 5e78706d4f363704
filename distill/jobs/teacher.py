"""``task=teacher``: train (or load) the CFG teacher, then check its guided samples."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from distill.core import build, provenance
from distill.core.fileio import write_json
from distill.core.data import ImageData, load_data
from distill.core.images import save_grid_png, save_samples_npz
from distill.core.runtime import current, data_share, is_main, main_decides
from distill.jobs.common import guided_samples
from distill.core.sampling import jit_predictor
from distill.core.training import CHECKPOINT_NAME
from distill.jobs.training_run import resumed_trainer, run_and_summarise
from teacher.loading import (classifier_checkpoint_path, load_teacher, teacher_checkpoint_path, teacher_meta,
                             unet_config)
from teacher.objective import regression_loss, teacher_batch_maker
from teacher.unet import UNet, count_parameters

log = logging.getLogger(__name__)


def run_teacher(cfg: DictConfig, follow_inputs: bool = False) -> Path:
    """Train the teacher in <run>/teacher or load teacher.checkpoint. A checkpoint there made with the same
    settings and data is resumed; one made otherwise is refused, or trained again (``restart=true``, or
    ``follow_inputs`` when only the data changed)."""
    data = load_data(cfg.data)
    if cfg.teacher.checkpoint:
        load_teacher(cfg, data)  # validates; nothing to train
        log.info("using the trained teacher at %s", cfg.teacher.checkpoint)
        return teacher_checkpoint_path(cfg)
    out = build.run_dir(cfg) / "teacher"
    ucfg = unet_config(cfg.model, data)
    net, ema = UNet(ucfg), UNet(ucfg)
    settings = build.train_settings(cfg.teacher.train, int(cfg.seed), bool(cfg.jit))
    p_uncond = float(cfg.teacher.p_uncond)

    def batches(start: int):
        return teacher_batch_maker(data, settings.batch_size, settings.seed, start, cfg.diffusion.schedule,
                                   cfg.diffusion.prediction, p_uncond, data_share())

    trainer = resumed_trainer(cfg, net, ema, regression_loss, batches, settings, out, teacher_meta(ucfg, cfg, data),
                              build.restart(cfg, follow_inputs))
    log.info("teacher: %d parameters, %d train images %s, %d steps at batch %d",
             count_parameters(net), len(data.train_images), data.image_shape, settings.steps, settings.batch_size)
    train_seconds = run_and_summarise(trainer, "teacher", keep_writer=True).get("seconds", 0.0)
    writer = trainer.writer  # rank 0's; it also takes the check's scalars
    ema.set_train(False)
    # again whenever the teacher or the check's settings changed; rank 0 (which holds the files) decides and
    # every worker draws its share of the samples
    inputs = {"teacher": provenance.file_digest(out / CHECKPOINT_NAME)}
    if str(cfg.sampler.guidance) == "classifier":  # the check's samples follow the classifier too
        inputs["classifier"] = provenance.file_digest(classifier_checkpoint_path(cfg))
    made_of = provenance.record(cfg, "teacher_check", inputs) if writer is not None else {}
    stale = writer is not None and not provenance.is_fresh(provenance.read_recorded(out / "report.json"), made_of)
    if main_decides(stale):
        check_teacher(cfg, data, ema, out, writer, train_seconds, trainer.step, made_of)
    if writer is not None:
        writer.close()
    return out / CHECKPOINT_NAME


def check_teacher(cfg: DictConfig, data: ImageData, ema: UNet, out: Path, writer, train_seconds: float,
                  steps: int, made_of: dict[str, Any]) -> dict[str, Any]:
    """Guided samples at a few w, judged by the evaluation classifier: does the teacher draw digits?

    Every data-parallel worker calls it and draws its share of the samples; rank 0 (``writer`` set)
    judges them and writes the report, the others return {}."""
    from distill.jobs.common import evaluation_classifier, guidance_scales, teacher_prediction
    from distill.core.classifier import features_and_predictions
    from distill.core.metrics import accuracy

    main = is_main()
    clf = evaluation_classifier(cfg, data) if main else None
    predict = jit_predictor(teacher_prediction(cfg, data, ema), bool(cfg.jit))
    n = int(cfg.teacher.check.num_samples)
    workers = current().world_size
    report: dict[str, Any] = {"provenance": made_of, "train_seconds": round(train_seconds, 1), "steps": steps,
                              "sampler_steps": int(cfg.sampler.num_steps), "accuracy": {}}
    for w in guidance_scales(cfg, cfg.teacher.check.ws):
        imgs, labels = guided_samples(predict, data, cfg, float(w), n, int(cfg.seed), across_ranks=workers > 1)
        if not main:
            continue
        _, pred = features_and_predictions(clf, imgs)
        acc = accuracy(pred, labels)
        report["accuracy"][str(float(w))] = round(acc, 4)
        save_grid_png(imgs[: 10 * data.num_classes], out / f"samples_w{float(w):g}.png", nrow=data.num_classes)
        save_samples_npz(out / f"samples_w{float(w):g}.npz", imgs, labels, w=float(w), model="teacher")
        writer.add_scalar("teacher/sample_accuracy", acc, int(10 * float(w)))
        log.info("teacher: w=%g class accuracy of %d guided samples = %.3f", float(w), n, acc)
    if not main:
        return {}
    if workers > 1:
        report["data_parallel_workers"] = workers
    write_json(out / "report.json", report)
    return report
