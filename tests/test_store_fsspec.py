"""The store on an fsspec filesystem (``memory://``): the same verification, quarantine, commands and run results
as in a local folder.

The memory filesystem lives in this process only, so every command here runs in-process (``run_cli``).
"""
import itertools
import json
import uuid
import warnings
from datetime import timedelta

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from fake_plugins import fake_options
from test_bad_input import assert_refused, run_cli
from test_cache import SCORES, STATE, Counting, _same

from oodbench.cache import Cache, CacheWarning, checksum_path, make_key
from oodbench.leaderboard import csv_text, results_frame
from oodbench.runner import run_benchmark

FS = MemoryFileSystem()  # fsspec hands out one instance per set of options: the one every memory:// Cache uses


@pytest.fixture
def url():
    """A fresh memory:// store, emptied afterwards (the memory filesystem is shared by the whole process)."""
    root = f"memory://oodbench-{uuid.uuid4().hex[:8]}"
    yield root
    if FS.exists(root):
        FS.rm(root, recursive=True)


def _stored(cache: Cache, kind: str, value, suffix: str) -> tuple[str, str]:
    key = make_key(kind, test="entry")
    (cache.arrays if suffix == ".npz" else cache.state_dict)(key, Counting(value))
    return key, cache.path_of(key, suffix)


def test_arrays_and_a_state_dict_are_stored_and_a_second_cache_reads_them(url):
    cache = Cache(url)
    scores_key, scores_path = _stored(cache, "scores", SCORES, ".npz")
    model_key, model_path = _stored(cache, "model", STATE, ".pt")
    assert (cache.hits, cache.misses) == (0, 2)
    assert scores_path == f"{url}/scores/{scores_key}.npz" and model_path == f"{url}/model/{model_key}.pt"
    assert FS.exists(checksum_path(scores_path)) and FS.exists(checksum_path(model_path))
    assert cache.scratch_dir(model_key).parts[-2:] == ("scratch", model_key), "training state stays local"

    again, compute = Cache(url), Counting(SCORES)
    assert _same(again.arrays(scores_key, compute), SCORES)
    assert _same(again.state_dict(model_key, Counting(STATE)), STATE)
    assert (again.hits, again.misses, compute.calls, again.quarantined) == (2, 0, 0, [])


