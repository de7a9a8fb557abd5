"""Quantization in the engine (#11): --method gptq / rtn, --then, the compressed-tensors output, recipes."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import oneshot
from oneshot.cli import main
from oneshot.config import CalibrationConfig, PruneConfig, read_recipe
from oneshot.errors import ConfigError, OutputError
from oneshot.methods.gptq import rtn
from oneshot.methods.quantspec import QuantSpec
from oneshot.quantized import compress, pack, unpack
from tests.conftest import char_tokenizer, saved_tensors

compressed_tensors = pytest.importorskip("compressed_tensors")


def test_pack_by_hand_and_against_the_loader() -> None:
    """Codes 1..8 at 4 bits fill one word nibble by nibble; 3-bit codes straddle words; the loader agrees."""
    codes = torch.arange(1, 9).unsqueeze(0)  # [1, 8]
    assert pack(codes, 4).tolist() == [[0x87654321]] or pack(codes, 4).tolist() == [[0x87654321 - (1 << 32)]]
    three = torch.tensor([[7] * 11])  # 33 bits: the 11th code takes bits 30-32, across two words
    words = pack(three, 3)
    assert words.shape == (1, 2) and int(words[0, 1]) == 1 and int(words[0, 0]) == -1  # all 32 bits set
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    gen = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4, 8):
        for shape in ((5, 37), (3, 64), (6, 1)):
            c = torch.randint(0, 1 << bits, shape, generator=gen)
            for dim in (0, 1):
                mine = pack(c, bits, dim)
                theirs = pack_to_int32((c - (1 << (bits - 1))).to(torch.int8), bits, packed_dim=dim)
                assert torch.equal(mine, theirs), (bits, shape, dim)
                assert torch.equal(unpack(mine, bits, shape[dim], dim), c)
                restored = unpack_from_int32(mine, bits, torch.Size(shape), packed_dim=dim)
                assert torch.equal(restored.long() + (1 << (bits - 1)), c)
    long = torch.randint(0, 8, (2, 1500), generator=gen)  # 3-bit codes straddle words far along the row too
    assert torch.equal(pack(long, 3), pack_to_int32((long - 4).to(torch.int8), 3))
    assert torch.equal(unpack(pack(long, 3), 3, 1500), long)
    top = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 8]])  # only the word's top bit set: int32's minimum
    assert pack(top, 4).tolist() == [[-(1 << 31)]]
    with pytest.raises(ValueError, match="codes must lie"):
        pack(torch.tensor([[0, 16]]), 4)
    with pytest.raises(ValueError, match="codes must lie"):
        pack(torch.tensor([[3, -1]]), 4)
    for bad in (torch.zeros(4, dtype=torch.long), torch.zeros(1, 1, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match="2-D"):
            pack(bad, 4)
    with pytest.raises(ValueError, match="dim 0 or 1"):
        pack(torch.zeros(2, 2, dtype=torch.long), 4, dim=2)


@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_layer_dequantizes_to_the_weight(symmetric: bool) -> None:
    """The loader's own decompressor turns our tensors back into the quantized weight, bit for bit."""
    from oneshot.quantized import decompress, weights_args

    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    for dtype, bits in ((torch.float32, 4), (torch.bfloat16, 4), (torch.bfloat16, 3), (torch.float16, 8)):
        spec = QuantSpec(bits=bits, group_size=32, symmetric=symmetric, scale_dtype=dtype)
        q = rtn(w, spec)
        layer = compress(q, dtype)
        assert ("weight_zero_point" in layer.tensors) is not symmetric
        assert layer.tensors["weight_packed"].shape == (48, 64 * bits // 32)
        assert layer.tensors["weight_scale"].dtype == dtype and layer.tensors["weight_scale"].shape == (48, 2)
        assert torch.equal(decompress(layer.tensors, weights_args(spec)), q.weight.to(dtype))


def _smol_shaped(dtype: torch.dtype) -> nn.Module:
    """SmolLM2-135M's shapes (hidden 576, 9 heads / 3 KV heads, MLP 1536, tied embeddings), 2 blocks, tiny vocab."""
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).to(dtype).eval()


