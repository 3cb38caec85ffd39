"""oodbench's built-in plugins (import name ``oodbench_plugins``).

They register through the ``oodbench`` entry-point group exactly as a third-party package
does (see ``pyproject.toml``); the core imports none of them.
"""
