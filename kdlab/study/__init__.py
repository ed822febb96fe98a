"""Results studies (``python -m kdlab.study``): their definitions and commands (:mod:`~kdlab.study.config`),
tables and the README block (:mod:`~kdlab.study.tables`); running the sweeps and the command line
(:mod:`~kdlab.study.cli`)."""
