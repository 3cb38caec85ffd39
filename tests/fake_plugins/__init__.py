"""Tiny third-party plugins for the core's tests: each registers through the hooks as an installed package would,
so a core test needs no built-in plugin of its kind."""
