"""Text corpora as token-id Parquet shards: what a causal language model trains on.

``kdray data import SRC DEST --as text`` reads a folder of text files (every file whose name ends in one
of ``suffixes``, minus the ``exclude`` patterns; one file is one document) or a JSONL file (one document
per line, its ``text_field``), tokenizes it and writes array shards (``kdray.data.arrays``: columns
``id``, ``array``, ``label``) that the ``parquet`` dataset kind reads in memory or streams, with a
``dataset.json`` that says what the tokens are (its ``text`` block).

* **Tokenizer** (``tokenizer``): ``bytes`` (ids 0..255 are the UTF-8 bytes, 256 ends a document), ``bpe``
  (a byte-level BPE of ``vocab_size`` trained on the training documents with the ``tokenizers`` library)
  or the URI of a Hugging Face ``tokenizer.json`` (a folder or bucket). The tokenizer is written beside
  the shards as ``tokenizer.json`` and its sha256 recorded: a model's samples are decoded with it.
* **Held out by document**: the documents (sorted by name, then a seeded permutation) are split into
  test, validation and training documents, so no test or validation text is ever a training row.
* **Packed fixed-length rows**: the documents of a part are joined, each followed by the end-of-document
  token, and cut into rows of ``seq_len`` ids (int32); the last row of a part is padded with ``-1``
  (``PAD``), which models read as id 0 and losses leave out. The validation documents' rows come after
  the training documents' rows in the ``train`` split (``held_out_from``): :func:`kdray.data.datasets.select`
  makes them the validation split, whatever ``val_fraction`` says.

A row's label is 0 (a language model has no class per row); ``num_classes`` is the vocabulary size, the
width of a model's output.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdray.core.errors import DataError
from kdray.core.meter import Meter, log_meter
from kdray.core.storage import Storage
from kdray.data import arrays

PAD = -1  # a padded position: not a token (the model reads id 0 there), never a target
BYTES_VOCAB = 257  # 256 byte values and the end-of-document id
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]", "<|end_of_text|>")
TOKENIZER_FILE = "tokenizer.json"

Log = Callable[[str], None]


def is_text(meta: dict[str, Any]) -> bool:
    """Whether a dataset.json describes token rows of a text corpus (``kdray data import --as text``)."""
    return arrays.is_arrays(meta) and isinstance(meta.get("text"), dict)


def is_token_data(spec: Any) -> bool:
    """Whether a stage's data spec reads a text corpus of token rows (a ``parquet`` dataset of ``--as text``)."""
    if spec.name != "parquet" or not spec.path:
        return False
    store = Storage(spec.path)
    if not store.exists("dataset.json"):
        return False  # the parquet kind says what is missing when the stage reads its data
    try:
        return is_text(json.loads(store.read_bytes("dataset.json")))
    except ValueError:
        return False


# --------------------------------------------------------------------------- tokenizers


@dataclass
class Tokenizer:
    """Text <-> ids: the ``tokenizers`` library's ``Tokenizer``, or UTF-8 bytes when ``hf`` is None."""

    hf: Any  # tokenizers.Tokenizer | None
    eos_id: int | None
    vocab_size: int
    kind: str  # bytes | bpe | file

    def encode(self, text: str) -> list[int]:
        if self.hf is None:
            return list(text.encode("utf-8"))
        return list(self.hf.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids if int(i) >= 0 and int(i) != self.eos_id]
        if self.hf is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return str(self.hf.decode(ids))

    def to_json(self) -> bytes:
        if self.hf is None:
            return json.dumps({"kdray": "bytes", "vocab_size": BYTES_VOCAB, "eos_id": 256}).encode()
        return str(self.hf.to_str()).encode()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json()).hexdigest()


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise DataError(
            "a bpe or tokenizer.json tokenizer needs the tokenizers package, which is not installed",
            hint="Install kdray's Hugging Face extra (pip install 'kdray[hf]'), or use --tokenizer bytes.",
        ) from None
    return tokenizers


def _wrap(hf: Any, kind: str) -> Tokenizer:
    vocab = hf.get_vocab(with_added_tokens=True)
    eos = next((vocab[n] for n in EOS_NAMES if n in vocab), None)
    return Tokenizer(hf, eos, int(hf.get_vocab_size(with_added_tokens=True)), kind)


