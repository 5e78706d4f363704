"""``task=classifier``: train the noise-aware classifier p(y | z_t, t) that classifier guidance follows, then its
held-out accuracy on noisy images at ``classifier.check.ts``. Resumable, skipped when up to date (the training
loop, checkpoint and provenance of the other training stages); not part of the default pipeline."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from distill.core import build, provenance
from distill.core.data import load_data
from distill.core.fileio import write_json
from distill.core.runtime import is_main
from distill.core.training import CHECKPOINT_NAME
from distill.jobs.training_run import resumed_trainer, run_and_summarise
from teacher.loading import classifier_checkpoint_path, classifier_config, classifier_meta, load_noisy_classifier
from teacher.noisy_classifier import NoisyClassifier, classifier_batch_maker, classifier_loss, noisy_accuracy
from teacher.unet import count_parameters

log = logging.getLogger(__name__)


def run_classifier(cfg: DictConfig) -> Path:
    """Train the classifier in <run>/classifier (or check ``classifier.checkpoint``); returns its checkpoint."""
    data = load_data(cfg.data)
    if cfg.classifier.checkpoint:
        load_noisy_classifier(cfg, data)  # validates; nothing to train
        log.info("using the trained noise-aware classifier at %s", cfg.classifier.checkpoint)
        return classifier_checkpoint_path(cfg)
    out = build.run_dir(cfg) / "classifier"
    ccfg = classifier_config(cfg.classifier, data)
    net, ema = NoisyClassifier(ccfg), NoisyClassifier(ccfg)
    settings = build.train_settings(cfg.classifier.train, int(cfg.seed), bool(cfg.jit))

    def batches(start: int):
        return classifier_batch_maker(data, settings.batch_size, settings.seed, start, str(cfg.diffusion.schedule))

    trainer = resumed_trainer(cfg, net, ema, classifier_loss, batches, settings, out, classifier_meta(ccfg, cfg, data),
                              build.restart(cfg))
    log.info("classifier: %d parameters, %d steps at batch %d", count_parameters(net), settings.steps,
             settings.batch_size)
    run_and_summarise(trainer, "classifier")
    if not is_main():
        return out / CHECKPOINT_NAME
    ema.set_train(False)
    made_of = provenance.record(cfg, "classifier_check", {"classifier": provenance.file_digest(out / CHECKPOINT_NAME)})
    if not provenance.is_fresh(provenance.read_recorded(out / "report.json"), made_of):
        check_classifier(cfg, data, ema, out, trainer.step, made_of)
    return out / CHECKPOINT_NAME


def check_classifier(cfg: DictConfig, data: Any, net: NoisyClassifier, out: Path, steps: int,
                     made_of: dict[str, Any]) -> dict[str, Any]:
    """Held-out accuracy at each ``classifier.check.ts`` (rank 0), written to ``<out>/report.json``."""
    n = cfg.classifier.check.num_images
    images, labels = data.test_images[:n], data.test_labels[:n]
    accuracy = {str(float(t)): round(noisy_accuracy(net, images, labels, float(t), str(cfg.diffusion.schedule),
                                                    int(cfg.seed)), 4) for t in cfg.classifier.check.ts}
    log.info("classifier: held-out accuracy on noisy images %s", "  ".join(f"t={t}: {a:.3f}" for t, a in accuracy.items()))
    report = {"provenance": made_of, "steps": steps, "num_images": int(len(labels)), "accuracy": accuracy}
    write_json(out / "report.json", report)
    return report
