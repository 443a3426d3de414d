"""Bring your own model: every architecture federates and splits (issue 11).

For each architecture of tests/tiny_archs.py (tiny random configs, float32, CPU):

- the split at every s composes to the unsplit model bit for bit (outputs and gradients,
  left and right padding), and each part holds what its output depends on;
- FSLoRA runs with the default LoRA targets, and the exported adapter on a freshly loaded
  base (another seed: random heads must come from the adapter) reproduces the run's metric
  through plain PEFT;
- the split family (hsplitlora, splitlora, hetlora-split) runs one round on a subset with
  an encoder and a sliding-window decoder;
- one-line refusals: an encoder-decoder given to the splitter, no inferable targets.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lorafleet.config import load_config
from lorafleet.errors import LorafleetError
from lorafleet.experiment import build_experiment
from lorafleet.models.loading import default_target_modules, load_base_model
from lorafleet.models.split import Activations, activations_to_tensors, split_model
from lorafleet.runtimes.local import run_local
from tests.conftest import _minilm_tokenizer  # type: ignore[attr-defined]
from tests.test_local_runtime import tiny_overrides
from tests.tiny_archs import ARCHITECTURES, DECODERS, ENCODERS, LAYERS, SLIDING, build, pad_id

LENGTHS = (7, 5, 3)  # B = 3, T = 7: one full row, two padded ones
HEADS = [(t, h) for t in ARCHITECTURES for h in (("lm", "cls") if t in DECODERS else ("cls",))
         if (t, h) != ("granite", "cls")]  # transformers has no Granite classifier


def _batch(pad: int, left: bool, vocab: int = 120) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (len(LENGTHS), max(LENGTHS)), generator=generator)
    ids[ids == pad] = pad + 1
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        mask[row, slice(ids.shape[1] - n, None) if left else slice(0, n)] = 1
    ids[mask == 0] = pad
    return ids, mask


def _unsplit(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The unsplit forward as a training step calls it (no KV cache)."""
    takes_cache = "use_cache" in inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {"use_cache": False} if takes_cache else {}
    return model(input_ids=ids, attention_mask=mask, **kwargs).logits


def _weighted(logits: torch.Tensor) -> torch.Tensor:
    return (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))).sum()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", [None, "eager"], ids=["default-attn", "eager"])
@pytest.mark.parametrize(("model_type", "head"), HEADS, ids=[f"{t}-{h}" for t, h in HEADS])
def test_split_is_bit_exact_at_every_cut(model_type: str, head: str, attn: str | None) -> None:
    try:
        model = build(model_type, head, attn)
    except ValueError as err:  # an architecture without SDPA (Gemma 2, DeBERTa-v2)
        pytest.skip(str(err).splitlines()[0])
    pad = pad_id(model)
    for left in (False, True):
        ids, mask = _batch(pad, left)
        with torch.no_grad():
            expected = _unsplit(model, ids, mask)
        model.zero_grad(set_to_none=True)
        _weighted(_unsplit(model, ids, mask)).backward()
        want = _grads(model)
        for s in range(1, LAYERS):
            split = split_model(model, s)
            model.zero_grad(set_to_none=True)
            sent = split.device_part(ids, mask)
            received = Activations.from_tensors(activations_to_tensors(sent))
            out = split.server_part(received)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
            _weighted(out).backward()
            assert received.hidden.grad is not None
            sent.hidden.backward(received.hidden.grad)
            got = _grads(model)
            assert got.keys() == want.keys()
            # A parameter both parts hold (a tied head, DeBERTa's relative-position table)
            # sums the device's and the server's gradient in another order: float32 close.
            device_ids = {id(p) for p in split.device_part.parameters()}
            both = {n for n, p in model.named_parameters() if id(p) in device_ids
                    and id(p) in {id(q) for q in split.server_part.parameters()}}
            for name in want:
                tol = 1e-6 if name in both else 0.0
                torch.testing.assert_close(got[name], want[name], rtol=0, atol=tol, msg=name)
            # who holds what: layers by index, the rest by dependency, nothing left out
            device = {n for n, _ in split.device_part.named_parameters()}
            server = {n for n, _ in split.server_part.named_parameters()}
            prefix = split.layers_path + "."
            assert {n.split(".")[len(prefix.split(".")) - 1] for n in device
                    if n.startswith(prefix)} == {str(i) for i in range(s)}
            held = {id(p) for p in split.device_part.parameters()} | {
                id(p) for p in split.server_part.parameters()}
            assert held == {id(p) for p in model.parameters()}
            assert not any(n.startswith(f"{prefix}{s}.") for n in device)
            assert any(n.startswith(f"{prefix}{s}.") for n in server)


