"""The teacher's outputs, computed once and memory-mapped: what a `teacher: {mode: cached}` stage reads.

A live teacher runs a forward pass in every step, over records the student sees many times (the
embedded default's mimic stages see each record 8 and 4 times). The cache runs it once per record
and keeps, at every position a loss term reads, the teacher's top-k tokens and one tail bucket
(:class:`model.losses.TopK`), so the KL stays a divergence. One folder:

    header.json            what made it (teacher and tokenizer hashes, data files' hashes), k, counts, bytes
    records.json           the cached record ids, in row order
    offsets.npy            int64 [records, 2]: each record's first response row and its row count
    response_ids.npy       uint16 (uint32 past 65,536 tokens) [rows, k]: top-k ids at response positions, likeliest first
    response_logprobs.npy  float16 [rows, k]: their log-probabilities at temperature 1
    response_tail.npy      float16 [rows]: log of the mass outside the top k
    visual_{ids,logprobs,tail}.npy   the same at every image-token position ([records * Nv, ...]), for kl_visual
    relation.npy           float16 [records, Nv, Nv]: RDist's teacher R = y_v y_v^T over its Frobenius norm

Every array is read memory-mapped, so a cache of 665k records never has to fit in RAM. At ``k``
cached tokens a position costs ``k * (id bytes + 2) + 2`` bytes: 130 B at k = 32 with 16-bit ids.
RDist's matrix is ``Nv^2 * 2`` bytes a record: 162 B at the embedded 9 image tokens, 648 KiB at
LLaVA-1.5's 576 (430 GB for 665k records), so at that size RDist is for live stages.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made: a stage reads a header without it
    import torch

    from model.losses import TopK

FORMAT = 1
HEADER = "header.json"


def response_rows(labels: list[int]) -> int:
    """How many positions of one encoded record predict a response token (the rows KL reads)."""
    return sum(1 for label in labels[1:] if label != -100)


def tokenizer_digest(folder: Path) -> str:
    """SHA-256 of what decides a record's tokens: the vocabulary, the special tokens and the chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens, tokenizer.chat_template])
    return hashlib.sha256(text.encode()).hexdigest()


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def bytes_per_token(top_k: int, vocab_size: int) -> int:
    return top_k * (id_dtype(vocab_size).itemsize + 2) + 2


