"""The NER benchmark's data handling and entity-level F1, on hand-made cases."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from torch import nn

from benchmarks.ner import Sentence, entities, f1_score, iob1_to_iob2, read_conll


def test_iob1_to_iob2() -> None:
    assert iob1_to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG", "I-MISC"]) == [
        "B-PER",
        "I-PER",
        "O",
        "B-LOC",
        "B-LOC",
        "B-ORG",
        "B-MISC",
    ]


def test_entities_conlleval_rules() -> None:
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert entities(["I-PER", "I-PER"]) == {("PER", 0, 2)}  # I- after O starts a chunk
    assert entities(["B-PER", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 2)}  # type change splits
    assert entities(["B-PER", "B-PER"]) == {("PER", 0, 1), ("PER", 1, 2)}
    assert entities(["O", "O"]) == set()


def test_f1_hand_computed() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-MISC"]]
    # gold 3 entities, pred 3, correct 2 -> P = R = F1 = 2/3
    scores = f1_score(gold, pred)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    partial = f1_score([["B-PER", "I-PER"]], [["B-PER", "O"]])  # boundary error counts as wrong
    assert partial["f1"] == 0.0


def test_read_conll(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text(
        "-DOCSTART- -X- -X- O\n\nEU NNP I-NP I-ORG\nrejects VBZ I-VP O\nGerman JJ I-NP I-MISC\n\n"
        "Peter NNP I-NP I-PER\nBlackburn NNP I-NP I-PER\n\n\n"
    )
    sents = read_conll(path)
    assert [s.words for s in sents] == [["EU", "rejects", "German"], ["Peter", "Blackburn"]]
    assert sents[1].tags == ["B-PER", "I-PER"]


def test_shared_conll_counts() -> None:
    from conftest import SHARED

    test = SHARED / "conll2003" / "test.txt"
    if not test.exists():
        pytest.skip("shared CoNLL-2003 not present")
    sents = read_conll(test)
    assert len(sents) == 3453
    counts: dict[str, int] = {}
    for s in sents:
        for kind, _, _ in entities(s.tags):
            counts[kind] = counts.get(kind, 0) + 1
    assert counts == {"PER": 1617, "LOC": 1668, "ORG": 1661, "MISC": 702}  # published statistics


def test_prune_options_are_typed_keyword_arguments() -> None:
    from benchmarks.common import parse_prune_options

    assert parse_prune_options(["damp=0.001", "block-size=64", "score=variance"]) == {
        "damp": 0.001,
        "block_size": 64,
        "score": "variance",
    }
    assert parse_prune_options(['sparsity_map={"*": "skip", "a.*": 0.7}']) == {
        "sparsity_map": {"*": "skip", "a.*": 0.7}
    }
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_prune_options(["damp"])
    from benchmarks.common import parse_method

    assert parse_method("wanda") == ("wanda", {})
    assert parse_method("sparsegpt/refine=block/recon_lr=0.003/owl=true") == (
        "sparsegpt",
        {"refine": "block", "recon_lr": 0.003, "owl": True},
    )


def test_wikitext_halves_partition_the_test_set() -> None:
    from benchmarks.common import eval_text, shared_file

    try:
        shared_file("wikitext-2-raw", "wiki.test.raw")
    except SystemExit:
        pytest.skip("shared WikiText-2 not present")
    full, _ = eval_text("wikitext2")
    head, _ = eval_text("wikitext2:head")
    tail, _ = eval_text("wikitext2:tail")
    assert head + "\n\n" + tail == full
    assert abs(len(head) - len(tail)) < 0.01 * len(full)
    with pytest.raises(SystemExit, match="wikitext2:head"):
        eval_text("wikitext2:middle")


def test_labels_come_from_the_training_data(tmp_path: Path, tiny_model: Callable[[str], nn.Module]) -> None:
    """A CoNLL folder with other entity types (WNUT-style) fine-tunes and predicts in its own label set."""
    from conftest import char_tokenizer

    from benchmarks.ner import FinetuneConfig, evaluate, finetune, label_set, load_split

    rows = "Ann B-person\nwent O\nto O\nNew B-geo-loc\nYork I-geo-loc\n\nBob B-person\nsaw O\nit O\n\n"
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text(rows * 4)
    train = load_split(str(data), "train")
    assert label_set(train) == ["O", "B-geo-loc", "I-geo-loc", "B-person", "I-person"]
    conll = [Sentence(["x"] * 4, ["B-MISC", "B-PER", "I-PER", "B-LOC"])]
    assert label_set(conll) == ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]  # CoNLL order kept
    model_dir = tmp_path / "bert"
    tiny_model("bert").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)  # type: ignore[attr-defined]
    model, tok, info = finetune(str(model_dir), train, FinetuneConfig(epochs=1, batch_size=4), cache=tmp_path / "c")
    assert info["steps"] == 2 and model.config.id2label[3] == "B-person"
    scores = evaluate(model, tok, train)  # predictions are read through the model's own labels
    assert 0.0 <= scores["f1"] <= 1.0
