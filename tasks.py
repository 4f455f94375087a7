"""Invoke entry point for a checkout: ``inv --list``.

The ``tasks/`` folder next to this file contains YAML recipes and has no ``__init__.py``, so Python
never imports it as a package and ``import tasks`` (what Invoke does) finds this module.
"""

from fraisier.cli import namespace

ns = namespace
