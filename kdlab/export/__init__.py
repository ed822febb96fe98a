"""Exporting a finished stage (``python -m kdlab.export``): finding and rebuilding it
(:mod:`~kdlab.export.target`), checking the export against kdlab (:mod:`~kdlab.export.check`), the formats
and the command line (:mod:`~kdlab.export.cli`)."""
