"""Covariate shift: the in-distribution test set under a common corruption, read the two ways users ask for."""
from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from oodbench.api import Case, FailureSource, ImageRequest, Side, SourceContext

Reading = Literal["shift", "mistakes"]


class CovariateShift(FailureSource):
    """The in-distribution test images under one common corruption (Hendrycks & Dietterich, ICLR 2019),
    made by the ``corrupted`` dataset plugin (or ``dataset``: any plugin taking ``corruption`` and
    ``severity`` and keeping the test labels), read two ways:

    * ``shift:<corruption>-<severity>`` (kind ``shift``): shifted inputs as failures. Positives:
      the clean test inputs; negatives: their corrupted versions (OpenOOD's covariate-shifted ID
      treated as a failure).
    * ``mistakes:<corruption>-<severity>`` (kind ``mistakes``): shifted but correct inputs are
      trustworthy. On the corrupted set, positives are the inputs the classifier still gets right,
      negatives those it gets wrong (FD-Shifts' shift setting; OpenOOD v1.5's full-spectrum view).
      The selective-classification metrics apply, as on the ``mistakes`` source.

    Options: ``corruption`` (a name the dataset plugin knows: ``oodbench list datasets -v``),
    ``severity`` (1-5), ``readings`` (which of the two, both by default), ``dataset``.
    """

    name = "covariate-shift"
    kind = "shift"

    def __init__(self, *, corruption: Annotated[str, Field(min_length=1)] = "gaussian_noise",
                 severity: Annotated[int, Field(ge=1, le=5)] = 3,
                 readings: Annotated[list[Reading], Field(min_length=1)] = ("shift", "mistakes"),
                 dataset: Annotated[str, Field(min_length=1)] = "corrupted"):
        self.corruption, self.severity, self.dataset = corruption, severity, dataset
        self.readings = list(dict.fromkeys(readings))
        self.images = f"shift:{corruption}-{severity}"

    def image_sets(self) -> list[ImageRequest]:
        return [ImageRequest(self.images, dataset=self.dataset,
                             options={"corruption": self.corruption, "severity": self.severity})]

    def cases(self) -> list[Case]:
        what = f"{self.corruption} at severity {self.severity}"
        cases = {"shift": Case(self.images, f"test inputs under {what}", ("test", self.images)),
                 "mistakes": Case(f"mistakes:{self.corruption}-{self.severity}",
                                  f"test inputs under {what} that the classifier gets wrong", (self.images,),
                                  kind="mistakes")}
        return [cases[reading] for reading in self.readings]

    def carve(self, case: Case, ctx: SourceContext) -> tuple[Side, Side]:
        shifted = self.images
        if case.kind == "mistakes":
            labels = ctx.labels[shifted]
            if labels is None:
                raise ValueError(f"dataset '{self.dataset}' returned no labels: the mistakes reading needs them")
            correct = ctx.predictions[shifted] == labels
            return Side(shifted, np.flatnonzero(correct)), Side(shifted, np.flatnonzero(~correct))
        everything = np.arange(len(ctx.predictions["test"]))
        # Shifted image i is test image i corrupted: the pair is held out whole or not at all
        return Side("test", everything, pairs=everything), Side(shifted, everything, pairs=everything)