def _calib() -> torch.Tensor:
    return torch.randint(4, 100, (8, 64), generator=torch.Generator().manual_seed(2))


def test_pruned_and_quantized_model_reloads_with_stock_transformers(tmp_path: Path) -> None:
    """SparseGPT 50% then GPTQ 4-bit on a bf16 model: saved compressed, reloaded by stock transformers, same model."""
    import transformers as tf

    dtype = torch.bfloat16
    model = _smol_shaped(dtype)
    dense = tmp_path / "dense"
    model.save_pretrained(dense)
    out = tmp_path / "w4"
    report = oneshot.prune(
        model, char_tokenizer(), method="sparsegpt", sparsity=0.5, then="gptq", group_size=64, calibration=_calib(),
        out=out, quiet=True,
    )  # fmt: skip
    assert report.extra["quantization"]["layers"] == 14 and all(r.bits == 4 for r in report.layers)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 64 and config["ignore"] == ["lm_head"]
    saved = saved_tensors(out)
    assert "model.layers.0.mlp.up_proj.weight" not in saved
    assert saved["model.layers.0.mlp.up_proj.weight_packed"].shape == (1536, 72)  # 576 codes x 4 bits / 32
    up = model.model.layers[0].mlp.up_proj.weight.float()
    assert float((up == 0).float().mean()) >= 0.5  # the pruned half stayed exactly zero
    scale = up[:, :64].abs().max(dim=1).values / 7.5  # symmetric 4-bit: each group holds at most 16 levels
    assert all(row.unique().numel() <= 16 for row in up[:, :64]) and bool((scale > 0).all())
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    ids = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = model(ids).logits.float(), reloaded(ids).logits.float()
    assert float((want - got).abs().max()) <= 0.05  # bf16 forwards of equal weights (the loader's modules differ)
    state = reloaded.state_dict()  # decompressed by the loader on the first forward
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name  # every weight, as the loader dequantizes it, bit for bit
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    dense_size = sum(p.stat().st_size for p in dense.glob("*.safetensors"))
    assert dense_size * 0.25 < size < dense_size * 0.29  # 4-bit codes + a bf16 scale per 64: (0.5 + 2/64) / 2
    assert (out / "recipe.yaml").exists()


