"""CoNLL-2003 NER for the benchmark: read, convert IOB1 -> IOB2, fine-tune a token classifier, score F1.

Entity-level F1 follows seqeval's default (conlleval) definition: an entity is a maximal chunk of
one type, started by ``B-X`` or by ``I-X`` after a tag of another type or ``O``; precision and
recall are micro-averaged over exact (type, start, end) matches. Labels go on the first sub-word of
each word; predictions are read there too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: CoNLL-2003's entity types, in the order its label ids have always had here (other types follow, sorted).
CONLL_TYPES = ("PER", "ORG", "LOC", "MISC")
LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


@dataclass(frozen=True)
class Sentence:
    """Words and their IOB2 tags."""

    words: list[str]
    tags: list[str]


def label_set(sentences: list[Sentence]) -> list[str]:
    """The IOB2 labels of the entity types in ``sentences``: ``O``, then ``B-T``, ``I-T`` per type.

    CoNLL-2003's types keep their usual order (so its label ids are :data:`LABELS`); any other
    types (``person``, ``geo-loc``...) follow, sorted.
    """
    types = {tag[2:] for sent in sentences for tag in sent.tags if tag != "O"}
    bad = sorted({tag for sent in sentences for tag in sent.tags if tag != "O" and tag[:2] not in ("B-", "I-")})
    if bad:
        raise SystemExit(f"tags {bad[:5]} are not IOB (O, B-TYPE, I-TYPE); convert the data first")
    ordered = [t for t in CONLL_TYPES if t in types] + sorted(types - set(CONLL_TYPES))
    return ["O"] + [f"{prefix}-{t}" for t in ordered for prefix in ("B", "I")]


def iob1_to_iob2(tags: list[str]) -> list[str]:
    """Relabel ``I-X`` as ``B-X`` where it starts a chunk (after ``O``, another type, or at the start)."""
    out = []
    prev = "O"
    for tag in tags:
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return out


def read_conll(path: str | os.PathLike[str]) -> list[Sentence]:
    """Sentences of a CoNLL-2003 file (4 columns, IOB1 NER tags in the last), tags converted to IOB2."""
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("-DOCSTART-"):
            continue
        if not line.strip():
            if words:
                sentences.append(Sentence(words, iob1_to_iob2(tags)))
                words, tags = [], []
            continue
        cols = line.split()
        words.append(cols[0])
        tags.append(cols[-1])
    if words:
        sentences.append(Sentence(words, iob1_to_iob2(tags)))
    return sentences


def load_split(source: str, split: str) -> list[Sentence]:
    """``split`` (train/dev/test) from a folder of CoNLL files, or from a Hugging Face dataset name."""
    folder = Path(source)
    if folder.is_dir():
        names = {
            "train": ["train.txt", "eng.train"],
            "dev": ["dev.txt", "valid.txt", "eng.testa"],
            "test": ["test.txt", "eng.testb"],
        }[split]
        for name in names:
            if (folder / name).exists():
                return read_conll(folder / name)
        raise SystemExit(f"no {split} file ({' or '.join(names)}) in {folder}")
    import datasets  # a hub dataset in the HF conll2003 layout (IOB2 integer tags)

    hf_split = {"dev": "validation"}.get(split, split)
    ds = datasets.load_dataset(source, split=hf_split)
    names = ds.features["ner_tags"].feature.names
    return [Sentence(list(r["tokens"]), [names[t] for t in r["ner_tags"]]) for r in ds]


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end-exclusive) chunks in the conlleval / seqeval-default sense."""
    chunks = set()
    start, kind = -1, ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, typ = tag.partition("-")
        begins = prefix == "B" or (prefix == "I" and typ != kind)
        if kind and (prefix == "O" or begins):
            chunks.add((kind, start, i))
            kind = ""
        if prefix in ("B", "I") and begins:
            start, kind = i, typ
    return chunks


