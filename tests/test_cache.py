"""The cache: damaged entries are set aside and recomputed, never trusted and never fatal; the cache commands."""
import argparse
import hashlib
import io
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from oodbench.cache import Cache, CacheWarning, checksum_path, make_key
from oodbench.cache_cli import add_parser

SCORES = {"scores": np.linspace(-1.0, 1.0, 64), "tuned": np.array('{"t": 1}')}
STATE = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.zeros(3), "n": torch.tensor(7)}


class Counting:
    """A compute function that says how often it ran and returns fresh copies of ``value``."""

    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return {k: v.copy() if isinstance(v, np.ndarray) else v.clone() for k, v in self.value.items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def _stored(cache: Cache, kind: str, value, suffix: str):
    """A key whose entry the cache wrote, and the path of its data file."""
    key = make_key(kind, test="entry")
    compute = Counting(value)
    (cache.arrays if suffix == ".npz" else cache.state_dict)(key, compute)
    assert compute.calls == 1
    return key, cache.path_of(key, suffix)


def _npz_bytes(arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _flip_a_score_byte(path):
    """One bit of rot inside the scores' data: the zip stays readable up to its CRC check."""
    data = bytearray(path.read_bytes())
    data[data.index(SCORES["scores"].tobytes()) + 100] ^= 0x01
    path.write_bytes(bytes(data))


def _directory_in_place(path):
    path.unlink()
    path.mkdir()
    (path / "stray").write_text("x")


def _rewrite_record(path, **changes):
    record = json.loads(checksum_path(path).read_text())
    checksum_path(path).write_text(json.dumps({**record, **changes}))


def _garbage_vouched_for(path):
    """Bytes no loader reads, with a checksum file that matches them: the loader's error is caught too."""
    garbage = b"PK\x03\x04 not really a zip" * 4
    path.write_bytes(garbage)
    _rewrite_record(path, sha256=hashlib.sha256(garbage).hexdigest(), bytes=len(garbage))


# name: (damage, what the warning says)
NPZ_DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "bytes where"),
    "empty": (lambda p: p.write_bytes(b""), "0 bytes where"),
    "random bytes": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(p.stat().st_size)), "checksum mismatch"),
    "flipped byte": (_flip_a_score_byte, "checksum mismatch"),
    "half-length valid npz": (lambda p: p.write_bytes(_npz_bytes({k: v[: len(v) // 2] if v.ndim else v
                                                                  for k, v in SCORES.items()})), "bytes where"),
    "negated scores": (lambda p: p.write_bytes(_npz_bytes({**SCORES, "scores": -SCORES["scores"]})),
                       "checksum mismatch"),
    "directory in place": (_directory_in_place, "not a regular file"),
    "missing checksum file": (lambda p: checksum_path(p).unlink(), "no checksum"),
    "garbage checksum file": (lambda p: checksum_path(p).write_bytes(b"\xff\x00{not json"),
                              "unreadable checksum file"),
    "checksum file without a checksum": (lambda p: checksum_path(p).write_text('{"format": 1}'),
                                         "invalid checksum file"),
    "checksum of other bytes": (lambda p: _rewrite_record(p, sha256="0" * 64), "checksum mismatch"),
    "record of other shapes": (lambda p: _rewrite_record(p, members={"scores": {"shape": [32], "dtype": "<f8"}}),
                               "shapes or dtypes differ"),
    "unreadable bytes with a matching checksum": (_garbage_vouched_for, "BadZipFile"),
}


@pytest.mark.parametrize("damage, reason", NPZ_DAMAGE.values(), ids=NPZ_DAMAGE.keys())
def test_a_damaged_arrays_entry_is_set_aside_and_recomputed(tmp_path, damage, reason):
    cache = Cache(tmp_path)
    key, path = _stored(cache, "scores", SCORES, ".npz")
    damage(path)
    compute = Counting(SCORES)
    with pytest.warns(CacheWarning, match=f"damaged cache entry .*{key}.npz \\(.*{reason}") as caught:
        assert _same(Cache(tmp_path).arrays(key, compute), SCORES)
    assert compute.calls == 1 and len(caught) == 1 and "\n" not in str(caught[0].message)
    assert list((tmp_path / "quarantine").glob(f"*/{key}.npz")), "the damaged file is kept aside"

    again = Cache(tmp_path)
    assert _same(again.arrays(key, compute), SCORES) and compute.calls == 1
    assert (again.hits, again.misses, again.quarantined) == (1, 0, [])


