"""Hydra configs of the pipeline, installed as the package ``distill.conf`` (found by the entry point wherever it is installed).

Importing the package (Hydra does, to read it) stores the schemas its YAML files name in their defaults lists.
"""
from distill.core.config import register

register()