def _flip_a_byte(path):
    data = bytearray(FS.cat_file(path))
    data[len(data) // 2] ^= 0x01
    FS.pipe_file(path, bytes(data))


DAMAGE = {
    "flipped byte": (_flip_a_byte, "checksum mismatch"),
    "truncated": (lambda p: FS.pipe_file(p, FS.cat_file(p)[:100]), "100 bytes where"),
    "checksum file deleted": (lambda p: FS.rm(checksum_path(p)), "no checksum"),
}


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
@pytest.mark.parametrize("damage, reason", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_entry_is_quarantined_and_recomputed(url, suffix, damage, reason):
    value = SCORES if suffix == ".npz" else STATE
    key, path = _stored(Cache(url), "scores", value, suffix)
    damage(path)
    cache, compute = Cache(url), Counting(value)
    with pytest.warns(CacheWarning, match=f"damaged cache entry {path} \\({reason}.*moved to {url}/quarantine/"):
        assert _same((cache.arrays if suffix == ".npz" else cache.state_dict)(key, compute), value)
    assert compute.calls == 1 and len(cache.quarantined) == 1 and cache.quarantined[0]["reason"].startswith(reason)
    moved_to = cache.quarantined[0]["moved_to"]
    assert FS.cat_file(f"{moved_to}/reason.txt").decode() == cache.quarantined[0]["reason"] + "\n"
    assert FS.exists(f"{moved_to}/{key}{suffix}"), "the damaged data is kept aside"

    again = Cache(url)
    assert _same((again.arrays if suffix == ".npz" else again.state_dict)(key, compute), value)
    assert (again.hits, again.misses, compute.calls) == (1, 0, 1)


def test_two_writers_of_one_key_interleaved_never_give_a_wrong_value(url, monkeypatch):
    """Every order of two writers' puts (each: data, then checksum file): a reader gets exactly one writer's
    value when the last data and checksum file are that writer's, else a warning and a recomputed value."""
    key = make_key("scores", test="race")
    values = {"a": {"scores": np.arange(16.0)}, "b": {"scores": -np.arange(16.0)}}  # same length: only sha256 tells
    puts = {}
    for name, value in values.items():
        captured = puts[name] = []
        monkeypatch.setattr(FS, "pipe_file", lambda path, data, captured=captured, **_: captured.append((path, data)))
        Cache(url).arrays(key, lambda value=value: value)
    monkeypatch.undo()
    assert [len(p) for p in puts.values()] == [2, 2] and puts["a"][0][1] != puts["b"][0][1]

    fresh = {"scores": np.full(16, 7.0)}
    for order in set(itertools.permutations("aabb")):
        if FS.exists(url):
            FS.rm(url, recursive=True)
        turn = {"a": iter(puts["a"]), "b": iter(puts["b"])}
        written = [(writer, *next(turn[writer])) for writer in order]  # each writer's puts stay in their order
        for _, path, data in written:
            FS.pipe_file(path, data)
        last_data = next(w for w, path, _ in reversed(written) if path.endswith(".npz"))
        last_record = next(w for w, path, _ in reversed(written) if path.endswith(".json"))
        reader = Cache(url)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = reader.arrays(key, Counting(fresh))
        expected = values[last_data] if last_data == last_record else fresh
        assert _same(got, expected), order
        assert (len(caught) == 1 and "checksum mismatch" in str(caught[0].message)) == (last_data != last_record)


def _damaged_store(url) -> tuple[str, str]:
    cache = Cache(url)
    _, sound = _stored(cache, "scores", SCORES, ".npz")
    _, bad = _stored(cache, "model", STATE, ".pt")
    FS.pipe_file(bad, b"garbage")
    return sound, bad


def test_the_cache_commands_work_on_a_url(url):
    sound, bad = _damaged_store(url)
    done = run_cli("cache", "info", "--cache-dir", url)
    assert done.returncode == 0 and f"cache folder {url}" in done.stdout
    rows = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines()
            if line.split()[:1] in (["scores"], ["model"], ["total"])}
    assert rows == {"model": "1", "scores": "1", "total": "2"}

    done = run_cli("cache", "verify", "--cache-dir", url)
    recorded = json.loads(FS.cat_file(checksum_path(bad)))["bytes"]
    assert done.returncode == 1 and done.stdout.splitlines() == [f"{bad}: 7 bytes where {recorded} were written"]
    assert "2 entries, 1 damaged" in done.stderr
    assert run_cli("cache", "verify", "--cache-dir", url, "--fix").returncode == 0
    assert not FS.exists(bad) and FS.exists(sound) and run_cli("cache", "verify", "--cache-dir", url).returncode == 0
    assert "1 quarantined entries" in run_cli("cache", "info", "--cache-dir", url).stdout

    done = run_cli("cache", "prune", "--cache-dir", url)
    assert done.returncode == 0 and not FS.exists(f"{url}/quarantine") and FS.exists(sound)
    assert "removed 3 files" in done.stdout  # the quarantined data, its checksum file and reason.txt
    done = run_cli("cache", "prune", "--cache-dir", url, "--older-than", "30")
    assert done.returncode == 0 and FS.exists(sound), "an entry written just now is not old"
    done = run_cli("cache", "prune", "--cache-dir", url, "--older-than", "0")
    assert done.returncode == 0 and not FS.exists(sound) and "removed 2 files" in done.stdout


def test_reading_an_entry_on_a_url_keeps_it_from_pruning(url):
    cache = Cache(url)
    read_key, read = _stored(cache, "scores", SCORES, ".npz")
    _, unread = _stored(cache, "attack", {"x": np.ones((2, 3), np.float32)}, ".npz")
    for part in (read, checksum_path(read), unread, checksum_path(unread)):
        FS.store[FS._strip_protocol(part)].modified -= timedelta(days=40)
    cache.arrays(read_key, Counting(SCORES))  # a run reads it: it is in use
    assert cache.prune(older_than_days=30)[0] == 2
    assert FS.exists(read) and not FS.exists(unread) and not FS.exists(checksum_path(unread))


def test_prune_by_age_on_a_filesystem_without_modification_times_is_refused_before_deleting(url, monkeypatch):
    _damaged_store(url)
    run_cli("cache", "verify", "--cache-dir", url, "--fix")

    def no_times(self, path):
        raise NotImplementedError

    monkeypatch.setattr(MemoryFileSystem, "modified", no_times)
    assert_refused(run_cli("cache", "prune", "--cache-dir", url, "--older-than", "30"), url, "no modification times")
    assert FS.exists(f"{url}/quarantine"), "nothing deleted before the refusal"


@pytest.mark.parametrize("root, words", [("memory://no-such-store", ["memory://no-such-store", "does not exist"]),
                                         ("nosuch://x", ["nosuch://x", "Protocol not known: nosuch"])])
def test_the_cache_commands_refuse_a_missing_store_or_an_unknown_scheme(root, words):
    for command in ("verify", "prune", "info"):
        assert_refused(run_cli("cache", command, "--cache-dir", root), *words)


def test_a_run_with_an_unknown_scheme_is_refused_before_any_work(tmp_path):
    done = run_cli("run", "-d", "msp", "--cache-dir", "nosuch://x", "-o", tmp_path / "out", cwd=tmp_path)
    assert_refused(done, "--cache-dir nosuch://x", "Protocol not known: nosuch")
    assert list(tmp_path.iterdir()) == []


def test_a_run_on_a_url_store_equals_one_on_a_local_folder_and_a_second_computes_nothing(
        fakes, shared_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("OODBENCH_CACHE_DIR", str(tmp_path))  # where a URL store's training state goes
    url = f"memory://run-test-{uuid.uuid4().hex[:8]}"
    try:
        local = run_benchmark(fake_options(fakes, "fake-confidence,fake-centroid", shared_cache, executor="inline"), fakes)
        first = run_benchmark(fake_options(fakes, "fake-confidence,fake-centroid", url, executor="inline"), fakes)
        assert first.meta["cache"]["dir"] == url and first.meta["cache"]["misses"] > 0
        assert csv_text(results_frame(first.rows)) == csv_text(results_frame(local.rows))
        second = run_benchmark(fake_options(fakes, "fake-confidence,fake-centroid", url, executor="inline"), fakes)
        assert second.meta["cache"]["misses"] == 0 and second.meta["cache"]["hits"] > 0
        assert csv_text(results_frame(second.rows)) == csv_text(results_frame(local.rows))
        assert fsspec.core.url_to_fs(url)[0].exists(f"{url}/model"), "the weights are in the store"
    finally:
        if FS.exists(url):
            FS.rm(url, recursive=True)
