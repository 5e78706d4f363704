"""The built wheel, installed into a fresh virtual environment, runs a job from outside the source tree.

Nothing is downloaded: the wheel is built without isolation and installed without dependencies;
the new environment sees the test environment's packages through a ``.pth`` file (a ``.pth`` file
inside a folder added that way is not executed, so the editable install of the source tree stays
invisible to it).
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import TINY

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_installs_and_runs_a_job_outside_the_source_tree(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy, so the build writes nothing into the source tree
    for name in ("distill", "teacher", "student", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True)
    (wheel,) = dist.glob("guidance_distill-*.whl")

    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    new_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    (new_site / "test_env_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import distill, distill.conf; print(distill.__file__); "
                            "print(distill.conf.__file__)"], cwd=elsewhere, env=env, check=True,
                           capture_output=True, text=True).stdout.split()
    assert all(Path(p).is_relative_to(new_site) for p in where), where  # the installed copy, not the source tree

    job = subprocess.run([str(env_dir / "bin" / "distill"), "task=teacher", *TINY, "teacher.check.ws=[2.0]"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stderr[-2000:]
    run = elsewhere / "outputs" / "digits"  # Hydra's default run folder, under the working directory
    report = json.loads((run / "teacher" / "report.json").read_text())
    assert report["steps"] == 4 and set(report["accuracy"]) == {"2.0"}
    assert (run / "teacher" / "checkpoint.safetensors").stat().st_size > 0
    assert (run / ".hydra" / "teacher" / "config.yaml").is_file()  # Hydra composed the packaged configs
