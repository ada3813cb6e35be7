"""Command line: `lmkern info`."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lmkern", description="lmkern: fused transformer kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="which backends can run which op, dtype and device, and why not")
    p_info.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)

    import lmkern
    from lmkern import _ext
    from lmkern.info import backend_matrix

    if args.command == "info":
        if args.json:
            print(json.dumps({"build": _ext.build_info(), "matrix": backend_matrix()}, indent=1))
        else:
            print(lmkern.info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
