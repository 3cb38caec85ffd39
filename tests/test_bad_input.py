"""Bad input fails at once: one line naming the problem, exit 2, no traceback, nothing computed or created.

Every command here must be refused before any training or extraction; the cache and output folders
it is given must not exist afterwards. The commands run in this process through ``oodbench.cli.main``
(an exception escaping it fails the test, as a traceback would): a subprocess per case would spend
~3 s importing torch, minutes over the ~60 cases. The broken pipe needs a real process.
"""
import contextlib
import io
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_cli import OODBENCH

from oodbench.benchmark import Benchmark, BenchmarkError, load_benchmark
from oodbench.cli import main

PUBLISHED = Path(__file__).resolve().parents[1] / "leaderboards" / "digits" / "results.csv"

BENCH = """name = "bad"
[in_distribution]
dataset = "digits"
[model]
plugin = "small-cnn"
[sources]
ood = ["gaussian"]
[[sources.attacks]]
plugin = "fgsm"
eps = [0.1]
"""


def run_cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """``oodbench ARGS`` in this process, with ``env`` added and ``cwd`` as the working folder, restored after."""
    saved_env, saved_cwd = {k: os.environ.get(k) for k in env or {}}, os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exit:  # argparse's usage errors
                code = exit.code
    finally:
        os.chdir(saved_cwd)
        for key, value in saved_env.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_refused(done, *words):
    """Exit 2 and exactly one error line, holding every word; warnings about plugins may come before it."""
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("oodbench: warning:")]
    assert len(lines) == 1 and lines[0].startswith("oodbench: error: "), done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture
def refuse(tmp_path):
    """Run a command that must be refused, with a cache and output folder that must stay absent."""
    cache, out = tmp_path / "cache", tmp_path / "out"

    def check(*args, words, env=None, out_option=True):
        # A case that gives its own -o or --cache-dir is about that option: the fixture's would win, coming last.
        extra = [] if "--cache-dir" in args else ["--cache-dir", str(cache)]
        extra += ["-o", str(out)] if out_option and "-o" not in args else []
        assert_refused(run_cli(*args, *extra, env=env, cwd=tmp_path), *words)
        assert not cache.exists() and not out.exists(), "something was created before the refusal"
        assert not (tmp_path / "oodbench-results").exists()
    return check


@pytest.mark.parametrize("old, new, words", [
    ("ood = [", "oods = [", ["sources.oods", "unknown key oods in sources", "allowed: attack_subset, attacks"]),
    ('plugin = "small-cnn"', 'plugin = "small-cnn"\nplugn = "mlp"', ["model.plugn", "allowed: options, plugin"]),
    ("eps = [0.1]", "eps = [0.1]\nepss = [0.2]", ["sources.attacks[0].epss", "allowed: eps, options, plugin"]),
    ('["gaussian"]', '[{ dataset = "uniform", nmae = "u" }]', ["sources.ood[0].nmae", "allowed: dataset, name"]),
    ('["gaussian"]', '"gaussian"', ["sources.ood", "must be a list", "'gaussian'"]),
    ("eps = [0.1]", "eps = [0.1]\n[run]\nseed = 3", ["run.seed", "unknown key seed in run", "allowed: batch_size"]),
    ("eps = [0.1]", 'eps = ["a"]', ["sources.attacks[0].eps", "numbers"]),
    ('["gaussian"]', '["nosuch"]', ["sources.ood 'nosuch'", "unknown dataset 'nosuch'", "gaussian"]),
    ('plugin = "fgsm"', 'plugin = "nosuch"', ["sources.attacks[0]", "unknown attack 'nosuch'", "fgsm"]),
    ('plugin = "small-cnn"', 'plugin = "nosuch"', ["model 'nosuch'", "unknown model 'nosuch'", "small-cnn"]),
    ('plugin = "small-cnn"', 'plugin = "small-cnn"\noptions = { width = "wide" }',
     ["model 'small-cnn'", "option width='wide'", "expected an integer"]),
    ('dataset = "digits"', 'dataset = "digits"\noptions = { classes = 5 }',
     ["in_distribution dataset 'digits'", "option classes=5", "expected a list of integers"]),
    ('plugin = "fgsm"\neps = [0.1]', 'plugin = "bim"\neps = [0.1]\noptions = { steps = "ten" }',
     ["sources.attacks[0] (attack 'bim')", "option steps='ten'", "expected an integer"]),
    ('["gaussian"]', '[{ dataset = "gaussian", options = { sise = 3 } }]', ["sources.ood 'gaussian'", "no option sise"]),
    ('["gaussian"]', '[{ dataset = "hflip", options = { axis = "diagonal" } }]', ["sources.ood 'hflip'", "axis"]),
    ('name = "bad"', 'name = "../bad"', ["name", "plain name"]),
])
def test_bad_benchmark_file(tmp_path, refuse, old, new, words):
    assert old in BENCH
    (tmp_path / "b.toml").write_text(BENCH.replace(old, new, 1))
    refuse("run", "-b", str(tmp_path / "b.toml"), "-d", "msp", words=words)


