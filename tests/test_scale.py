"""Splitting work over data-parallel workers, in one process: which items a rank takes, the exact
gather, the sampler's share by sample index, and a worker killed during ``task=targets``
(the two-worker runs under msrun are in test_distributed.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import compose_cfg
from distill.core import runtime
from distill.core.runtime import Runtime, gather_rows, my_items


def as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    monkeypatch.setattr(runtime, "_current", Runtime(rank=rank, world_size=world))


@pytest.mark.parametrize("count, world", [(7, 2), (3, 2), (1, 3), (0, 2), (8, 8), (5, 1)])
def test_every_item_goes_to_exactly_one_rank_whatever_the_world_size(monkeypatch, count: int, world: int) -> None:
    shares = []
    for rank in range(world):
        as_rank(monkeypatch, rank, world)
        shares.append(my_items(count))
    assert sorted(i for share in shares for i in share) == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # an uneven count: one item more at most


def test_gather_rows_puts_every_rank_s_rows_in_place_exactly(monkeypatch) -> None:
    full = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    mine, theirs = np.array([0, 2, 4]), np.array([1, 3])
    other = np.zeros_like(full)
    other[theirs] = full[theirs]  # what rank 1 adds to the all-reduce
    other, calls = other.reshape(-1), []

    def all_reduce(x: np.ndarray) -> np.ndarray:
        start = sum(calls)
        calls.append(x.size)
        return x + other[start:start + x.size]

    monkeypatch.setattr(runtime, "sum_over_ranks", all_reduce)
    monkeypatch.setattr(runtime, "GATHER_CHUNK", 7)  # several all-reduces of 7 floats each
    as_rank(monkeypatch, 0, 2)
    out = gather_rows(full[mine], mine, 5)
    assert out.tobytes() == full.tobytes()
    assert calls == [7, 7, 7, 7, 2]


def test_a_rank_samples_only_its_chunks_and_they_are_the_one_process_rows(monkeypatch) -> None:
    from distill.core.sampling import SamplerSettings, sample_in_batches

    settings = SamplerSettings(num_steps=3, engine="eager", kind="ddpm")  # stochastic: the step noise matters too
    noise = np.random.default_rng(1).standard_normal((7, 1, 4, 4)).astype(np.float32)
    labels, null = np.arange(7, dtype=np.int32) % 3, np.full(7, 3, np.int32)
    predict = lambda z, t, y, w, y_uncond: z * 0.5  # noqa: E731  (a stand-in network)
    one_process = sample_in_batches(predict, noise, labels, 2.0, settings, null, batch_size=3, seed=5)
    monkeypatch.setattr(runtime, "sum_over_ranks", lambda x: x)  # the other rank adds nothing here
    as_rank(monkeypatch, 1, 2)
    share = sample_in_batches(predict, noise, labels, 2.0, settings, null, batch_size=3, seed=5, across_ranks=True)
    # chunks [0, 3), [3, 6), [6, 7): rank 1 of 2 draws the second only
    np.testing.assert_array_equal(share[3:6], one_process[3:6])
    assert not share[:3].any() and not share[6:].any()


def test_a_worker_killed_during_targets_leaves_no_entry_for_an_unfinished_shard(
        tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Rank 0 of 2 makes shards 0 and 2 of three; rank 1 dies before its shard 1 is done (rank 0 then
    never gets past the collective that gathers the checksums). The manifest lists shard 0 alone (the
    whole shards from the first step on); a rerun in one process makes shard 1 only, and every shard
    holds what one undisturbed process writes."""
    import distill.jobs.targets as targets
    from distill.core.checkpoint import load_checkpoint

    def cfg(folder: Path):
        return compose_cfg(tiny_run, f"student.targets_dir={folder}", "student.train.steps=7",
                           "student.targets_per_shard=3")

    reference = tmp_path / "reference"
    targets.run_targets(cfg(reference))
    folder = tmp_path / "targets"

    def peer_died(*args):
        raise RuntimeError("the collective failed: worker 1 exited")

    monkeypatch.setattr(runtime, "sum_over_ranks", lambda x: x)  # rank 0's broadcasts: the others add zeros
    monkeypatch.setattr(targets, "gathered_sums", peer_died)
    as_rank(monkeypatch, 0, 2)
    with pytest.raises(RuntimeError, match="worker 1 exited"):
        targets.run_targets(cfg(folder))
    listed = json.loads((folder / "manifest.json").read_text())["shards"]
    assert [(sh["start"], sh["stop"]) for sh in listed] == [(0, 3)]
    assert sorted(p.name for p in folder.glob("shard_*")) == ["shard_0000000_0000003.safetensors",
                                                              "shard_0000006_0000007.safetensors"]

    as_rank(monkeypatch, 0, 1)
    with caplog.at_level("INFO"):
        targets.run_targets(cfg(folder))
    assert "(1 shard(s) written)" in caplog.text
    listed = json.loads((folder / "manifest.json").read_text())["shards"]
    assert [(sh["start"], sh["stop"]) for sh in listed] == [(0, 3), (3, 6), (6, 7)]
    for sh in listed:
        got, got_meta = load_checkpoint(folder / sh["file"])
        want, want_meta = load_checkpoint(reference / sh["file"])
        assert got_meta == want_meta
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{sh['file']}: {key}")
