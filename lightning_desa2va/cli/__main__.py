"""``python -m lightning_desa2va.cli``: the ``desa2va`` command without the installed entry point."""

from lightning_desa2va.cli import main

if __name__ == "__main__":
    main()
