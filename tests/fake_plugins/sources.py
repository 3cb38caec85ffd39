"""Failure-source plugins as a third party would write them, from ``oodbench.api`` alone."""
from __future__ import annotations

import numpy as np

from oodbench import hookimpl
from oodbench.api import Case, FailureSource, ImageRequest, Side, SourceContext


class EveryOtherImage(FailureSource):
    """Negatives: every other image (rows 0, 2, 4, ...) of ``size`` images of ``dataset``; positives: the test set."""

    name = "every-other"
    kind = "ood"

    def __init__(self, *, dataset: str = "uniform", size: int = 100):
        self.dataset, self.size = dataset, size
        self.images = f"every-other:{dataset}"

    def image_sets(self) -> list[ImageRequest]:
        return [ImageRequest(self.images, dataset=self.dataset, options={"size": self.size})]

    def cases(self) -> list[Case]:
        return [Case(self.images, f"every other {self.dataset} image", ("test", self.images))]

    def carve(self, case: Case, ctx: SourceContext) -> tuple[Side, Side]:
        return (Side("test", np.arange(len(ctx.predictions["test"]))),
                Side(self.images, np.arange(0, len(ctx.predictions[self.images]), 2)))


class BrokenCarving(FailureSource):
    """Two rows whose carving raises: they fail, and nothing else does."""

    name = "broken-carving"
    kind = "ood"

    def cases(self) -> list[Case]:
        return [Case("broken:one", "nothing"), Case("broken:two", "nothing")]

    def carve(self, case: Case, ctx: SourceContext) -> tuple[Side, Side]:
        raise RuntimeError(f"carving {case.name} broke")


class NamesATestSplit(FailureSource):
    """Asks for an image set under the in-distribution split's name ``test``: refused before any work."""

    name = "names-a-split"
    kind = "ood"

    def image_sets(self) -> list[ImageRequest]:
        return [ImageRequest("test", dataset="uniform")]

    def cases(self) -> list[Case]:
        return [Case("names-a-split", "uniform noise", ("test",))]

    def carve(self, case: Case, ctx: SourceContext) -> tuple[Side, Side]:
        raise AssertionError("never reached")


class BrokenPlanning(FailureSource):
    """A bug in ``image_sets``, which the plan calls before any data is read: one line naming the source."""

    name = "broken-planning"
    kind = "ood"

    def image_sets(self) -> list[ImageRequest]:
        raise RuntimeError("image_sets broke")

    def cases(self) -> list[Case]:
        return [Case("broken-planning", "nothing")]

    def carve(self, case: Case, ctx: SourceContext) -> tuple[Side, Side]:
        raise AssertionError("never reached")


class FakeSources:
    @hookimpl
    def oodbench_register_sources(self, register):
        for source in (EveryOtherImage, BrokenCarving, NamesATestSplit, BrokenPlanning):
            register(source)
