"""Shared fixtures: tiny random models of each supported family, built from configs in code."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOCAB = 128


def _tiny_configs() -> dict[str, Callable[[], nn.Module]]:
    import transformers as tf

    def llama() -> nn.Module:
        cfg = tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        return tf.LlamaForCausalLM(cfg)

    def gemma3() -> nn.Module:
        cfg = tf.Gemma3TextConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=256,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * 2,
        )
        return tf.Gemma3ForCausalLM(cfg)

    def opt() -> nn.Module:
        cfg = tf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
        )
        return tf.OPTForCausalLM(cfg)

    def gpt2() -> nn.Module:
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=256)
        return tf.GPT2LMHeadModel(cfg)

    def neox() -> nn.Module:
        cfg = tf.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=256,
        )
        return tf.GPTNeoXForCausalLM(cfg)

    def bert() -> nn.Module:
        cfg = tf.BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=256,
        )
        return tf.BertForMaskedLM(cfg)

    return {"llama": llama, "gemma3": gemma3, "opt": opt, "gpt2": gpt2, "neox": neox, "bert": bert, **_moe_configs()}


def _moe_configs() -> dict[str, Callable[[], nn.Module]]:
    """Tiny mixtures of experts: fused 3-D experts behind transformers' ExpertsInterface."""
    import transformers as tf

    small = {"vocab_size": VOCAB, "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 256}

    def mixtral() -> nn.Module:
        cfg = tf.MixtralConfig(
            **small, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2, num_local_experts=4,
            num_experts_per_tok=2,
        )  # fmt: skip
        return tf.MixtralForCausalLM(cfg)

    def qwen3_moe() -> nn.Module:
        cfg = tf.Qwen3MoeConfig(
            **small, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2,
            num_experts=8, num_experts_per_tok=2, head_dim=16,
        )  # fmt: skip
        return tf.Qwen3MoeForCausalLM(cfg)

    def gpt_oss() -> nn.Module:  # experts transposed, gate/up interleaved, with biases
        cfg = tf.GptOssConfig(
            **small, intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2, num_local_experts=4,
            num_experts_per_tok=2, head_dim=16, layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
        return tf.GptOssForCausalLM(cfg)

    def deepseek_v3() -> nn.Module:  # MLA attention, a shared expert, a first dense layer
        cfg = tf.DeepseekV3Config(
            **small, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_key_value_heads=4,
            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
            topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        )  # fmt: skip
        return tf.DeepseekV3ForCausalLM(cfg)

    return {"mixtral": mixtral, "qwen3_moe": qwen3_moe, "gpt_oss": gpt_oss, "deepseek_v3": deepseek_v3}


FAMILIES = ["llama", "gemma3", "opt", "gpt2", "neox", "bert"]
MOE_FAMILIES = ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3"]


@pytest.fixture
def tiny_model() -> Callable[[str], nn.Module]:
    """Build a tiny random model of the named family with a fixed seed, in eval mode."""

    def build(family: str) -> nn.Module:
        torch.manual_seed(0)
        model = _tiny_configs()[family]()
        return model.eval()

    return build


@pytest.fixture
def random_layer() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(W [out, in], X [tokens, in], H = XᵀX/tokens)`` with correlated inputs, seeded."""

    def make(out: int = 32, inp: int = 64, tokens: int = 512, seed: int = 0) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(out, inp, generator=gen)
        mix = torch.randn(inp, inp, generator=gen) / inp**0.5
        scales = torch.rand(inp, generator=gen) * 3 + 0.1
        x = (torch.randn(tokens, inp, generator=gen) @ (torch.eye(inp) + mix)) * scales
        return w, x, x.T @ x / tokens

    return make


def char_tokenizer() -> object:
    """A character-level fast tokenizer over printable ASCII (ids < VOCAB), with a BOS token."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for ch in chars:
        vocab[ch] = len(vocab)
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, tiny_model: Callable[[str], nn.Module]) -> Callable[[str], Path]:
    """Save a tiny model of a family plus the char tokenizer to a folder; returns the folder."""

    def make(family: str = "llama") -> Path:
        folder = tmp_path / f"tiny-{family}"
        tiny_model(family).save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)  # type: ignore[attr-defined]
        return folder

    return make


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A small English text file for calibration / evaluation."""
    from oneshot.calibration.data import bundled_text

    path = tmp_path / "calib.txt"
    path.write_text(bundled_text()[:20000])
    return path


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the safetensors files of a saved model folder."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                out[key] = f.get_tensor(key)
    return out
