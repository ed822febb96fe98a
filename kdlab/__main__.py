"""``python -m kdlab``: one knowledge-distillation pipeline per job (the command line is :mod:`kdlab.cli.main`)."""
from kdlab.cli.main import main

if __name__ == "__main__":
    main()
