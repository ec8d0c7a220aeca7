"""``python -m dcdkernels.train ...`` and the ``dcdkernels-train`` console script."""

import sys


def main(argv=None):
    from .config import make_config
    from .trainer import train

    cfg = make_config(sys.argv[1:] if argv is None else argv)
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
