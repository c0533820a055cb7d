"""One rank of the distributed tests: ``gradspec.profile(model, data, out, **options)``.

Started by ``torch.distributed.run``; with ``--own-group`` it sets up the gloo process group
itself before calling gradspec (the Python API inside a caller's group), else gradspec
joins the group from the launcher's environment. A GradspecError exits 2 with its line.
The environment may ask it to exit hard after some chunks (killed_run.py).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch.distributed as dist
from killed_run import stop_if_asked

import gradspec
from gradspec.errors import GradspecError


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("model", "data", "out", "options"):
        parser.add_argument(name)
    parser.add_argument("--own-group", action="store_true")
    args = parser.parse_args()
    stop_if_asked()
    if args.own_group:
        dist.init_process_group("gloo")
    try:
        gradspec.profile(args.model, args.data, args.out, **json.loads(args.options))
    except GradspecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.own_group:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
