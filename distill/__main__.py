"""``distill task=...`` / ``python -m distill task=...``: the Hydra entry point."""
import os
from pathlib import Path

os.environ.setdefault("GLOG_v", "3")  # before mindspore is imported: only C++ errors are printed

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")  # the repo's conf/ (editable install)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from distill.app import run

    run(cfg)


if __name__ == "__main__":
    main()
