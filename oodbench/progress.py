"""Progress display on stderr (tqdm); silent when disabled or when stderr is not a terminal."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr.isatty()

    def iterate(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        if not self.enabled:
            yield from items
            return
        yield from tqdm(items, desc=description, total=total, leave=False, file=sys.stderr, dynamic_ncols=True)

    @contextlib.contextmanager
    def status(self, description: str) -> Iterator[Callable[[str], None]]:
        """A one-line status; the yielded callable updates its message (e.g. per epoch)."""
        if not self.enabled:
            yield lambda message: None
            return
        bar = tqdm(total=0, desc=description, bar_format="{desc}{postfix}", leave=False, file=sys.stderr)
        try:
            yield lambda message: bar.set_postfix_str(message)
        finally:
            bar.close()

    @contextlib.contextmanager
    def counter(self, total: int, description: str) -> Iterator[Callable[[], None]]:
        """A bar over ``total`` steps; the yielded callable advances it by one."""
        if not self.enabled:
            yield lambda: None
            return
        bar = tqdm(total=total, desc=description, leave=False, file=sys.stderr, dynamic_ncols=True)
        try:
            yield lambda: bar.update(1)
        finally:
            bar.close()
