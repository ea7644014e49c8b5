"""The held-out evaluation of the untrained model, kept and reused.

`tepo train` evaluates the model before training (eval_before.json). Greedy decoding of the same
weights on the same problems with the same code, settings and hardware gives the same verdicts, so
every run of a study (and every rerun of a recipe) would repeat the same minutes of work. This keeps
that result as `KEY.json` in `cache_dir()` (`$TEPO_BASELINE_EVALS`, default
`$TEPO_CACHE/baseline-evals`), where KEY hashes everything the result
depends on:

- the model folder's files, by content (a hub id, not a folder, is never cached), and the loaded
  model's config (what the loading options changed);
- the problems (ids, texts, gold answers), max_new_tokens and the generate batch size;
- the precision (weights' dtype, bf16 autocast), the device and its CPU capability / GPU name, torch's
  thread count (a reduction split over other threads rounds otherwise);
- tepo's own source (every .py file of the package) and the versions of torch, transformers, trl
  and accelerate.

Only one process: with several, the evaluation is collective and each process's share differs, so
it always runs. `--heldout_eval_cache false` (or `TEPO_BASELINE_EVALS=off`) turns it off. A cached result is marked
(`cached_from`: the key; its `generate_s` is that of the run that computed it).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

KEY_VERSION = 1


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_digest(folder: Path) -> str:
    """sha256 over the relative paths and contents of every file under `folder` (sorted)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + _sha256_file(path).encode() + b"\n")
    return digest.hexdigest()


def tepo_source_digest() -> str:
    """sha256 over tepo's own .py files: any change to the code invalidates every cached result."""
    import tepo

    root = Path(tepo.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _hardware(device: Any) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": str(getattr(device, "type", device)), "threads": torch.get_num_threads()}
    if info["device"] == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def baseline_eval_key(model_path: str, problems: Sequence[dict], *, max_new_tokens: int, batch_size: int,
                      dtype: str, bf16: bool, device: Any, model_config: dict | None = None,
                      shared_prefix: bool = True) -> str | None:
    """The cache key of a held-out evaluation of the untrained model at `model_path`; None when
    `model_path` is not a local folder (its content cannot be hashed). `model_config`: the loaded
    model's config as a dict (what loading options changed: attention implementation, dtype...)."""
    folder = Path(model_path)
    if not folder.is_dir():
        return None
    import accelerate
    import torch
    import transformers
    import trl

    config = {k: v for k, v in (model_config or {}).items() if k != "_name_or_path"}  # the content, not the path
    try:
        problems_text = json.dumps(list(problems), sort_keys=True)
        config_text = json.dumps(config, sort_keys=True)
    except (TypeError, ValueError):  # not plain JSON: no faithful key
        return None
    what = {
        "version": KEY_VERSION,
        "model": folder_digest(folder),
        "problems": hashlib.sha256(problems_text.encode()).hexdigest(),
        "max_new_tokens": int(max_new_tokens),
        "batch_size": int(batch_size),
        "dtype": str(dtype),
        "model_config": hashlib.sha256(config_text.encode()).hexdigest(),
        "bf16": bool(bf16),
        "shared_prefix": bool(shared_prefix),  # another decoding: the same tokens only up to rounding
        "hardware": _hardware(device),
        "tepo_source": tepo_source_digest(),
        "libraries": {m.__name__: m.__version__ for m in (torch, transformers, trl, accelerate)},
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def cache_dir() -> Path | None:
    """``$TEPO_BASELINE_EVALS``, or ``baseline-evals`` in tepo's cache (``$TEPO_CACHE``); None when
    ``$TEPO_BASELINE_EVALS`` is ``off`` (the test suite's setting)."""
    from tepo.models import cache_dir as tepo_cache_dir

    where = os.environ.get("TEPO_BASELINE_EVALS")
    if where == "off":
        return None
    return Path(where) if where else tepo_cache_dir() / "baseline-evals"


def load_baseline_eval(key: str) -> dict | None:
    """The stored result for `key`, or None (none stored, the cache off, or a file that does not read:
    it is ignored)."""
    folder = cache_dir()
    if folder is None:
        return None
    path = folder / f"{key}.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and "verdicts" in result else None


def store_baseline_eval(key: str, result: dict) -> None:
    """Keep `result` for `key` (written to a temporary file and renamed: never half-written); nothing
    when the cache is off."""
    folder = cache_dir()
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, folder / f"{key}.json")
