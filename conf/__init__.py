"""Hydra configs of the pipeline, installed as the package ``distill.conf`` (found by the entry point wherever it is installed)."""
