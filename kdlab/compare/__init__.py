"""Comparing runs (``python -m kdlab.compare``): reading and grouping runs (:mod:`~kdlab.compare.runs`),
tables and CSV (:mod:`~kdlab.compare.tables`), the HTML page (:mod:`~kdlab.compare.html`), plots
(:mod:`~kdlab.compare.plots`), paired statistics (:mod:`~kdlab.compare.paired`), the gain-vs-gap figure
(:mod:`~kdlab.compare.gain_vs_gap`); the command line is :mod:`~kdlab.compare.cli`."""