def f1_score(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Micro precision / recall / F1 over entities of all sentences."""
    tp = n_pred = n_gold = 0
    for g, p in zip(gold, pred, strict=True):
        eg = {(k, s, e) for k, s, e in entities(g)}
        ep = {(k, s, e) for k, s, e in entities(p)}
        tp += len(eg & ep)
        n_pred += len(ep)
        n_gold += len(eg)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def encode(
    tokenizer: Any, sentences: list[Sentence], max_length: int = 128, label_id: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """Tokenise each sentence; label the first sub-word of every word by ``label_id``, -100 elsewhere.

    Without ``label_id`` (prediction) every label is -100; a tag missing from it is a clear error.
    """
    out = []
    for sent in sentences:
        enc = tokenizer(sent.words, is_split_into_words=True, truncation=True, max_length=max_length)
        labels, first = [], []
        prev = None
        for pos, wid in enumerate(enc.word_ids()):
            if wid is not None and wid != prev:
                tag = sent.tags[wid]
                if label_id is not None and tag not in label_id:
                    raise SystemExit(f"tag {tag!r} is not among the model's labels {sorted(label_id)}")
                labels.append(-100 if label_id is None else label_id[tag])
                first.append(pos)
            else:
                labels.append(-100)
            prev = wid
        out.append({"input_ids": enc["input_ids"], "labels": labels, "first": first, "n_words": len(sent.words)})
    return out


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def _batches(items: list[dict[str, Any]], size: int, shuffle: bool, seed: int) -> list[list[int]]:
    """Index batches of similar length (less padding), optionally shuffled."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    groups = [order[i : i + size] for i in range(0, len(order), size)]
    if shuffle:
        random.Random(seed).shuffle(groups)
    return groups


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning hyper-parameters (part of the cache key)."""

    train_sentences: int | None = None  # None: all
    epochs: float = 3.0
    lr: float = 1e-4
    batch_size: int = 32
    warmup: float = 0.1
    seed: int = 0
    max_length: int = 128


def finetune(
    model_path: str,
    train: list[Sentence],
    config: FinetuneConfig,
    cache: Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Fine-tune a token classifier from ``model_path`` on ``device`` (cached under ``cache`` by config and data).

    The model is returned on ``device``.
    """
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    data = train if config.train_sentences is None else train[: config.train_sentences]
    labels = label_set(train)
    key: list[Any] = [str(model_path), asdict(config), [s.words for s in data[:50]], len(data)]
    if labels != LABELS:  # CoNLL-2003's cache keys stay as they were
        key.append(labels)
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    folder = (cache or Path.home() / ".cache" / "oneshot" / "conll") / digest
    if (folder / "finetune.json").exists():
        info = json.loads((folder / "finetune.json").read_text())
        model = AutoModelForTokenClassification.from_pretrained(folder, dtype=torch.float32).eval().to(device)
        return model, AutoTokenizer.from_pretrained(folder), {**info, "cached": str(folder)}

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForTokenClassification.from_pretrained(
        model_path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        dtype=torch.float32,
    ).to(device)
    items = encode(tokenizer, data, config.max_length, {label: i for i, label in enumerate(labels)})
    steps_per_epoch = math.ceil(len(items) / config.batch_size)
    total = max(1, int(steps_per_epoch * config.epochs))
    optim = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    warm = max(1, int(total * config.warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )
    model.train()
    start, step, epoch = time.perf_counter(), 0, 0
    while step < total:
        for idx in _batches(items, config.batch_size, shuffle=True, seed=config.seed + epoch):
            if step >= total:
                break
            ids = _pad([items[i]["input_ids"] for i in idx], tokenizer.pad_token_id).to(device)
            labels = _pad([items[i]["labels"] for i in idx], -100).to(device)
            loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            optim.zero_grad()
            step += 1
            if step % 50 == 0:
                log.info("step %d/%d loss %.4f (%.0fs)", step, total, loss.item(), time.perf_counter() - start)
        epoch += 1
    model.eval()
    info = {"config": asdict(config), "seconds": time.perf_counter() - start, "steps": total, "sentences": len(data)}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "finetune.json").write_text(json.dumps(info, indent=2))
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model, tokenizer, info


def predict(model: nn.Module, tokenizer: Any, sentences: list[Sentence], batch_size: int = 64) -> list[list[str]]:
    """Predicted IOB2 tags per word (read at each word's first sub-word; truncated words get O).

    Runs on the device the model's parameters are on.
    """
    items = encode(tokenizer, sentences)
    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}  # type: ignore[union-attr]
    preds: list[list[str]] = [[] for _ in sentences]
    device = next(model.parameters()).device
    with torch.no_grad():
        for idx in _batches(items, batch_size, shuffle=False, seed=0):
            ids = _pad([items[i]["input_ids"] for i in idx], tokenizer.pad_token_id).to(device)
            logits = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits
            best = logits.argmax(-1).cpu()
            for row, i in enumerate(idx):
                tags = [id2label[int(best[row, p])] for p in items[i]["first"]]
                preds[i] = tags + ["O"] * (items[i]["n_words"] - len(tags))
    return preds


def evaluate(model: nn.Module, tokenizer: Any, sentences: list[Sentence]) -> dict[str, float]:
    """Entity-level precision / recall / F1 of ``model`` on ``sentences``."""
    return f1_score([s.tags for s in sentences], predict(model, tokenizer, sentences))


def calibration_set(tokenizer: Any, sentences: list[Sentence], max_length: int = 128) -> Any:
    """A padded :class:`oneshot.CalibrationSet` of training sentences (padding excluded from statistics)."""
    from oneshot.calibration.data import CalibrationSet

    return CalibrationSet.from_texts(tokenizer, [s.words for s in sentences], max_length=max_length)
