"""The research studies, one folder each (driver ``run.py``, its study-only code, a README); not part of
the installed package, which never imports from here (tests/test_layout.py).

A driver runs as ``python scripts/<study>/run.py ...`` from anywhere: its first lines put the repository
root on ``sys.path``, and every import is absolute from there (``scripts._common``,
``scripts.<study>.<module>``, ``abmll_pyro``)."""
