"""Movement pruning from a base / fine-tuned pair: |W| − |W_base|, read from the base's shards."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import VOCAB
from torch import nn

import oneshot
from oneshot.errors import ConfigError, ModelError
from oneshot.layers import as_matrix, find_blocks, find_linears
from oneshot.methods.movement import movement


def test_movement_hand_made_pair() -> None:
    """Score |fine| − |base|: [[−.5, .5, −2], [0, 1, .5]]; at 50% the three that shrank most go."""
    base = torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]])
    fine = torch.tensor([[0.5, -2.5, 1.0], [4.0, 6.0, -6.5]])
    result = movement(fine, base, 0.5)
    assert result.mask.tolist() == [[False, True, False], [False, True, True]]
    assert torch.equal(result.weight, fine * result.mask)
    # magnitude would keep other weights: movement is not |fine|
    assert oneshot.methods.magnitude.magnitude(fine, 0.5).mask.tolist() != result.mask.tolist()
    # N:M within rows: 1:3 keeps the one that grew most in each row
    assert movement(fine, base, 2 / 3, nm=(1, 3)).mask.tolist() == [[False, True, False], [False, True, False]]


def _pair(tmp_path: Path) -> tuple[nn.Module, Path]:
    """A tiny BERT 'fine-tuned' (BertForMaskedLM, every weight scaled by a random factor) from a saved BertModel."""
    torch.manual_seed(0)
    cfg = tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    fine = tf.BertForMaskedLM(cfg).eval()
    base = tf.BertModel(cfg, add_pooling_layer=False)
    base.load_state_dict(fine.bert.state_dict())
    base.save_pretrained(tmp_path / "base")  # keys without the "bert." prefix
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in fine.bert.encoder.parameters():
            p.mul_(torch.rand(p.shape, generator=gen) + 0.5)
    return fine, tmp_path / "base"


def test_engine_prunes_what_shrank_most(tmp_path: Path) -> None:
    fine, base_dir = _pair(tmp_path)
    base = tf.BertModel.from_pretrained(base_dir)
    before = {name: as_matrix(m) for name, m in find_linears(find_blocks(fine)[1][0]).items()}
    report = oneshot.prune(fine, method="movement", sparsity=0.6, base=str(base_dir), quiet=True)
    assert report.achieved_sparsity == pytest.approx(0.6, abs=1e-3)
    base_linears = find_linears(find_blocks(base)[1][0])
    for name, module in find_linears(find_blocks(fine)[1][0]).items():
        want = movement(before[name], as_matrix(base_linears[name]), 0.6).mask
        assert torch.equal(as_matrix(module) != 0, want), name


def test_movement_errors(tmp_path: Path, tiny_model: Callable[[str], nn.Module]) -> None:
    fine, base_dir = _pair(tmp_path)
    with pytest.raises(ConfigError, match="pass --base BASE_FOLDER"):
        oneshot.PruneConfig(method="movement", sparsity=0.5)
    with pytest.raises(ConfigError, match="--base does not apply to --method wanda"):
        oneshot.PruneConfig(method="wanda", sparsity=0.5, base=str(base_dir))
    with pytest.raises(ModelError, match="is not a folder"):
        oneshot.prune(fine, method="movement", sparsity=0.5, base=str(tmp_path / "nope"), quiet=True)
    llama = tiny_model("llama")  # another architecture: its layers are not in the base
    with pytest.raises(ModelError, match=r"has no weight for model\.layers\.0\.self_attn\.q_proj"):
        oneshot.prune(llama, method="movement", sparsity=0.5, base=str(base_dir), quiet=True)
    wider = tf.BertForMaskedLM(
        tf.BertConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
        )
    )
    with pytest.raises(ModelError, match="the base must have the same architecture"):
        oneshot.prune(wider, method="movement", sparsity=0.5, base=str(base_dir), quiet=True)
