"""Target shards under corruption, deletion and interrupted writes: a bad shard is generated again in
place and the manifest is always a partition of the step range (issue 20, item 4)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import compose_cfg
from distill.core.checkpoint import load_checkpoint
from distill.core.errors import UserError
from distill.core.fileio import sha256
from distill.jobs.targets import run_targets
from student.targets import FIELDS, covered, shard_grid, shard_name, shard_reader

STEPS, PER_SHARD = 9, 2  # five shards: [0, 2), [2, 4), [4, 6), [6, 8), [8, 9)


def _cfg(run: Path, folder: Path, steps: int = STEPS):
    return compose_cfg(run, f"student.targets_dir={folder}", "student.targets=shards",
                       f"student.train.steps={steps}", f"student.targets_per_shard={PER_SHARD}")


def _flip_middle_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _check_partition(folder: Path, steps: int = STEPS) -> list[dict]:
    """The manifest lists the whole grid [0, steps) in order, each file with its checksum; nothing else is there."""
    shards = json.loads((folder / "manifest.json").read_text())["shards"]
    assert [(sh["start"], sh["stop"]) for sh in shards] == shard_grid(steps, PER_SHARD)
    assert covered(shards) == steps
    for sh in shards:
        assert sha256(folder / sh["file"]) == sh["sha256"], sh["file"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([sh["file"] for sh in shards] + ["manifest.json"])
    return shards


@pytest.fixture(scope="module")
def reference(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, dict]]:
    """The shards (tensors, metadata) of an undisturbed run, by file name."""
    folder = tmp_path_factory.mktemp("reference") / "targets"
    run_targets(_cfg(tiny_run, folder))
    return {p.name: load_checkpoint(p) for p in folder.glob("shard_*.safetensors")}


def _same_targets(folder: Path, reference: dict[str, tuple[dict, dict]]) -> None:
    """Every shard holds what an undisturbed run wrote (the file bytes may differ: header key order)."""
    for name, (tensors, meta) in reference.items():
        got, got_meta = load_checkpoint(folder / name)
        assert got_meta == meta and got.keys() == tensors.keys(), name
        for key, value in tensors.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{name}: {key}")


def test_a_corrupt_shard_is_generated_again_in_place(tiny_run: Path, tmp_path: Path, reference) -> None:
    """The issue's case: a byte flipped in the middle of the second shard, the same command run twice."""
    folder = tmp_path / "targets"
    cfg = _cfg(tiny_run, folder)
    run_targets(cfg)
    _flip_middle_byte(folder / shard_name(2, 4))
    with pytest.raises(UserError, match="fails its checksum"):
        shard_reader(cfg)(2)
    run_targets(cfg)
    run_targets(cfg)
    _check_partition(folder)  # before: (0,2),(4,6),(6,8),(8,9),(8,9) -- a gap and a duplicate
    _same_targets(folder, reference)
    read = shard_reader(cfg)
    tensors = {name: tensors for name, (tensors, _) in reference.items()}
    for step in range(STEPS):  # every step reads back the reference's row of every field
        sh = next(s for s in shard_grid(STEPS, PER_SHARD) if s[0] <= step < s[1])
        row = read(step)
        assert len(row) == len(FIELDS)
        for name, value in zip(FIELDS, row):
            np.testing.assert_array_equal(value, tensors[shard_name(*sh)][name][step - sh[0]], err_msg=name)


def test_shard_reader_refuses_a_manifest_with_a_gap_or_an_overlap(tiny_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "targets"
    cfg = _cfg(tiny_run, folder)
    run_targets(cfg)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1] + manifest["shards"][2:] + manifest["shards"][-1:]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="gap or overlap"):
        shard_reader(cfg)


def _fault(kind: str, folder: Path, rng: random.Random) -> None:
    shards = sorted(folder.glob("shard_*.safetensors"))
    victim = rng.choice(shards) if shards else None
    if kind == "corrupt" and victim:
        _flip_middle_byte(victim)
    elif kind == "delete" and victim:
        victim.unlink()
    elif kind == "truncate" and victim:  # a shard cut short by a crash of something else
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    elif kind == "temp file":  # kill -9 during a shard's atomic write
        (folder / f".{shard_name(4, 6)}.tmp-k1ll9x.safetensors").write_bytes(b"half a shard")
    elif kind == "partial manifest":  # a manifest cut short
        text = (folder / "manifest.json").read_text()
        (folder / "manifest.json").write_text(text[: len(text) // 2])
    elif kind == "manifest behind":  # kill -9 after a shard was written but before the manifest listed it
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except ValueError:
            return
        manifest["shards"] = manifest["shards"][: rng.randrange(len(manifest["shards"]) + 1)]
        (folder / "manifest.json").write_text(json.dumps(manifest))
    elif kind == "stray shard":  # a shard of another grid (e.g. an earlier targets_per_shard)
        (folder / shard_name(1, 3)).write_bytes(b"not on the grid")


FAULTS = ("corrupt", "delete", "truncate", "temp file", "partial manifest", "manifest behind", "stray shard")


@pytest.mark.parametrize("seed", [0, 1])
def test_the_manifest_stays_a_partition_under_random_faults(tiny_run: Path, tmp_path: Path, reference,
                                                            seed: int) -> None:
    """A property: whatever mix of faults hits the folder between runs, the next run ends with the whole
    grid listed, every shard equal to an undisturbed run's, and nothing else left in the folder."""
    rng = random.Random(seed)
    folder = tmp_path / "targets"
    cfg = _cfg(tiny_run, folder)
    run_targets(cfg)
    for _ in range(3):
        for kind in rng.sample(FAULTS, 3):
            _fault(kind, folder, rng)
        run_targets(cfg)
        _check_partition(folder)
        _same_targets(folder, reference)


def test_covered_accepts_only_a_partition_from_zero() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        stops = np.cumsum(rng.integers(1, 4, rng.integers(0, 6)))
        shards = [{"start": int(a), "stop": int(b)} for a, b in zip(np.r_[0, stops[:-1]], stops)]
        assert covered(shards) == (int(stops[-1]) if len(stops) else 0)
        if len(shards) > 1:
            broken = list(shards)
            i = int(rng.integers(0, len(shards)))
            kind = rng.integers(0, 3)
            if kind == 0:
                del broken[i if i < len(shards) - 1 else 0]  # a gap (or no start at 0)
            elif kind == 1:
                broken.insert(i, dict(broken[i]))  # a duplicate
            else:
                broken[i], broken[i - 1] = broken[i - 1], broken[i]  # out of order
            assert covered(broken) is None, broken
