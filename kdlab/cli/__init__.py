"""The command line: ``python -m kdlab`` (:mod:`kdlab.cli.main`: preflight, signal handling), the Hydra app
(:mod:`kdlab.cli.hydra_app`), the garbage-collector policy around start-up and exit, library log quieting,
and the error line every kdlab command prints (:mod:`kdlab.cli.report`). Importing the package loads nothing."""