def _top_k(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = logprobs.topk(k, dim=-1)
    tail = torch.logsumexp(logprobs.scatter(-1, top.indices, float("-inf")), dim=-1)
    return top.indices.cpu().numpy(), top.values.cpu().numpy(), tail.cpu().numpy()


def write_cache(
    teacher: torch.nn.Module,
    dataset,
    collate,
    out: Path,
    top_k: int,
    visual: bool,
    relation: bool,
    header: dict,
    batch_size: int = 64,
    chunk_size: int = 1024,
    vocab: int | None = None,
) -> dict:
    """Run ``teacher`` once over ``dataset`` (a :class:`model.data.ConversationDataset`) and write the cache to ``out``.

    ``header`` (the hashes that identify teacher, tokenizer and data) is stored as given, with
    the format's own fields added. ``vocab`` (the tokenizer's size) cuts a head padded past the
    tokenizer to the tokens students share (:class:`model.losses.SharedVocabHead`). Returns the full header.
    """
    import torch
    from tqdm import tqdm

    from model.losses import SharedVocabHead, chunked_relation, next_token_targets

    with torch.no_grad():
        teacher.eval()
        config = teacher.config
        head = SharedVocabHead(teacher.lm_head, vocab or config.text_config.vocab_size)
        vocab = head.vocab
        if not 1 <= top_k <= vocab:
            raise ValueError(f"top_k {top_k} must be between 1 and the teacher's vocabulary ({vocab})")
        image_token = config.image_token_index
        image_tokens = int(config.image_seq_length)
        counts = np.array([response_rows(labels) for _, labels in dataset.encoded], dtype=np.int64)
        offsets = np.stack([np.cumsum(counts) - counts, counts], axis=1)
        rows, records = int(counts.sum()), len(dataset)
        ids = id_dtype(vocab)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)

        def array(name: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
            if 0 in shape:  # a zero-length file cannot be memory-mapped
                np.save(out / f"{name}.npy", np.zeros(shape, dtype))
                return np.zeros(shape, dtype)
            return np.lib.format.open_memmap(out / f"{name}.npy", "w+", dtype, shape)

        def arrays(prefix: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            return array(f"{prefix}_ids", ids, (n, top_k)), array(f"{prefix}_logprobs", np.float16, (n, top_k)), array(f"{prefix}_tail", np.float16, (n,))

        response = arrays("response", rows)
        seen = arrays("visual", records * image_tokens) if visual else None
        gram = array("relation", np.float16, (records, image_tokens, image_tokens)) if relation else None
        dtype = next(teacher.parameters()).dtype
        device = next(teacher.parameters()).device
        row = 0
        for start in tqdm(range(0, records, batch_size), desc="teacher_cache", unit="batch", mininterval=2):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, records))])
            input_ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            hidden = teacher.model(input_ids=input_ids, pixel_values=batch.pixel_values.to(device, dtype), attention_mask=mask).last_hidden_state
            is_response, _ = next_token_targets(batch.labels.to(device))
            picked = hidden[is_response]
            for first in range(0, picked.shape[0], chunk_size):
                block = _top_k(head(picked[first : first + chunk_size]), top_k)
                for target, values in zip(response, block, strict=True):
                    target[row + first : row + first + values.shape[0]] = values
            row += picked.shape[0]
            image = hidden[input_ids == image_token]
            if seen is not None:
                first_row = start * image_tokens
                for target, values in zip(seen, _top_k(head(image), top_k), strict=True):
                    target[first_row : first_row + values.shape[0]] = values
            if gram is not None:
                r = chunked_relation(image.view(input_ids.shape[0], image_tokens, -1), head, chunk_size)
                r = r / r.norm(dim=-1, keepdim=True).clamp(min=1e-30)  # the cosine ignores scale; fp16 cannot hold it
                gram[start : start + r.shape[0]] = r.view(-1, image_tokens, image_tokens).cpu().numpy()
        if row != rows:
            raise RuntimeError(f"teacher_cache: {row} response rows written, {rows} expected from the encoded records")
        for written in (*response, *(seen or ()), *((gram,) if gram is not None else ())):
            if isinstance(written, np.memmap):
                written.flush()
        np.save(out / "offsets.npy", offsets)
        (out / "records.json").write_text(json.dumps([r["id"] for r in dataset.records]))
        full = {
            "format": FORMAT,
            **header,
            "top_k": top_k,
            "vocab_size": vocab,
            "image_tokens": image_tokens,
            "records": records,
            "response_rows": rows,
            "visual": visual,
            "relation": relation,
            "bytes_per_token": bytes_per_token(top_k, vocab),
            "bytes": sum(f.stat().st_size for f in out.iterdir()),
        }
        (out / HEADER).write_text(json.dumps(full, indent=2) + "\n")
        return full


