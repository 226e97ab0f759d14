"""``python -m pdm.ablation``: see :mod:`pdm.ablation.driver`."""

from pdm.ablation.driver import main

if __name__ == "__main__":
    main()
