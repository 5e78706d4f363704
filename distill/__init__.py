"""Guidance distillation pipeline: Hydra entry point, diffusion math, data, training, evaluation."""