@pytest.mark.parametrize("model_type", SLIDING)
def test_sliding_window_masks_matter(model_type: str) -> None:
    """The tiny windows really cut attention: without them the output changes, so the
    bit-exact split above reproduced the per-layer masks."""
    ids, mask = _batch(0, left=False)
    windowed = build(model_type, "lm")
    wide = build(model_type, "lm", sliding_window=64)
    with torch.no_grad():
        assert not torch.allclose(_unsplit(windowed, ids, mask), _unsplit(wide, ids, mask))


def test_train_mode_dropout_draws_as_unsplit() -> None:
    model = build("gemma3_text", "lm", attention_dropout=0.5).train()
    ids, mask = _batch(0, left=False)
    torch.manual_seed(3)
    expected = _unsplit(model, ids, mask)
    torch.manual_seed(3)
    split = split_model(model, 2)
    out = split.server_part(split.device_part(ids, mask))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_encoder_decoder_is_refused_in_one_line() -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32,
                                             num_layers=2, num_heads=2))
    with pytest.raises(LorafleetError) as err:
        split_model(t5, 1)
    assert str(err.value) == (
        "cannot split T5ForConditionalGeneration: an encoder-decoder (two layer stacks joined "
        "by cross-attention); the splitter cuts one stack shaped embeddings -> layers -> final "
        "norm -> head (decoder-only LMs and classifiers, encoder classifiers)")


def test_gradient_checkpointing_is_refused_in_one_line() -> None:
    model = build("llama", "lm")
    model.activation_checkpointing_enable()
    with pytest.raises(LorafleetError, match=r"^cannot split LlamaForCausalLM with gradient "
                       r"\(activation\) checkpointing on: .*turn it off$"):
        split_model(model, 1)


# --------------------------------------------------------------------------- real runs


