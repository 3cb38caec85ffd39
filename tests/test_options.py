"""Plugin options are typed: the constructor's annotations are the schema, checked and converted before any work.

A value that does not fit is refused with one line (option, value, type expected); a constructor that refuses
valid-typed options marks its detector's rows ``bad options``, not ``fit failed``; constructor and fit
tracebacks reach run.json; ``oodbench list -v`` / ``--json`` show each option's type, default and description.
"""
import json
import pickle
from pathlib import Path
from typing import Annotated

import pandas as pd
import pytest
import torch
from pydantic import Field

import test_bad_input
from test_bad_input import run_cli

from oodbench import hookimpl
from oodbench.api import Detector
from oodbench.benchmark import load_benchmark
from oodbench.cli import parse_detectors
from oodbench.leaderboard import results_frame, write_run
from oodbench.plugins import (OptionError, build_registry, option_descriptions, option_infos, resolve_options)
from oodbench.runner import RunOptions, detector_fields, run_benchmark


# -- refused before any work ---------------------------------------------------------------------

refuse = test_bad_input.refuse  # the fixture: exit 2, one line, nothing created


@pytest.mark.parametrize("detectors, words", [
    ("gmm[k=abc]", ["detector 'gmm' option k='abc': expected an integer"]),
    ("gmm[k=2.5]", ["detector 'gmm' option k=2.5: expected an integer"]),
    ("gmm[k=-1]", ["detector 'gmm' option k=-1: expected an integer >= 1"]),
    ("gmm[k=True]", ["option k=True: expected an integer"]),
    ("odin[temperature=0]", ["detector 'odin' option temperature=0: expected a number > 0"]),
    ("odin[epsilons=0.1]", ["option epsilons=0.1: expected a list of numbers"]),
    ("vae[dtype=64]", ["detector 'vae' option dtype=64: expected a string"]),
    ("pixelcnn[lr=fast]", ["detector 'pixelcnn' option lr='fast': expected a number or none"]),
    ("waic[M=1]", ["detector 'waic' option M=1: expected an integer >= 2"]),
])
def test_a_value_that_does_not_fit_its_annotation_is_refused_in_one_line(refuse, detectors, words):
    refuse("run", "-d", f"msp,{detectors}", words=words)


def test_values_are_converted_to_what_the_constructor_declares(registry):
    gmm = registry.get("detectors", "gmm")
    k = resolve_options(gmm, parse_detectors("gmm[k=3]")[0].options)["k"]
    assert k == 3 and type(k) is int
    resolved = resolve_options(gmm, {"reg_covar": 1})  # an int is a fine float: it runs, and is recorded, as 1.0
    assert type(resolved["reg_covar"]) is float
    odin = resolve_options(registry.get("detectors", "odin"), {"epsilons": [0, 0.001]})
    assert odin["epsilons"] == (0.0, 0.001), "a list (TOML has no tuples) becomes the declared tuple of floats"
    fields = detector_fields(registry, parse_detectors("odin[temperature=2]")[0], seed=0)
    assert json.loads(fields["detector_options"])["temperature"] == 2.0 and '"temperature": 2.0' in \
        fields["detector_options"]


def test_registered_defaults_and_the_benchmark_file_are_checked_too(tmp_path, refuse):
    (tmp_path / "b.toml").write_text('name = "b"\n[in_distribution]\ndataset = "digits"\n[model]\n'
                                     'plugin = "small-cnn"\noptions = { epochs = 2.5 }\n'
                                     '[sources]\nood = ["gaussian"]\n')
    refuse("run", "-b", str(tmp_path / "b.toml"), "-d", "msp",
           words=["model 'small-cnn'", "option epochs=2.5: expected an integer"])


class Opaque:
    """A type pydantic has no schema for (a tensor, a network): values pass through unchecked."""


class Loose(Detector):
    """A third-party detector with annotations of every kind.

    Options:
        ``k``: how many neighbours
            (at least one)
        scale: multiplies the score
    """

    name = "loose"

    def __init__(self, *, k: Annotated[int, Field(ge=1)] = 1, scale: float = 1.0, thing: Opaque | None = None,
                 hidden: "NoSuchType" = None, untyped=0,  # noqa: F821  (an annotation that cannot be resolved)
                 size: Annotated[int, Field(ge=0, le=100, description="percent kept")] = 50):
        self.k = k