class TeacherCache:
    """A cache folder, memory-mapped; rows come out as torch tensors for the records asked for."""

    def __init__(self, path: Path):
        self.path = Path(path)
        header = self.path / HEADER
        if not header.exists():
            raise ValueError(f"{self.path}: no teacher cache here ({HEADER} missing); run `dvc repro teacher_cache`")
        try:
            self.header = json.loads(header.read_text())
        except ValueError as error:
            raise ValueError(f"{header}: unreadable teacher cache header ({error}); run `dvc repro teacher_cache`") from None
        if self.header.get("format") != FORMAT:
            raise ValueError(f"{self.path}: cache format {self.header.get('format')}, this tinymod reads {FORMAT}; run `dvc repro teacher_cache`")
        def load(name: str) -> np.ndarray:
            file = self.path / f"{name}.npy"
            try:
                return np.load(file, mmap_mode="r")
            except (OSError, ValueError) as error:  # missing, truncated or not an array: never a partial read
                raise ValueError(f"{file}: unreadable teacher cache file ({error}); run `dvc repro teacher_cache`") from None

        try:
            self.index = {rid: i for i, rid in enumerate(json.loads((self.path / "records.json").read_text()))}
        except (OSError, ValueError) as error:
            raise ValueError(f"{self.path}/records.json: unreadable teacher cache file ({error}); run `dvc repro teacher_cache`") from None
        self.offsets = np.asarray(load("offsets"))
        self.image_tokens = int(self.header["image_tokens"])

        self.response = tuple(load(f"response_{part}") for part in ("ids", "logprobs", "tail"))
        self.visual = tuple(load(f"visual_{part}") for part in ("ids", "logprobs", "tail")) if self.header["visual"] else None
        self.relation_matrices = load("relation") if self.header["relation"] else None
        expected = {"response_ids": (self.header["response_rows"], self.header["top_k"]), "offsets": (self.header["records"], 2)}
        for name, array in (("response_ids", self.response[0]), ("offsets", self.offsets)):
            if array.shape != expected[name]:
                raise ValueError(f"{self.path}/{name}.npy holds {array.shape}, the header says {expected[name]}; run `dvc repro teacher_cache`")

    def check(self, expected: dict) -> None:
        """Refuse a cache that another teacher, tokenizer or data made; names the field and what to run.

        A dict (the data files' hashes) must agree on every key it has: a cache may hold more files.
        """
        for key, want in expected.items():
            pairs = [(f"{key}[{name!r}]", (self.header.get(key) or {}).get(name), v) for name, v in want.items()] if isinstance(want, dict) else [(key, self.header.get(key), want)]
            for name, have, wanted in pairs:
                if have != wanted:
                    raise ValueError(
                        f"{self.path}: the teacher cache's {name} is {_short(have)}, this stage's is {_short(wanted)}: "
                        "it was made from other inputs; run `dvc repro teacher_cache`"
                    )

    def locate(self, records: list[dict], encoded: list[tuple[list[int], list[int]]], stage: str) -> np.ndarray:
        """Cache row index of each record; refuses a record that is missing or whose response differs."""
        where = np.empty(len(records), dtype=np.int64)
        for i, (record, (_, labels)) in enumerate(zip(records, encoded, strict=True)):
            j = self.index.get(record["id"])
            if j is None:
                raise ValueError(f"{stage}: record {record['id']!r} is not in the teacher cache {self.path}; run `dvc repro teacher_cache`")
            if self.offsets[j, 1] != response_rows(labels):
                raise ValueError(
                    f"{stage}: record {record['id']!r} has {response_rows(labels)} response tokens, the teacher cache "
                    f"{int(self.offsets[j, 1])}: it was made from another tokenizer or text; run `dvc repro teacher_cache`"
                )
            where[i] = j
        return where

    def response_rows(self, cached: np.ndarray, top_k: int) -> TopK:
        """The response rows of records ``cached`` (cache indices), in order: the rows of ``hidden[response]``."""
        rows = np.concatenate([np.arange(s, s + n) for s, n in self.offsets[cached]]) if len(cached) else np.empty(0, np.int64)
        return _rows(self.response, rows).truncate(top_k)

    def visual_rows(self, cached: np.ndarray, top_k: int) -> TopK:
        if self.visual is None:
            raise ValueError(f"{self.path}: made without visual rows (no cached stage read kl_visual then); run `dvc repro teacher_cache`")
        rows = (cached[:, None] * self.image_tokens + np.arange(self.image_tokens)).reshape(-1)
        return _rows(self.visual, rows).truncate(top_k)

    def relation(self, cached: np.ndarray) -> torch.Tensor:
        import torch

        if self.relation_matrices is None:
            raise ValueError(f"{self.path}: made without RDist matrices (no cached stage read relation then); run `dvc repro teacher_cache`")
        return torch.from_numpy(np.asarray(self.relation_matrices[cached], dtype=np.float32)).flatten(1)


def _rows(arrays: tuple[np.ndarray, np.ndarray, np.ndarray], rows: np.ndarray) -> TopK:
    import torch

    from model.losses import TopK

    ids, logprobs, tail = (np.asarray(a[rows]) for a in arrays)
    return TopK(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(logprobs.astype(np.float32)), torch.from_numpy(tail.astype(np.float32)))


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:16] + "..." if len(text) > 19 else text

