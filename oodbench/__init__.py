"""oodbench: which failure detector tells you first that your classifier is wrong."""
import pluggy

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@oodbench.hookimpl``.
hookimpl = pluggy.HookimplMarker("oodbench")

__all__ = ["__version__", "hookimpl"]