def _entry(cls, **defaults):
    class Plugin:
        @hookimpl
        def oodbench_register_detectors(self, register):
            register(cls, **defaults)

    return build_registry(extra_plugins=[Plugin()], strict=True).get("detectors", cls.name)


def test_what_cannot_be_checked_passes_through_and_the_rest_is_still_checked():
    entry = _entry(Loose)
    thing, hidden = Opaque(), object()
    resolved = resolve_options(entry, {"thing": thing, "hidden": hidden, "untyped": "anything", "scale": 3})
    assert resolved["thing"] is thing and resolved["hidden"] is hidden and resolved["untyped"] == "anything"
    assert resolved["scale"] == 3.0 and type(resolved["scale"]) is float
    with pytest.raises(OptionError, match=r"^detector 'loose' option size=101: expected an integer >= 0 and <= 100$"):
        resolve_options(entry, {"size": 101})
    with pytest.raises(OptionError, match="option k=0: expected an integer >= 1"):
        resolve_options(_entry(Loose, k=0), {})  # a registered default is an option like any other


def test_an_option_error_survives_the_trip_to_and_from_a_worker():
    error = OptionError("detectors", "gmm", "k", "abc", "an integer")
    back = pickle.loads(pickle.dumps(error))
    assert str(back) == str(error) == "detector 'gmm' option k='abc': expected an integer"
    assert isinstance(back, ValueError) and back.detail == "option k='abc': expected an integer"


# -- constructor and fit failures in a run ---------------------------------------------------------

class Picky(Detector):
    """Takes only an even k (its constructor says so)."""

    name = "picky"

    def __init__(self, *, k: int = 2, scale: float = 1.0):
        if k % 2:
            raise ValueError(f"k must be even, got {k}")
        self.k, self.scale = k, scale

    def score(self, view):
        return self.scale * view.logits.max(1)


class FitBoom(Detector):
    """Fails in fit with a plain exception."""

    name = "fitboom"

    def fit(self, ctx):
        raise RuntimeError("boom in fit")


class Failing:
    @hookimpl
    def oodbench_register_detectors(self, register):
        register(Picky)
        register(FitBoom)


TINY = """name = "tiny"
[in_distribution]
dataset = "digits"
[model]
plugin = "small-cnn"
options = { epochs = 1, width = 4 }
[sources]
ood = ["gaussian", "uniform"]
"""


def test_a_constructor_error_is_a_bad_option_and_tracebacks_reach_run_json(tmp_path):
    registry = build_registry(extra_plugins=[Failing()], strict=True)
    (tmp_path / "tiny.toml").write_text(TINY)
    opts = RunOptions(benchmark=load_benchmark(tmp_path / "tiny.toml"),
                      detectors=parse_detectors("picky[k=3],picky[scale=2],fitboom"), seeds=[0], cache_dir=None,
                      data_dir=Path("."), device=torch.device("cpu"), progress=False, executor="inline")
    result = run_benchmark(opts, registry)
    frame = results_frame(result.rows).set_index(["detector", "source"])
    assert len(frame.loc["picky[k=3]"]) == 3  # mistakes and two OOD sets
    assert set(frame.loc["picky[k=3]", "error"]) == {"bad options: ValueError: k must be even, got 3"}
    assert set(frame.loc["fitboom", "error"]) == {"fit failed: RuntimeError: boom in fit"}
    assert (frame.loc["picky[scale=2]", "status"] == "ok").all()
    recorded = json.loads(frame.loc["picky[scale=2]", "detector_options"].iloc[0])
    assert recorded == {"k": 2, "scale": 2.0} and type(recorded["scale"]) is float  # what ran, converted

    files = write_run(tmp_path / "out", result.rows, result.timings, result.meta)
    tracebacks = json.loads(Path(files["run"]).read_text())["tracebacks"]
    by_detector = {t["detector"]: t for t in tracebacks}
    assert sorted(t["detector"] for t in tracebacks) == ["fitboom", "picky[k=3]"], "once per detector and seed"
    assert "ValueError: k must be even, got 3" in by_detector["picky[k=3]"]["traceback"]
    assert "in __init__" in by_detector["picky[k=3]"]["traceback"]
    assert "RuntimeError: boom in fit" in by_detector["fitboom"]["traceback"]
    assert "in fit" in by_detector["fitboom"]["traceback"]


# -- listing options ------------------------------------------------------------------------------

