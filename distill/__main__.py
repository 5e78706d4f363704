"""``distill task=...`` / ``python -m distill task=...``: the Hydra entry point."""
import os
import sys

os.environ.setdefault("GLOG_v", "3")  # before mindspore is imported: only C++ errors are printed

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from distill.core.config import config_error_line, register  # noqa: E402

CONFIG_PACKAGE = "pkg://distill.conf"  # conf/, installed as package data (a user's dir: hydra.searchpath)
# Under msrun the scheduler and every worker run this entry point; only worker 0 writes Hydra's
# config copy and log file (the others log to their msrun log only).
SECONDARY_PROCESS_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=stdout")
CONFIG_ERROR_EXIT = 2  # as distill.core.errors.UserError
_job_errors: list[BaseException] = []  # what a job raised, told apart from Hydra's own config errors


def is_secondary_process() -> bool:
    role = os.environ.get("MS_ROLE")
    return role == "MS_SCHED" or (role == "MS_WORKER" and os.environ.get("RANK_ID", "0") != "0")


@hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from distill.app import run

    try:
        run(cfg)
    except Exception as e:
        _job_errors.append(e)
        raise


def main() -> None:
    if is_secondary_process():
        sys.argv.extend(SECONDARY_PROCESS_OVERRIDES)
    register()
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing several lines and exit 1
    try:
        hydra_main()
    except Exception as e:
        if wants_traceback or e in _job_errors:
            raise
        print(f"error: config: {config_error_line(e)}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)


if __name__ == "__main__":
    main()