def _saved_dir(model_type: str, head: str, tokenizer: PreTrainedTokenizerBase, root: Path,
               **extra: Any) -> Path:
    """A tiny random model of ``model_type`` over the MiniLM tokenizer, saved with it."""
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
           "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.cls_token_id}
    if model_type in ENCODERS:
        ids.pop("eos_token_id")
        ids.pop("bos_token_id")
    if model_type == "roberta":
        ids["max_position_embeddings"] = 64 + tokenizer.pad_token_id + 1
    if model_type == "modernbert":
        ids.update(cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                   bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    model = build(model_type, head, **ids, **extra)
    out = root / f"{model_type}-{head}"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def decoder_tokenizer() -> PreTrainedTokenizerBase:
    return _minilm_tokenizer(decoder=True)


@pytest.fixture(scope="module")
def encoder_tokenizer() -> PreTrainedTokenizerBase:
    return _minilm_tokenizer(decoder=False)


def _tokenizer_for(model_type: str, request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    name = "encoder_tokenizer" if model_type in ENCODERS else "decoder_tokenizer"
    return request.getfixturevalue(name)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_fslora_default_targets_and_the_exported_adapter_reproduces_the_run(
        model_type: str, tmp_path: Path, tiny_text_csv: Path, request: pytest.FixtureRequest
) -> None:
    kind = "classification" if model_type in ENCODERS else "causal-lm"
    # Encoders are saved as base models, as pretrained checkpoints are: the classifier (and
    # DeBERTa's pooler, DistilBERT's pre-classifier, ModernBERT's head) start random.
    head = "base" if kind == "classification" else "lm"
    model_dir = _saved_dir(model_type, head, _tokenizer_for(model_type, request), tmp_path)
    cfg = load_config(None, tiny_overrides(model_dir, tiny_text_csv, **{
        "task.kind": kind, "rounds": 1, "num_clients": 2, "data.max_eval_examples": 12}))
    result = run_local(cfg, tmp_path / "run", progress=False)
    summary = result.summary
    base, _ = load_base_model(cfg.model, kind, 3, seed=0)
    assert set(json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
               ["target_modules"]) == set(default_target_modules(base))
    assert summary["modules"] and all(
        any(m.endswith(t) for t in default_target_modules(base)) for m in summary["modules"])
    # a fresh base with another seed: randomly initialised heads (DeBERTa's pooler too)
    # must come from the adapter for the metric to come back
    exp = build_experiment(cfg)
    fresh, _ = load_base_model(cfg.model, kind, 3, seed=42)
    adapted = PeftModel.from_pretrained(fresh, tmp_path / "run" / "adapter").eval()
    again = exp.task.evaluate(adapted, exp.eval_items, 16)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert again["eval_loss"] == pytest.approx(rows[-1]["eval_loss"], rel=1e-5, abs=1e-6)
    assert again[exp.task.metric] == pytest.approx(summary["final"], rel=1e-5)


SPLIT_SUBSET = ["gemma3_text", "phi3", "gpt_neox", "roberta"]  # sliding, fused, parallel, encoder


@pytest.mark.parametrize("algorithm", ["hsplitlora", "splitlora", "hetlora-split"])
@pytest.mark.parametrize("model_type", SPLIT_SUBSET)
def test_split_family_runs_one_round(model_type: str, algorithm: str, tmp_path: Path,
                                     tiny_text_csv: Path, request: pytest.FixtureRequest) -> None:
    kind = "classification" if model_type in ENCODERS else "causal-lm"
    head = "cls" if kind == "classification" else "lm"
    model_dir = _saved_dir(model_type, head, _tokenizer_for(model_type, request), tmp_path)
    profiles = json.dumps([{"name": f"dev{i}", "memory_gb": gb}
                           for i, gb in enumerate([0.0052, 0.02])])
    cfg = load_config(None, tiny_overrides(model_dir, tiny_text_csv, algorithm=algorithm, **{
        "task.kind": kind, "rounds": 1, "num_clients": 2, "fleet.profiles": profiles,
        "fleet.sketch.kind": "ratios", "fleet.sketch.ranks": "null",
        "data.max_eval_examples": 8}))
    result = run_local(cfg, tmp_path / "run", progress=False)
    summary = result.summary
    assert summary["bytes_activations"] > 0
    for client in summary["clients"].values():
        assert 1 <= client["split_point"] <= LAYERS - 1
        assert client["memory_estimate_bytes"] <= client["memory_budget_bytes"]
    assert torch.isfinite(torch.tensor(summary["final"]))
    assert (tmp_path / "run" / "merged" / "config.json").exists()


def test_split_experiment_refuses_an_encoder_decoder(tmp_path: Path, tiny_text_csv: Path,
                                                     encoder_tokenizer: PreTrainedTokenizerBase
                                                     ) -> None:
    from transformers import BartConfig, BartForSequenceClassification

    config = BartConfig(vocab_size=len(encoder_tokenizer), d_model=16, encoder_layers=2,
                        decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=32, decoder_ffn_dim=32, num_labels=3,
                        pad_token_id=encoder_tokenizer.pad_token_id)
    BartForSequenceClassification(config).save_pretrained(tmp_path / "bart")
    encoder_tokenizer.save_pretrained(tmp_path / "bart")
    cfg = load_config(None, tiny_overrides(tmp_path / "bart", tiny_text_csv, algorithm="splitlora",
                                           **{"task.kind": "classification"}))
    with pytest.raises(LorafleetError) as err:
        build_experiment(cfg)
    assert str(err.value).startswith(
        "cannot split BartForSequenceClassification: an encoder-decoder") and "\n" not in str(
        err.value)


def test_gpt2_adapter_config_says_fan_in_fan_out(tmp_path: Path, tiny_gpt2_dir: Path,
                                                 tiny_text_csv: Path) -> None:
    cfg = load_config(None, tiny_overrides(tiny_gpt2_dir, tiny_text_csv, **{
        "task.kind": "causal-lm", "rounds": 1, "lora.target_modules": "[attn.c_attn, mlp.c_fc]"}))
    run_local(cfg, tmp_path / "run", progress=False)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
