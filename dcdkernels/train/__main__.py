"""``python -m dcdkernels.train ...`` and the ``dcdkernels-train`` console script."""

import sys


def main(argv=None):
    from .config import make_config
    from .trainer import train

    try:
        cfg = make_config(sys.argv[1:] if argv is None else argv)
    except (ValueError, FileNotFoundError) as exc:  # a bad option or config file: no traceback
        print(f"dcdkernels-train: error: {exc}", file=sys.stderr)
        return 2
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