def test_quantize_only_methods_and_their_options(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], caplog: pytest.LogCaptureFixture
) -> None:
    """--method rtn reads no data and equals rtn() per layer; --method gptq moves weights; a recipe reruns it."""
    folder = tiny_checkpoint("llama")
    out = tmp_path / "rtn"
    with caplog.at_level(logging.WARNING, logger="oneshot.api"):
        report = oneshot.prune(str(folder), method="rtn", group_size=32, bits=3, symmetric=False, out=out, quiet=True)
    assert any("stock transformers" in r.getMessage() for r in caplog.records)  # asymmetric: where it loads
    assert report.extra["calibration"] is None and report.extra["quantization"]["method"] == "rtn"
    original, saved = saved_tensors(folder), saved_tensors(out)
    from oneshot.quantized import decompress, weights_args

    spec = QuantSpec(bits=3, group_size=32, symmetric=False)
    name = "model.layers.1.self_attn.o_proj"
    layer = {k.removeprefix(name + "."): v for k, v in saved.items() if k.startswith(name + ".weight_")}
    want = rtn(original[name + ".weight"], spec).weight
    assert torch.equal(decompress(layer, weights_args(spec)), want)
    gptq_out = tmp_path / "gptq"
    small = CalibrationConfig(nsamples=4, seqlen=32)
    oneshot.prune(
        str(folder), method="gptq", group_size=32, act_order=True, calibration=small, out=gptq_out, quiet=True
    )
    recipe = read_recipe(gptq_out / "recipe.yaml")
    assert recipe["method"] == "gptq" and recipe["act_order"] is True and recipe["group_size"] == 32
    assert (
        json.loads((gptq_out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
            "weights"
        ]["actorder"]
        == "weight"
    )
    again = tmp_path / "again"
    oneshot.prune(str(folder), recipe=gptq_out / "recipe.yaml", out=again, quiet=True)
    first, second = saved_tensors(gptq_out), saved_tensors(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "gptq", "sparsity": 0.5}, "quantizes without pruning"),
        ({"method": "gptq", "then": "rtn"}, "already quantizes"),
        ({"method": "wanda", "sparsity": 0.5, "bits": 3}, "--bits does not apply"),
        ({"method": "rtn", "act_order": True}, "--act-order does not apply to --method rtn .it is used by gptq."),
        ({"method": "gptq", "group_size": 0}, "--group-size must be positive, or -1"),
        ({"method": "gptq", "bits": 5}, "--bits must be 2, 3, 4 or 8"),
        ({"method": "structured", "ratio": 0.2, "then": "gptq"}, "--then does not apply"),
        ({"method": "rtn", "refine": "dsnot"}, "act on pruning masks"),
        ({"method": "rtn", "sparsity_map": {"*.q_proj": 0.5}}, "can only leave layers in full precision"),
    ],
)
def test_quantization_options_refused_with_a_fix(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PruneConfig(**options)  # type: ignore[arg-type]


def test_quantized_runs_check_the_model_and_the_loader(
    tmp_path: Path, tiny_model: Callable[[str], nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole groups only (with the group size that fits suggested), nn.Linear only, and the loader present."""
    with pytest.raises(ConfigError, match="--group-size 128 does not divide the input width 576.*--group-size 64"):
        oneshot.prune(_smol_shaped(torch.float32), method="rtn", group_size=128)
    with pytest.raises(ConfigError, match="Conv1D"):
        oneshot.prune(tiny_model("gpt2"), method="rtn", group_size=-1)
    import builtins

    real_import = builtins.__import__

    def no_loader(name: str, *args: object, **kwargs: object) -> object:
        if name == "compressed_tensors":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_loader)
    with pytest.raises(ConfigError, match=r"oneshot\[quant\]"):
        oneshot.prune(tiny_model("llama"), method="rtn", group_size=32)


def test_a_layer_the_loader_would_not_restore_is_not_saved(
    tmp_path: Path, tiny_model: Callable[[str], nn.Module]
) -> None:
    """The writer decompresses every layer with compressed-tensors; a mismatch leaves nothing on disk."""
    from oneshot.writer import save_pruned

    model = tiny_model("llama")
    report = oneshot.prune(model, method="rtn", group_size=32, quiet=True)
    name = "model.layers.0.mlp.up_proj"
    layer = report.quantized[name]
    layer.tensors["weight_scale"][0, 0] *= 2  # the saved grid no longer gives the model's weight
    with pytest.raises(OutputError, match=f"does not restore {name}"):
        save_pruned(model, None, tmp_path / "out", {}, {}, quantized=report.quantized)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [{}, {"refine": "block", "recon_lr": 0.1}])
def test_streaming_quantized_equals_in_memory(
    tmp_path: Path, tiny_checkpoint: Callable[[str], Path], extra: dict[str, object]
) -> None:
    """A streamed SparseGPT + GPTQ run (± the block tuning) writes the same compressed tensors and config as in memory."""
    folder = tiny_checkpoint("llama")
    small = CalibrationConfig(nsamples=4, seqlen=32)
    options = {"method": "sparsegpt", "sparsity": 0.5, "then": "gptq", "group_size": 32, "calibration": small, **extra}
    oneshot.prune(str(folder), out=tmp_path / "mem", stream=False, quiet=True, **options)  # type: ignore[arg-type]
    report = oneshot.prune(str(folder), out=tmp_path / "str", stream=True, quiet=True, **options)  # type: ignore[arg-type]
    assert report.extra["mode"] == "streaming"
    mem, streamed = saved_tensors(tmp_path / "mem"), saved_tensors(tmp_path / "str")
    assert mem.keys() == streamed.keys() and all(torch.equal(mem[k], streamed[k]) for k in mem)
    config = [json.loads((tmp_path / d / "config.json").read_text())["quantization_config"] for d in ("mem", "str")]
    assert config[0] == config[1]


def test_recipe_files_and_the_cli(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    """Stages in order; typed options override the recipe; malformed recipes are refused with the fix."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stages:\n  - {method: wanda, sparsity: 0.5}\n  - {method: rtn, bits: 8, group_size: 32}\n"
        "calibration: {nsamples: 4, seqlen: 32}\n"
    )
    fields = read_recipe(recipe)
    assert fields["method"] == "wanda" and fields["then"] == "rtn" and fields["calibration"].nsamples == 4
    config = PruneConfig(**fields)
    assert PruneConfig(**_through_file(tmp_path, config.to_recipe())) == config
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        main, ["prune", str(tiny_checkpoint("llama")), "--recipe", str(recipe), "--sparsity", "0.25", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "oneshot_config.json").read_text())
    assert (saved["method"], saved["sparsity"], saved["then"], saved["bits"]) == ("wanda", 0.25, "rtn", 8)
    assert saved["calibration"]["nsamples"] == 4
    for text, message in [
        ("stages: []", "one or two stages"),
        ("stages: [{method: wanda, sparsity: 0.5}, {method: sparsegpt}]", "second stage must quantize"),
        ("stages: [{method: wanda, sparsity: 0.5}, {method: gptq, sparsity: 0.2}]", "sparsity is set in two stages"),
        ("stages: [{method: wanda, sparsity: 0.5}]\nsparsty: 0.1", "unknown option 'sparsty'"),
        ("- 1", "must be a mapping"),
    ]:
        recipe.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_recipe(recipe)


def _through_file(tmp_path: Path, recipe: dict[str, object]) -> dict[str, object]:
    import yaml

    path = tmp_path / "round.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return read_recipe(path)


def test_skipped_layers_stay_in_full_precision_and_are_listed(
    tmp_path: Path, tiny_model: Callable[[str], nn.Module]
) -> None:
    """A sparsity map's "skip" leaves a layer unquantized; the saved config's ignore list names it for the loader."""
    model = tiny_model("llama")
    before = model.model.layers[1].self_attn.o_proj.weight.clone()
    report = oneshot.prune(
        model, method="rtn", group_size=32, sparsity_map={"*.1.self_attn.o_proj": "skip"}, out=tmp_path / "o"
    )
    assert "model.layers.1.self_attn.o_proj" not in report.quantized and len(report.quantized) == 20
    assert torch.equal(model.model.layers[1].self_attn.o_proj.weight, before)
    config = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["lm_head", "model.layers.1.self_attn.o_proj"]
    assert "model.layers.1.self_attn.o_proj.weight" in saved_tensors(tmp_path / "o")


@pytest.mark.parametrize("options", [{"method": "gptq"}, {"method": "sparsegpt", "sparsity": 0.5, "then": "gptq"}])
def test_stacked_quantization_equals_layer_by_layer(
    tiny_model: Callable[[str], nn.Module], options: dict[str, object], tmp_path: Path
) -> None:
    """q/k/v and gate/up quantized as one stacked matrix (bf16 model, saved) give each layer's own GPTQ result."""
    calib = torch.randint(4, 90, (4, 32), generator=torch.Generator().manual_seed(5))
    runs = []
    for stack in (True, False):
        model = tiny_model("llama").to(torch.bfloat16)
        out = tmp_path / f"stack-{stack}"  # the writer checks every layer against the loader (bf16 scales)
        report = oneshot.prune(model, calibration=calib, group_size=32, stack=stack, out=out, quiet=True, **options)  # type: ignore[arg-type]
        runs.append((model.state_dict(), report.quantized))
    (stacked, q_stacked), (single, q_single) = runs
    for name, tensor in single.items():
        torch.testing.assert_close(stacked[name], tensor, atol=1e-5, rtol=1e-5)
    for name, layer in q_single.items():
        other = q_stacked[name]
        assert other.tensors.keys() == layer.tensors.keys()
        same = float((other.tensors["weight_packed"] == layer.tensors["weight_packed"]).float().mean())
        assert same > 0.99 and torch.allclose(other.tensors["weight_scale"], layer.tensors["weight_scale"])


def test_a_quantized_checkpoint_is_not_pruned_again(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    from oneshot.errors import ModelError

    out = tmp_path / "w4"
    oneshot.prune(str(tiny_checkpoint("llama")), method="rtn", group_size=32, out=out, quiet=True)
    with pytest.raises(ModelError, match="already quantized \\(compressed-tensors\\); prune or quantize the original"):
        oneshot.prune(str(out), method="magnitude", sparsity=0.5, out=tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_config_matches_the_formats_own_schemes() -> None:
    """Our weights entry validates as compressed-tensors' QuantizationArgs and equals its W4A16 preset."""
    from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme

    from oneshot.quantized import quantization_config, weights_args

    fields = ("num_bits", "type", "symmetric", "group_size", "strategy", "dynamic", "actorder")
    ours = QuantizationArgs(**weights_args(QuantSpec()))
    preset = preset_name_to_scheme("W4A16", ["Linear"]).weights
    assert preset is not None and all(getattr(ours, f) == getattr(preset, f) for f in fields)
    asym = QuantizationArgs(**weights_args(QuantSpec(bits=8, group_size=None, symmetric=False, act_order=True)))
    assert (asym.num_bits, asym.strategy, asym.group_size, asym.symmetric) == (8, "channel", None, False)
    assert asym.actorder == "weight" and asym.dynamic is False
    mse = QuantizationArgs(**weights_args(QuantSpec(observer="mse")))
    assert mse.observer == "mse" and ours.observer == "minmax"  # the format's own observer names
    config = quantization_config(QuantSpec(), ["model.b", "lm_head"])
    assert config["ignore"] == ["lm_head", "model.b"] and config["quantization_status"] == "compressed"


def test_the_default_group_size_is_the_largest_of_128_64_32_that_fits(
    tmp_path: Path, tiny_model: Callable[[str], nn.Module]
) -> None:
    """SmolLM2's width 576 takes g64 by default (no error), said in the report, the summary and the saved config."""
    from oneshot.quantized import auto_group_size

    assert auto_group_size({"a": 256, "b": 384}) == 128
    assert auto_group_size({"a": 576, "b": 1536}) == 64
    assert auto_group_size({"a": 64, "b": 96}) == 32
    with pytest.raises(ConfigError, match="no group size of 128, 64, 32 divides the input width 80 of b"):
        auto_group_size({"a": 64, "b": 80})
    with pytest.raises(ConfigError, match="input width 80 of b"):  # the layer 32 misfits (96 takes g32)
        auto_group_size({"a": 96, "b": 80})
    out = tmp_path / "o"
    report = oneshot.prune(_smol_shaped(torch.float32), method="rtn", out=out, quiet=True)
    assert report.config.group_size == 64 and report.extra["quantization"]["group_size"] == 64
    assert "g64 (group size chosen" in report.summary() and "group_size_chosen" in report.extra
    assert json.loads((out / "oneshot_config.json").read_text())["group_size"] == 64
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["config_groups"]["group_0"]["weights"]["group_size"] == 64
    explicit = oneshot.prune(tiny_model("llama"), method="rtn", group_size=32, quiet=True)
    assert "group_size_chosen" not in explicit.extra and "chosen" not in explicit.summary()


def test_group_size_hint_names_the_largest_that_fits() -> None:
    from oneshot.quantized import check_groups

    for widths, hint in [
        ({"a": 256, "b": 384}, None),  # 128 fits both
        ({"a": 576, "b": 1536}, "--group-size 64"),
        ({"a": 64, "b": 96}, "--group-size 32"),
        ({"a": 48, "b": 80}, "--group-size 16"),
        ({"a": 24, "b": 48}, "--group-size -1"),
    ]:
        if hint is None:
            check_groups(widths, QuantSpec())
            continue
        with pytest.raises(ConfigError, match=f"use {hint}"):
            check_groups(widths, QuantSpec())
    check_groups({"a": 24}, QuantSpec(group_size=None))  # one scale per row always fits
    with pytest.raises(
        ConfigError, match="--group-size 256 does not divide the input width 384 of a.*use --group-size 128"
    ):
        check_groups({"a": 384, "b": 128}, QuantSpec(group_size=256))