@pytest.mark.parametrize("args, words", [
    (["--seeds", "0"], ["--seeds 0", ">= 1"]),
    (["--seeds", "-1"], ["--seeds -1", ">= 1"]),
    (["--batch-size", "0"], ["--batch-size 0", ">= 1"]),
    (["--batch-size", "-5"], ["--batch-size -5", ">= 1"]),
    (["--first-seed", "-1"], ["--first-seed -1", ">= 0"]),
    (["--first-seed", "2147483647", "--seeds", "2"], ["--first-seed 2147483647", "2**31"]),
    (["-d", "gmm[k=10"], ["gmm[k=10", "unbalanced brackets"]),
    (["-d", "msp,gmm]"], ["gmm]", "unbalanced brackets"]),
    (["-d", "gmm,gmm"], ["gmm given more than once"]),
    (["-d", "gmm[tol=0.1,k=2],gmm[k=2,tol=0.1]"], ["given more than once"]),
    (["-d", ""], ["no detectors to run"]),
    (["-d", "gmm[k=ten]"], ["detector 'gmm'", "option k='ten'", "expected an integer"]),
    (["--device", "nosuch"], ["--device 'nosuch'", "not a device name"]),
    (["--device", "cuda:99"], ["--device cuda:99"]),
    (["--metric", "nope"], ["--metric nope", "auroc"]),
    (["-b", "nosuch"], ["unknown benchmark 'nosuch'"]),
])
def test_bad_run_option(refuse, args, words):
    refuse("run", "-d", "msp", *args, words=words)


@pytest.mark.parametrize("args, words", [
    (["--seeds", "0"], ["--seeds 0"]),
    (["--first-seed", "-1"], ["--first-seed -1"]),
    (["--batch-size", "0"], ["--batch-size 0"]),
    (["--device", "nosuch"], ["--device 'nosuch'"]),
    (["--export", "w{x}-{seed}.pt"], ["--export w{x}-{seed}.pt", "only '{seed}'"]),
    (["--export", "afile/w.pt"], ["--export afile/w.pt", "afile is a file"]),
    (["--export", "somewhere"], ["--export somewhere", "a folder, expected a file name"]),
])
def test_bad_train_option(tmp_path, refuse, args, words):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "somewhere").mkdir()
    refuse("train", "-b", "digits-train", *args, words=words, out_option=False)


def test_bad_verify_option(tmp_path, refuse):
    refuse("leaderboard", "verify", str(tmp_path), "--device", "nosuch", words=["--device 'nosuch'"],
           out_option=False)


@pytest.mark.parametrize("option, target, words", [
    ("-o", "afile", ["--out", "a file, expected a folder"]),
    ("-o", "afile/sub", ["--out", "afile is a file"]),
    ("-o", "x" * 300, ["--out", "300 bytes long", "at most"]),
    ("-o", "new/" + "y" * 300 + "/z", ["--out", "300 bytes long"]),
    ("--cache-dir", "afile", ["--cache-dir", "a file, expected a folder"]),
    ("-b", "afolder/", ["afolder", "a folder, not a benchmark file"]),
])
def test_bad_run_path(tmp_path, refuse, option, target, words):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "afolder").mkdir()
    # Joined by hand: pathlib would drop the trailing '/' of "afolder/".
    refuse("run", "-d", "msp", option, f"{tmp_path}/{target}",
           words=[w.replace("afile", str(tmp_path / "afile")) for w in words])


def test_cache_folder_from_the_environment_is_checked(tmp_path):
    (tmp_path / "afile").write_text("x")
    done = run_cli("run", "-d", "msp", "-o", str(tmp_path / "out"), env={"OODBENCH_CACHE_DIR": str(tmp_path / "afile")})
    assert_refused(done, "OODBENCH_CACHE_DIR", "a file, expected a folder")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not Path("/proc/self/mountinfo").exists(), reason="Linux only")
@pytest.mark.parametrize("command", [["run", "-d", "msp", "-o", "/proc/oodbench-out"],
                                     ["train", "-b", "digits-train", "--export", "/proc/x"]])
def test_kernel_filesystem_is_refused_even_for_root(tmp_path, command):
    done = run_cli(*command, "--cache-dir", str(tmp_path / "cache"))
    assert_refused(done, "/proc", "takes no new files")
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    done = run_cli("run", "-d", "msp", "-o", str(locked / "out"), "--cache-dir", str(tmp_path / "cache"))
    assert_refused(done, "--out", "not writable")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("args, words", [
    (["validate", "{dir}"], ["{dir}", "a folder, expected a results CSV file"]),
    (["validate", "{dir}/nosuch.csv"], ["nosuch.csv", "no such file"]),
    (["merge", str(PUBLISHED), "-o", "{dir}"], ["--out {dir}", "a folder, expected a file name"]),
    (["merge", "{dir}", "-o", "{dir}/merged.csv"], ["{dir}", "a folder, expected a results CSV file"]),
    (["show", "{dir}"], ["{dir}", "a folder"]),
])
def test_bad_leaderboard_path(tmp_path, args, words):
    done = run_cli("leaderboard", *(a.format(dir=tmp_path) for a in args))
    assert_refused(done, *(w.format(dir=tmp_path) for w in words))
    assert not (tmp_path / "merged.csv").exists()


