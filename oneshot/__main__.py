"""``python -m oneshot`` runs the command line (also under ``torchrun``)."""

from oneshot.cli import main

if __name__ == "__main__":
    main()
