"""The three failure sources of the papers: mistakes, out-of-distribution sets, adversarial attacks.

Benchmark files name them by the shorthand keys of ``[sources]`` (``mistakes = true``,
``ood = [...]``, ``[[sources.attacks]]``), each entry one instance of these plugins.
"""
from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import Field

from oodbench.api import Case, FailureSource, ImageRequest, Side, SourceContext


class Mistakes(FailureSource):
    """The classifier's mistakes: correctly classified test inputs are the positives, misclassified ones
    the negatives (the feature-GMM paper's "misclassification" setting; Hendrycks & Gimpel 2017)."""

    name = "mistakes"
    kind = "mistakes"

    def cases(self) -> list[Case]:
        return [Case("mistakes", "misclassified test inputs")]

    def carve(self, case: Case, ctx: SourceContext) -> tuple[Side, Side]:
        correct = ctx.predictions["test"] == ctx.labels["test"]
        return Side("test", np.flatnonzero(correct)), Side("test", np.flatnonzero(~correct))


class OutOfDistribution(FailureSource):
    """An out-of-distribution set: every in-distribution test input is a positive, every image of the
    ``dataset`` plugin (loaded as a failure source, in the in-distribution format) a negative.

    Options: ``dataset`` (a dataset plugin), ``label`` (the rows' source is ``ood:<label>``;
    the dataset's name by default), ``options`` (the dataset's options).
    """

    name = "ood"
    kind = "ood"

    def __init__(self, *, dataset: Annotated[str, Field(min_length=1)], label: str = "",
                 options: dict[str, Any] | None = None):
        self.dataset, self.label, self.options = dataset, label or dataset, dict(options or {})

    def image_sets(self) -> list[ImageRequest]:
        return [ImageRequest(f"ood:{self.label}", dataset=self.dataset, options=self.options)]

    def cases(self) -> list[Case]:
        return [Case(f"ood:{self.label}", f"{self.dataset} images", ("test", f"ood:{self.label}"))]

    def carve(self, case: Case, ctx: SourceContext) -> tuple[Side, Side]:
        images = case.uses[1]
        return (Side("test", np.arange(len(ctx.predictions["test"]))),
                Side(images, np.arange(len(ctx.predictions[images]))))


class Adversarial(FailureSource):
    """Adversarial versions of the first ``attack_subset`` test inputs under ``attack`` at each ``eps``.

    Two sources per eps: ``adv:<attack>:<eps>:all`` (every attacked image is a negative) and
    ``adv:<attack>:<eps>:flipped`` (only those whose predicted class the attack changed, as the
    feature-GMM paper counts adversarial failures). Positives: the clean images attacked.
    Options: ``attack`` (an attack plugin), ``eps`` (budgets in [0, 1] pixel units),
    ``options`` (the attack's options).
    """

    name = "attacks"
    kind = "adversarial"

    def __init__(self, *, attack: Annotated[str, Field(min_length=1)],
                 eps: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=1)],
                 options: dict[str, Any] | None = None):
        self.attack, self.eps, self.options = attack, [float(e) for e in eps], dict(options or {})

    def image_sets(self) -> list[ImageRequest]:
        return [ImageRequest(f"adv:{self.attack}:{e:g}", attack=self.attack, options=self.options, eps=e)
                for e in self.eps]

    def cases(self) -> list[Case]:
        return [case for e in self.eps for case in (
            Case(f"adv:{self.attack}:{e:g}:flipped", "adversarial versions that change the prediction",
                 ("test", f"adv:{self.attack}:{e:g}")),
            Case(f"adv:{self.attack}:{e:g}:all", "all adversarial versions", ("test", f"adv:{self.attack}:{e:g}")))]

    def carve(self, case: Case, ctx: SourceContext) -> tuple[Side, Side]:
        subset, attacked = ctx.attack_subset, case.uses[1]
        # Attacked image i is the attack of clean image subset[i]: pair id i on both sides
        clean = Side("test", subset, pairs=np.arange(len(subset)))
        if case.name.endswith(":all"):
            return clean, Side(attacked, np.arange(len(subset)), pairs=np.arange(len(subset)))
        flipped = np.flatnonzero(ctx.predictions[attacked] != ctx.predictions["test"][subset])
        return clean, Side(attacked, flipped, pairs=flipped)
