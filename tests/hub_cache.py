"""Hugging Face caches built on this machine, read offline as a download would have left them.

Nothing here reaches the Hub. A model repository is laid out as ``huggingface_hub`` stores
a download (``hub/models--org--name/`` with ``blobs/`` named by content hash,
``snapshots/<commit>/`` linking to them, ``refs/<branch>`` holding the commit); a data set is
written by ``datasets``' own builder into its Arrow cache, where ``load_dataset`` looks
for a Hub data set under ``HF_DATASETS_OFFLINE``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cache_repo(folder: Path, hf_home: Path, repo_id: str, commit: str, ref: str = "main") -> Path:
    """Lay ``folder``'s files out as the Hub cache holds model ``repo_id`` at ``commit``."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def cache_dataset(
    records: dict[str, list[dict]], hf_home: Path, repo_id: str, config: str, commit: str
) -> None:
    """Write the splits of data set ``repo_id`` (config ``config``) into ``datasets``' cache.

    Runs in a subprocess so the ``datasets`` of the tests keeps its own cache settings.
    """
    sources = hf_home.parent / f"{repo_id.replace('/', '--')}-{config}-files"
    sources.mkdir(parents=True, exist_ok=True)
    for split, rows in records.items():
        (sources / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = f"""
import os
from pathlib import Path
import datasets
from datasets.packaged_modules.json.json import Json
cache = Path(datasets.config.HF_DATASETS_CACHE)
namespace, name = {repo_id!r}.split("/")
builder = Json(cache_dir=str(cache), dataset_name=name, config_name={config!r},
    config_id={config!r}, hash={commit!r},
    data_files={{s: str(Path({str(sources)!r}) / f"{{s}}.jsonl") for s in {list(records)!r}}})
builder.download_and_prepare()
# A Hub load caches under 'namespace___name'; a builder without a repo_id under 'name'.
target = cache / f"{{namespace}}___{{name}}" / {config!r}
target.parent.mkdir(parents=True, exist_ok=True)
os.rename(cache / name / {config!r}, target)
"""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True)


def offline_env(hf_home: Path) -> dict[str, str]:
    """The environment of a process that reads only the caches under ``hf_home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return {
        **env,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "GRADSPEC_CACHE": str(hf_home.parent / "gradspec-cache"),
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]),
    }


def gradspec_cli(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """``python -m gradspec ARGS`` in ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "gradspec", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