def test_a_reader_that_stops_reading_is_not_an_error():
    """`oodbench leaderboard show F | head -1`: exit 141 as for SIGPIPE, and nothing on stderr."""
    child = subprocess.Popen([*OODBENCH.split(), "leaderboard", "show", str(PUBLISHED)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    child.stdout.close()  # before the child writes a byte
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141 and stderr == ""


# -- benchmark files made of random keys and values -------------------------------------------------------

def toml_value(value) -> str:
    """A TOML literal for the values the strategies below make (no TOML writer is installed)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}" for k, v in value.items()) + "}"


PLUGIN_NAMES = ["digits", "gaussian", "uniform", "hflip", "npz", "small-cnn", "mlp", "fgsm", "bim", "nosuch"]
scalars = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=8),
                    st.sampled_from(PLUGIN_NAMES))
garbage = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                       max_leaves=8)


def mostly(valid):
    """Mostly a value of the right kind, now and then anything: with a dozen such keys, files still load often."""
    return st.integers(0, 19).flatmap(lambda i: garbage if i == 0 else valid)


def table(required, optional=None):
    return mostly(st.fixed_dictionaries({k: mostly(v) for k, v in required.items()},
                                        optional={k: mostly(v) for k, v in (optional or {}).items()}))


datasets = st.sampled_from(["digits", "gaussian", "uniform", "hflip", "npz", "nosuch"])
models = st.sampled_from(["small-cnn", "mlp", "nosuch"])
attacks = st.sampled_from(["fgsm", "bim", "nosuch"])
options = st.dictionaries(st.sampled_from(["width", "classes", "size", "steps", "axis", "k", "seed", "epochs"]),
                          st.one_of(st.integers(-3, 300), st.floats(-1, 2), st.text(max_size=4),
                                    st.lists(st.integers(-1, 12), max_size=3)), max_size=2)
eps = st.lists(st.floats(0.01, 1), min_size=1, max_size=3)
benchmark_tables = st.fixed_dictionaries(
    {"name": mostly(st.sampled_from(["x", "digits-copy", "../x", ""])),
     "in_distribution": table({"dataset": datasets}, {"options": options, "labels_per_class": st.integers(-1, 5)}),
     "model": table({"plugin": models}, {"options": options})},
    optional={"description": st.text(max_size=10), "default": st.booleans(),
              "sources": table({}, {"mistakes": st.booleans(), "attack_subset": st.integers(-1, 100),
                                    "ood": st.lists(st.one_of(datasets, table({"dataset": datasets},
                                                                           {"name": st.text(max_size=4),
                                                                            "options": options})), max_size=3),
                                    "attacks": st.lists(table({"plugin": attacks, "eps": eps}, {"options": options}),
                                                        max_size=2)}),
              "run": table({}, {"seeds": st.integers(-1, 3), "batch_size": st.integers(-1, 300),
                                "holdout_size": st.integers(-1, 10), "holdout_fraction": st.floats(-0.5, 1.5),
                                "test_subset": st.integers(-1, 10), "precision": st.sampled_from(["float32", "x"])})})


@st.composite
def benchmarks(draw):
    """A benchmark's tables, now and then with a key no table has (a typo) added to one of them."""
    bench = draw(benchmark_tables)
    if draw(st.integers(0, 7)) == 0:
        holders = [bench] + [v for v in bench.values() if isinstance(v, dict)]
        draw(st.sampled_from(holders))[draw(st.sampled_from(["stray", "oods", "plugn", "epss"]))] = draw(garbage)
    return bench


def loads_or_refuses(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    try:
        assert isinstance(load_benchmark(path), Benchmark)
    except BenchmarkError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(benchmark=benchmarks())
def test_random_benchmark_files_load_or_raise_benchmark_error(tmp_path, benchmark):
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in benchmark.items()]
    loads_or_refuses(tmp_path / "b.toml", "\n".join(lines) + "\n")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(), st.text(alphabet='[]{}="., \nabcdeps0123-_#\'\\')))
def test_random_text_loads_or_raises_benchmark_error(tmp_path, text):
    loads_or_refuses(tmp_path / "b.toml", text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(benchmark=benchmarks())
def test_loaded_random_benchmarks_pass_or_fail_the_plugin_check_cleanly(tmp_path, registry, benchmark):
    """What the CLI checks before a run raises only what main() turns into one line, never a traceback."""
    from oodbench.api import PluginError
    from oodbench.preflight import check_plugins
    from oodbench.plugins import UnknownPluginError

    path = tmp_path / "b.toml"
    path.write_text("\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in benchmark.items()) + "\n")
    try:
        bench = load_benchmark(path)
    except BenchmarkError:
        return
    try:
        check_plugins(registry, bench, 0)
    except (UnknownPluginError, ValueError, PluginError):
        pass
