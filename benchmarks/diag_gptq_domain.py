"""Per-layer output error of RTN vs GPTQ (4-bit g64) on the calibration domain and off it (issue #11).

Calibrates three SmolLM2-135M layers on 4 x 512 tokens of Austen's *Emma* and measures the
relative error ‖(W−Q)X‖²/‖WX‖² on those tokens and on 4 x 512 WikiText-2 test tokens.

    .venv/bin/python -m benchmarks.diag_gptq_domain
"""

from __future__ import annotations

import torch
from torch import nn

import oneshot
from benchmarks.common import eval_text, shared_file, smollm2_gguf
from oneshot.methods.gptq import gptq, rtn
from oneshot.methods.quantspec import QuantSpec

LAYERS = ((0, "self_attn.q_proj"), (10, "mlp.down_proj"), (20, "self_attn.o_proj"))


def _inputs(model: nn.Module, tokenizer: object, text: str, layer: nn.Module) -> torch.Tensor:
    """The layer's inputs ``[tokens, in]`` on the first 4 x 512 tokens of ``text``."""
    ids = tokenizer(text[:200000], return_tensors="pt").input_ids[:, :2048].reshape(4, 512)  # type: ignore[operator]
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return torch.cat(seen)


def main() -> None:
    model, tokenizer = oneshot.load_model(str(smollm2_gguf()), dtype="float32")
    emma = shared_file("austen", "emma.txt").read_text(encoding="utf-8")
    wiki = eval_text("wikitext2")[0]
    print("| layer | method | error on Emma (calibration) | error on WikiText |\n|---|---|---|---|")
    for index, name in LAYERS:
        layer = model.model.layers[index].get_submodule(name)
        calib, x2 = _inputs(model, tokenizer, emma, layer), _inputs(model, tokenizer, wiki, layer)
        hessian = calib.T @ calib / len(calib)
        weight = layer.weight.detach().float()
        for label, spec in (("rtn", QuantSpec(group_size=64)), ("gptq", QuantSpec(group_size=64)),
                            ("gptq act-order", QuantSpec(group_size=64, act_order=True))):  # fmt: skip
            q = rtn(weight, spec).weight if label == "rtn" else gptq(weight, hessian, spec).weight
            errors = [float(((weight - q) @ x.T).square().sum() / (weight @ x.T).square().sum()) for x in (calib, x2)]
            print(f"| {index} {name} | {label} | {errors[0]:.5f} | {errors[1]:.5f} |")


if __name__ == "__main__":
    main()