def test_an_entry_without_a_checksum_from_an_earlier_version_is_recomputed(tmp_path):
    cache = Cache(tmp_path)
    key = make_key("outputs", legacy=True)
    legacy = tmp_path / "outputs" / f"{key}.npz"
    legacy.parent.mkdir()
    legacy.write_bytes(_npz_bytes({**SCORES, "scores": -SCORES["scores"]}))  # readable, but nothing vouches for it
    compute = Counting(SCORES)
    with pytest.warns(CacheWarning, match=rf"{key}.npz \(no checksum\)"):
        assert _same(cache.arrays(key, compute), SCORES)
    assert compute.calls == 1 and cache.misses == 1
    assert [q["reason"] for q in cache.quarantined] == ["no checksum"]
    assert (Path(cache.quarantined[0]["moved_to"]) / "reason.txt").read_text() == "no checksum\n"
    again = Cache(tmp_path)
    assert _same(again.arrays(key, compute), SCORES) and (again.hits, compute.calls) == (1, 1)


PT_DAMAGE = {
    "garbage": (lambda p: p.write_bytes(b"\x80\x04garbage, not a pickle or a zip" * 10), "bytes where"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:100]), "bytes where"),
    "garbage of the same length": (lambda p: p.write_bytes(b"\x80" * p.stat().st_size), "checksum mismatch"),
    "other tensors behind the cache's back": (lambda p: torch.save({**STATE, "w": torch.ones(3, 4)}, p),
                                              "bytes where"),
    "directory in place": (_directory_in_place, "not a regular file"),
    "missing checksum file": (lambda p: checksum_path(p).unlink(), "no checksum"),
    "unreadable bytes with a matching checksum": (_garbage_vouched_for, "Error"),
}


@pytest.mark.parametrize("damage, reason", PT_DAMAGE.values(), ids=PT_DAMAGE.keys())
def test_a_damaged_state_dict_is_set_aside_and_recomputed(tmp_path, damage, reason):
    key, path = _stored(Cache(tmp_path), "model", STATE, ".pt")
    damage(path)
    compute = Counting(STATE)
    with pytest.warns(CacheWarning, match=f"damaged cache entry .*{key}.pt \\(.*{reason}"):
        assert _same(Cache(tmp_path).state_dict(key, compute), STATE)
    assert compute.calls == 1 and list((tmp_path / "quarantine").glob(f"*/{key}.pt"))
    again = Cache(tmp_path)
    assert _same(again.state_dict(key, compute), STATE) and again.hits == 1 and compute.calls == 1


def test_a_sound_entry_is_a_plain_file_that_numpy_and_torch_read(tmp_path):
    cache = Cache(tmp_path)
    _, npz = _stored(cache, "scores", SCORES, ".npz")
    _, pt = _stored(cache, "model", STATE, ".pt")
    with np.load(npz, allow_pickle=False) as data:
        assert _same(dict(data), SCORES)
    assert _same(torch.load(pt, weights_only=True), STATE)
    record = json.loads(checksum_path(npz).read_text())
    assert record["members"]["scores"] == {"shape": [64], "dtype": "<f8"} and record["bytes"] == npz.stat().st_size
    assert not list(tmp_path.rglob(".*.tmp")) and not (tmp_path / "quarantine").exists()


def test_an_entry_that_cannot_be_moved_aside_or_stored_costs_its_reuse_not_the_result(tmp_path):
    cache = Cache(tmp_path)
    key, path = _stored(cache, "scores", SCORES, ".npz")
    _directory_in_place(path)  # the recomputed file cannot replace a folder ...
    (tmp_path / "quarantine").write_text("a file where the folder goes")  # ... that cannot be moved aside
    with pytest.warns(CacheWarning) as caught:
        assert _same(cache.arrays(key, Counting(SCORES)), SCORES)
    assert [str(w.message).split(" (")[0] for w in caught] == [f"damaged cache entry {path}",
                                                                f"cannot store cache entry {path}"]
    assert cache.quarantined[0]["moved_to"] == "" and "could not be moved aside" in str(caught[0].message)


def test_caching_off_stores_nothing(tmp_path):
    cache, compute = Cache(None), Counting(SCORES)
    assert _same(cache.arrays("scores-x", compute), SCORES) and _same(cache.arrays("scores-x", compute), SCORES)
    assert compute.calls == 2 and cache.path_of("scores-x", ".npz") is None


# The cache commands, through the parser they register.

def _cli(*argv):
    parser = argparse.ArgumentParser(prog="oodbench")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cache", *argv])
    return args.func(args)


def _damaged_cache(tmp_path):
    cache = Cache(tmp_path)
    _, sound = _stored(cache, "scores", SCORES, ".npz")
    _, bad = _stored(cache, "model", STATE, ".pt")
    bad.write_bytes(b"garbage")
    return sound, bad