def train_bpe(documents: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (as GPT-2's) of ``vocab_size`` ids trained on ``documents``, ``<|endoftext|>`` included."""
    tk = _tokenizers()
    hf = tk.Tokenizer(tk.models.BPE())
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(documents, trainer)
    return _wrap(hf, "bpe")


def from_json(data: bytes, where: str) -> Tokenizer:
    """A tokenizer from the bytes of a ``tokenizer.json`` (or kdray's own bytes description)."""
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise DataError(f"{where} is not JSON ({e})", hint="Give a Hugging Face tokenizer.json.") from None
    if isinstance(doc, dict) and doc.get("kdray") == "bytes":
        return Tokenizer(None, 256, BYTES_VOCAB, "bytes")
    tk = _tokenizers()
    try:
        hf = tk.Tokenizer.from_str(data.decode())
    except Exception as e:  # tokenizers raises plain Exception for a malformed file
        raise DataError(
            f"{where} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:160]})",
            hint="Point --tokenizer at the tokenizer.json of a model folder (or its folder), or use bpe or bytes.",
        ) from None
    return _wrap(hf, "file")


def load_tokenizer(uri: str) -> Tokenizer:
    """``tokenizer.json`` at ``uri``: the file, or a folder or bucket prefix that holds one."""
    store = Storage(uri)
    if store.exists(TOKENIZER_FILE):
        return from_json(store.read_bytes(TOKENIZER_FILE), store.uri(TOKENIZER_FILE))
    parent, _, name = uri.rstrip("/").rpartition("/")
    if parent and name.endswith(".json") and Storage(parent).exists(name):
        return from_json(Storage(parent).read_bytes(name), uri)
    raise DataError(
        f"--tokenizer {uri}: no tokenizer.json there",
        hint="Give the path of a tokenizer.json (or of the folder holding one), bpe (trained on the corpus) or bytes.",
    )


def dataset_tokenizer(store: Storage, meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer a text dataset was written with (its ``tokenizer.json``, checked against its sha256)."""
    data = store.read_bytes(TOKENIZER_FILE)
    if hashlib.sha256(data).hexdigest() != meta["text"]["tokenizer"]["sha256"]:
        raise DataError(
            f"{store.uri(TOKENIZER_FILE)} does not match the sha256 in dataset.json",
            hint="Re-import the corpus (kdray data import SRC DEST --as text).",
        )
    return from_json(data, store.uri(TOKENIZER_FILE))


# --------------------------------------------------------------------------- documents


def read_documents(
    src: str, suffixes: tuple[str, ...], exclude: tuple[str, ...], text_field: str
) -> list[tuple[str, str]]:
    """(name, text) of every document of ``src``: a folder of text files or a ``.jsonl`` file, sorted by name."""
    local = Path(src.removeprefix("file://"))
    if src.endswith(".jsonl"):
        parent, name = (
            (str(local.parent), local.name) if "://" not in src or src.startswith("file://") else src.rsplit("/", 1)
        )
        lines = Storage(parent).read_bytes(name).decode().splitlines()
        docs = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{src} line {i + 1} is not JSON ({e})", hint="One JSON object a line.") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise DataError(
                    f"{src} line {i + 1} has no string field {text_field!r}",
                    hint="Name the field that holds each document's text with --text-field.",
                )
            docs.append((f"line-{i + 1:08d}", row[text_field]))
        return docs
    store = Storage(src)
    names = sorted(
        p
        for p in store.list("", recursive=True)
        if p.endswith(suffixes) and not any(fnmatch.fnmatch(p, pat) for pat in exclude)
    )
    docs = []
    for name in names:
        raw = store.read_bytes(name)
        try:
            docs.append((name, raw.decode("utf-8")))
        except UnicodeDecodeError:
            docs.append((name, raw.decode("latin-1")))  # a few stdlib modules are Latin-1: kept, not dropped
    return docs


def split_documents(names: list[str], test_fraction: float, val_fraction: float, seed: int) -> dict[str, list[int]]:
    """Indices of the training, validation and test documents: a seeded permutation of the sorted names,
    at least one document for each part that asks for any (given three or more documents)."""
    n = len(names)
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 and n >= 3 else 0
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 and n >= 3 else 0
    return {
        "test": sorted(order[:n_test]),
        "val": sorted(order[n_test : n_test + n_val]),
        "train": sorted(order[n_test + n_val :]),
    }


def pack(token_lists: list[list[int]], eos: int | None, seq_len: int) -> np.ndarray:
    """The documents' ids joined (each followed by ``eos``) and cut into rows of ``seq_len``; the last padded."""
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        if eos is not None:
            flat.append(eos)
    rows = max(1, -(-len(flat) // seq_len))
    out = np.full(rows * seq_len, PAD, dtype=np.int32)
    out[: len(flat)] = flat
    return out.reshape(rows, seq_len)


# --------------------------------------------------------------------------- import


def _write_split(store: Storage, split: str, x: np.ndarray, shard_rows: int) -> list[str]:
    shards: list[str] = []
    for first in range(0, len(x), shard_rows):
        chunk = np.ascontiguousarray(x[first : first + shard_rows], dtype="<i4")
        table = pa.table(
            {
                "id": pa.array(np.arange(first, first + len(chunk), dtype=np.int64)),
                arrays.COLUMN: pa.array([row.tobytes() for row in chunk], pa.binary()),
                "label": pa.array(np.zeros(len(chunk), np.int64), pa.int64()),
            }
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        rel = f"{split}/part-{len(shards):05d}.parquet"
        store.write_bytes(rel, buf.getvalue())
        shards.append(rel)
    return shards


def import_text(
    src: str,
    dest: str,
    *,
    tokenizer: str = "bpe",
    vocab_size: int = 1024,
    seq_len: int = 128,
    suffixes: tuple[str, ...] = (".py", ".txt", ".md", ".rst"),
    exclude: tuple[str, ...] = (),
    text_field: str = "text",
    test_fraction: float = 0.1,
    val_fraction: float = 0.1,
    shard_rows: int = 10_000,
    seed: int = 0,
    log: Log = print,
    meter: Meter | None = None,
) -> dict[str, Any]:
    """Tokenize the documents of ``src`` into packed rows under ``dest`` (module docstring); returns dataset.json."""
    if seq_len < 2:
        raise DataError(f"--seq-len {seq_len}: a row needs at least 2 tokens (an input and its next token)")
    out = Storage(dest)
    if out.exists("dataset.json"):
        raise DataError(f"{out.uri('dataset.json')} already exists", hint="Import into a new folder or prefix.")
    docs = read_documents(src, tuple(suffixes), tuple(exclude), text_field)
    if len(docs) < 3:
        raise DataError(
            f"{src}: found {len(docs)} document(s) ending in {', '.join(suffixes)}; a held-out split by document "
            "needs at least 3",
            hint="Point SRC at a folder of text files (or a .jsonl file), or change --suffix/--exclude.",
        )
    parts = split_documents([n for n, _ in docs], test_fraction, val_fraction, seed)
    if tokenizer == "bytes":
        tok = Tokenizer(None, 256, BYTES_VOCAB, "bytes")
    elif tokenizer == "bpe":
        tok = train_bpe([docs[i][1] for i in parts["train"]], vocab_size)  # the training documents only
    else:
        tok = load_tokenizer(tokenizer)
    rows: dict[str, np.ndarray] = {}
    tokens: dict[str, int] = {}
    total = len(docs)
    with contextlib.closing((meter or log_meter(log))("text import", total, "documents")) as task:
        done = 0
        for part in ("train", "val", "test"):
            ids = []
            for i in parts[part]:
                ids.append(tok.encode(docs[i][1]))
                done += 1
                task.update(done, f"{part} documents")
            too_big = [max(t) for t in ids if t and max(t) >= tok.vocab_size]
            if too_big:
                raise DataError(
                    f"{src}: the tokenizer produced id {too_big[0]} beyond its vocabulary of {tok.vocab_size}"
                )
            tokens[part] = sum(len(t) for t in ids)
            rows[part] = pack(ids, tok.eos_id, seq_len) if ids else np.zeros((0, seq_len), np.int32)
    train = np.concatenate([rows["train"], rows["val"]])
    tok_bytes = tok.to_json()
    out.write_bytes(TOKENIZER_FILE, tok_bytes)
    digest = hashlib.sha256(hashlib.sha256(tok_bytes).digest())
    meta: dict[str, Any] = {
        "format": arrays.FORMAT,
        "version": 1,
        "classes": [],
        "num_classes": tok.vocab_size,
        "splits": {},
        "shape": [seq_len],
        "dtype": "int32",
        "value_range": [PAD, tok.vocab_size - 1],
    }
    for split, x in (("train", train), ("test", rows["test"])):
        shards = _write_split(out, split, x, shard_rows)
        digest.update(x.astype("<i4").tobytes())
        meta["splits"][split] = {"rows": len(x), "counts": [len(x)], "shards": shards}
    meta["splits"]["train"]["held_out_from"] = len(rows["train"])  # rows from here on: validation documents
    meta["text"] = {
        "tokenizer": {"kind": tok.kind, "sha256": tok.sha256, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
        "seq_len": seq_len,
        "pad_id": PAD,
        "documents": {p: [docs[i][0] for i in parts[p]] for p in ("train", "val", "test")},
        "tokens": tokens,
        "rows": {p: len(rows[p]) for p in rows},
        "bytes": {p: sum(len(docs[i][1].encode()) for i in parts[p]) for p in parts},
    }
    meta.update(fingerprint=digest.hexdigest()[:16], source=f"text in {src}")
    for p in ("train", "val", "test"):
        log(
            f"{p}: {len(parts[p]):,} documents, {tokens[p]:,} tokens ({meta['text']['bytes'][p] / max(tokens[p], 1):.2f} "
            f"bytes/token), {len(rows[p]):,} rows of {seq_len}"
        )
    out.write_bytes("dataset.json", json.dumps(meta, indent=2).encode())  # last: the commit point
    return meta