def test_list_verbose_shows_each_option_with_type_default_and_description():
    done = run_cli("list", "detectors", "-v")
    assert done.returncode == 0, done.stderr
    gmm = done.stdout.split("\ngmm (oodbench")[1].split("\n\n")[0]
    k = next(line.split() for line in gmm.splitlines() if line.split()[:1] == ["k"])
    assert k[:5] == ["k", "int", ">=", "1", "100"] and "components" in " ".join(k), gmm
    assert "reg_covar  float     0.0001" in gmm and '"kmeans"' in gmm
    assert "no options" in done.stdout.split("\nmsp (oodbench")[1].split("\n\n")[0]


def test_list_json_has_every_option():
    listed = json.loads(run_cli("list", "detectors", "--json").stdout)
    by_name = {d["name"]: d for d in listed["detectors"]}
    k = next(o for o in by_name["gmm"]["options"] if o["name"] == "k")
    assert k == {"name": "k", "type": "int >= 1", "default": 100, "required": False,
                 "description": "k=100 components (the paper's GMM-100; also registered as gmm-100 and gmm-1000)"}
    assert by_name["gmm-1000"]["defaults"] == {"k": 1000}, "kept for compatibility"
    assert next(o for o in by_name["gmm-1000"]["options"] if o["name"] == "k")["default"] == 1000
    assert next(o for o in by_name["odin"]["options"] if o["name"] == "epsilons")["type"] == "tuple[float, ...]"
    assert by_name["msp"]["options"] == [] and all("seed" not in [o["name"] for o in d["options"]]
                                                   for d in listed["detectors"])


def test_descriptions_come_from_the_docstring_or_the_field():
    infos = {o.name: o for o in option_infos(_entry(Loose))}
    assert infos["k"].description == "how many neighbours (at least one)" and infos["k"].type == "int >= 1"
    assert infos["scale"].description == "multiplies the score"
    assert infos["size"].description == "percent kept" and infos["size"].type == "int >= 0 and <= 100"
    assert infos["hidden"].type == "NoSuchType" and infos["untyped"].type == "" and infos["untyped"].default == 0

    class Prose(Detector):
        """Prose options, as the built-ins write them.

        Options: a=1 the first; b=2, c=3 (both small); ``d`` (used with
        ``a``; rarely); e=5.
        Deviations: f=6 is not an option paragraph.
        """

    described = option_descriptions(Prose, ["a", "b", "c", "d", "e", "f"])
    assert described == {"a": "a=1 the first", "c": "c=3 (both small)", "d": "``d`` (used with ``a``; rarely)"}


# -- a benchmark's own detector options ----------------------------------------------------------

def test_a_benchmarks_detector_options_come_under_the_command_lines(tmp_path):
    """[detectors.NAME] in a benchmark file (issue 20 items 7 and 9: paper benchmarks run the papers' detector
    configurations): what the command line gives wins, the label stays the user's, the rows record what ran."""
    (tmp_path / "tiny.toml").write_text(TINY + "[detectors.gmm]\nk = 3\n")
    done = run_cli("run", "-b", tmp_path / "tiny.toml", "-d", "gmm,gmm[k=2]", "-o", tmp_path / "out", "--no-cache",
                   "-q", "--executor", "inline")
    assert done.returncode == 0, done.stderr
    rows = pd.read_csv(tmp_path / "out" / "results.csv")
    ran = {d: json.loads(o) for d, o in zip(rows["detector"], rows["detector_options"])}
    assert set(ran) == {"gmm", "gmm[k=2]"}
    assert ran["gmm"]["k"] == 3 and ran["gmm[k=2]"]["k"] == 2


@pytest.mark.parametrize("table, words", [
    ("[detectors.nosuch]\nk = 3\n", ["benchmark tiny: detectors.nosuch", "nosuch"]),
    ("[detectors.gmm]\nk = \"x\"\n", ["benchmark tiny: detectors.gmm", "option k='x': expected an integer"]),
    ("[detectors.gmm]\nkk = 3\n", ["benchmark tiny: detectors.gmm", "no option kk"]),
    ("[detectors]\ngmm = 3\n", ["detectors: must be a table of detector names", "got {'gmm': 3}"]),
])
def test_a_benchmarks_bad_detector_options_are_refused_in_one_line(tmp_path, refuse, table, words):
    (tmp_path / "tiny.toml").write_text(TINY + table)
    refuse("run", "-b", str(tmp_path / "tiny.toml"), "-d", "msp", words=words)
