"""``distill task=...`` / ``python -m distill task=...``: the Hydra entry point."""
import os
import sys

os.environ.setdefault("GLOG_v", "3")  # before mindspore is imported: only C++ errors are printed

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


CONFIG_PACKAGE = "pkg://distill.conf"  # conf/, installed as package data (a user's dir: hydra.searchpath)
# Under msrun the scheduler and every worker run this entry point; only worker 0 writes Hydra's
# config copy and log file (the others log to their msrun log only).
SECONDARY_PROCESS_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=stdout")


def is_secondary_process() -> bool:
    role = os.environ.get("MS_ROLE")
    return role == "MS_SCHED" or (role == "MS_WORKER" and os.environ.get("RANK_ID", "0") != "0")


@hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from distill.app import run

    run(cfg)


def main() -> None:
    if is_secondary_process():
        sys.argv.extend(SECONDARY_PROCESS_OVERRIDES)
    hydra_main()


if __name__ == "__main__":
    main()