def test_verify_names_damaged_entries_and_fix_sets_them_aside(tmp_path, capsys):
    sound, bad = _damaged_cache(tmp_path)
    assert _cli("verify", "--cache-dir", str(tmp_path)) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{bad}: 7 bytes where {_recorded(bad)} were written"]
    assert "2 entries, 1 damaged" in err
    assert _cli("verify", "--cache-dir", str(tmp_path), "--fix") == 0
    assert not bad.exists() and list((tmp_path / "quarantine").glob(f"*/{bad.name}")) and sound.exists()
    assert _cli("verify", "--cache-dir", str(tmp_path)) == 0
    assert "1 entries, 0 damaged" in capsys.readouterr().err


def _recorded(path):
    return json.loads(checksum_path(path).read_text())["bytes"]


def test_verify_reports_a_checksum_file_without_its_data(tmp_path, capsys):
    _, path = _stored(Cache(tmp_path), "scores", SCORES, ".npz")
    path.unlink()
    assert _cli("verify", "--cache-dir", str(tmp_path)) == 1
    assert capsys.readouterr().out.strip() == f"{path}: checksum file without its data"


def test_info_counts_entries_per_kind_and_quarantine(tmp_path, capsys):
    _damaged_cache(tmp_path)
    _cli("verify", "--cache-dir", str(tmp_path), "--fix")
    capsys.readouterr()
    assert _cli("info", "--cache-dir", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "1 quarantined entries" in out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.split()[:1] in (["scores"], ["total"])}
    assert rows == {"scores": "1", "total": "1"}


def test_prune_removes_quarantine_scratch_stale_temporaries_and_old_entries(tmp_path, capsys):
    cache = Cache(tmp_path)
    _, old = _stored(cache, "scores", SCORES, ".npz")
    _, recent = _stored(cache, "attack", {"x": np.ones((2, 3), np.float32)}, ".npz")
    cache.quarantine(recent.with_name("gone.npz"), "test")
    (tmp_path / "scratch" / "model-x").mkdir(parents=True)
    (tmp_path / "scratch" / "model-x" / "epoch3.pt").write_bytes(b"state")
    stale, fresh = tmp_path / "scores" / ".a.npz.1.tmp", tmp_path / "scores" / ".b.npz.2.tmp"
    stale.write_bytes(b"dead write")
    fresh.write_bytes(b"write under way")
    long_ago = time.time() - 40 * 86400
    for path in (stale, old, checksum_path(old)):
        os.utime(path, (long_ago, long_ago))

    assert _cli("prune", "--cache-dir", str(tmp_path)) == 0
    assert not (tmp_path / "quarantine").exists() and not (tmp_path / "scratch").exists()
    assert not stale.exists() and fresh.exists() and old.exists()
    assert _cli("prune", "--cache-dir", str(tmp_path), "--older-than", "30") == 0
    assert not old.exists() and not checksum_path(old).exists() and recent.exists()
    assert "removed 2 files" in capsys.readouterr().out.splitlines()[-1]


def test_reading_an_entry_keeps_it_from_pruning(tmp_path):
    cache = Cache(tmp_path)
    key, path = _stored(cache, "scores", SCORES, ".npz")
    long_ago = time.time() - 40 * 86400
    for part in (path, checksum_path(path)):
        os.utime(part, (long_ago, long_ago))
    cache.arrays(key, Counting(SCORES))  # a run reads it: it is in use
    cache.prune(older_than_days=30)
    assert path.exists()


@pytest.mark.parametrize("command", [["verify"], ["prune"], ["info"]])
def test_a_cache_folder_that_is_missing_or_a_file_is_one_clear_error(tmp_path, command):
    with pytest.raises(ValueError, match="does not exist"):
        _cli(*command, "--cache-dir", str(tmp_path / "typo"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a folder"):
        _cli(*command, "--cache-dir", str(tmp_path / "file"))


def test_prune_refuses_a_negative_age(tmp_path):
    with pytest.raises(ValueError, match="--older-than"):
        _cli("prune", "--cache-dir", str(tmp_path), "--older-than", "-1")


def test_a_zip_with_a_bad_crc_is_caught_before_numpy_reads_it(tmp_path):
    """The 'Bad CRC-32' of the issue: the checksum sees it first, so zipfile never raises to a caller."""
    cache = Cache(tmp_path)
    key, path = _stored(cache, "scores", SCORES, ".npz")
    _flip_a_score_byte(path)
    with pytest.raises(zipfile.BadZipFile, match="CRC"):
        with np.load(path) as data:
            data["scores"]
    with pytest.warns(CacheWarning, match="checksum mismatch"):
        cache.arrays(key, Counting(SCORES))
