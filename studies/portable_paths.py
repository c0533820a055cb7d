"""Make a results folder's JSON files free of this machine's paths before committing it.

A study writes absolute paths into each run's manifest and its ``study.json`` (a resume
needs them); a results folder kept in the repository names them portably instead: the
shared data relative to its folder, an installed package's file as ``<package>/<file>``,
the cache relative to its root (``.cache/...``) and anything in the checkout relative to
it. A resume rewrites them absolute again (it checks data by hash, not by path).

    .venv/bin/python studies/portable_paths.py studies/results/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import site
import sysconfig
from pathlib import Path
from typing import Any

from gradspec.paths import cache_root, project_root
from gradspec.shared_data import shared_data_path


def prefixes() -> list[tuple[str, str]]:
    """(absolute prefix, portable replacement), the most specific first."""
    packages = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    roots = [(shared_data_path(), ""), (cache_root(), ".cache/"), (project_root(), "")]
    roots += [(Path(p), "") for p in packages]
    pairs = {str(path.resolve()) + "/": short for path, short in roots}
    pairs.update({str(path) + "/": short for path, short in roots})
    return sorted(pairs.items(), key=lambda pair: -len(pair[0]))


def portable(value: Any, pairs: list[tuple[str, str]]) -> Any:
    """``value`` with every string that starts with a known prefix shortened."""
    if isinstance(value, dict):
        return {k: portable(v, pairs) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, pairs) for v in value]
    if isinstance(value, str):
        for prefix, short in pairs:
            if value.startswith(prefix):
                return short + value[len(prefix) :]
    return value


def rewrite(folder: Path) -> list[Path]:
    """Rewrite every JSON file under ``folder`` whose paths change; the files changed."""
    pairs, changed = prefixes(), []
    for path in sorted(folder.rglob("*.json")):
        data = json.loads(path.read_text())
        shortened = portable(data, pairs)
        if shortened != data:
            path.write_text(json.dumps(shortened, indent=2) + "\n")
            changed.append(path)
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    changed = rewrite(parser.parse_args().folder)
    print(f"{len(changed)} file(s) rewritten")


if __name__ == "__main__":
    main()
