"""The one-pass, w-conditioned student: guidance embedding, distillation, loading a published bundle."""
