"""Stage `curate`: raw sources -> validated, deduplicated splits, a quarantine and a data card.

Sources are adapters that yield raw records: the embedded world (generated
into data/world/ first), LLaVA conversation JSON/JSONL with an image folder,
and RLAIF-V-style preference pairs (parquet or JSONL). Every record passes the
same checks; a record that fails one is written to the quarantine with its
reason, never dropped silently, and the counts always add up::

    in = kept + duplicates + rejected

Kept images are copied into a content-addressed store (data/curated/images/),
so the curated folder is self-contained and versioned by DVC as one output.

Everything is built in staging folders beside the outputs (``data/curated.staging``
and the like) and renamed into place only when the stage succeeds: a crash at any
record, or too many rejections, leaves the previous outputs as they were (the
failed attempt's quarantine stays in the staging folder for inspection).

Run: ``python -m tasks.curate [--params params.yaml]``
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
import shutil
import sys
import time
import warnings
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFile
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from model import world as W
from model.tokenizer import CHAT_TEMPLATE, IMAGE_TOKEN, save_tokenizer, train_tokenizer
from tasks.common import (
    STAGING,
    StageFailure,
    StagePaths,
    run_stage,
    swap_in,
    write_json,
    write_jsonl,
)
from tasks.params import CurateParams, LlavaJsonSource, Params, PreferenceSource

REASONS = {
    "bad_encoding": "text is not valid UTF-8",
    "bad_json": "not a JSON object",
    "schema": "missing or mistyped fields",
    "no_image": "no image (tinymod trains image-grounded conversations only)",
    "path_escape": "image path leaves the image root (.., absolute path or symlink)",
    "image_missing": "image file not found",
    "image_undecodable": "image cannot be decoded (truncated, not an image, or an image-library error)",
    "image_size": "image side outside curate.min_image_side..max_image_side (read from the header, before decoding)",
    "image_token": "not exactly one <image> placeholder, in the first human turn",
    "roles": "turns do not alternate human/gpt starting with human",
    "empty_answer": "an answer (gpt turn, chosen or rejected) is empty",
    "same_pair": "chosen and rejected are identical",
    "too_long": "longer than curate.max_tokens",
    "probe_leak": "image is an evaluation-probe image",
}
TRAIN_SPLITS = ("general", "multitask", "preference", "lookup")


class CurateError(StageFailure):
    """The stage cannot curate what it was given; the message says what to fix."""


@dataclass
class Raw:
    """A record as a source adapter read it, before any check."""

    source: str
    index: int
    split: str
    image_root: Path
    record: dict | None = None
    text: str | None = None
    image_bytes: bytes | None = None
    image_path: Path | None = None
    error: tuple[str, str] | None = None


@dataclass
class Rejected(Exception):
    reason: str
    detail: str


@dataclass
class Outcome:
    """What the stage keeps in memory: counts and one example per reason, never the records.

    Kept and quarantined records go straight to their files, so memory stays flat with the record
    count (LLaVA-665k included); token lengths are 4 bytes each.
    """

    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    reasons: Counter = field(default_factory=Counter)
    examples: dict[str, dict] = field(default_factory=dict)
    token_lengths: array = field(default_factory=lambda: array("I"))


# ---------------------------------------------------------------- sources


def generate_world_files(params: CurateParams, out: Path) -> None:
    """Generate the embedded world into ``out``: images, LLaVA JSONL per split and probe, world.json."""
    spec = params.world
    w = params.world
    counts = w.images.model_dump()
    records = W.generate_world(spec, counts, w.seed, w.qa_per_image, w.pope_per_image)
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    for name, scene in tqdm(records.images.items(), desc="world: drawing", unit="img", leave=False, disable=None):
        W.render(scene, spec).save(out / name, optimize=False)
    for split, recs in records.splits.items():
        write_jsonl(out / f"{split}.jsonl", recs)
    for probe, recs in records.probes.items():
        write_jsonl(out / "probes" / f"{probe}.jsonl", recs)
    write_json(
        out / "world.json",
        {
            "objects": {name: [o.__dict__ for o in s.objects] for name, s in records.images.items()},
            "phantoms": {name: [o.shape for o in s.phantoms] for name, s in records.images.items() if s.phantoms},
            "frequency": records.frequency,
            "cooccurrence": records.cooccurrence,
        },
    )


def world_records(out: Path) -> Iterator[Raw]:
    """The generated world's records, probes first."""
    for probe in sorted(p.stem for p in (out / "probes").glob("*.jsonl")):
        yield from jsonl_records(out / "probes" / f"{probe}.jsonl", f"world:probes/{probe}", f"probes/{probe}", out)
    for split in TRAIN_SPLITS:
        yield from jsonl_records(out / f"{split}.jsonl", f"world:{split}", split, out)


def json_list_items(path: Path, chunk_chars: int = 1 << 20) -> Iterator[object]:
    """The items of a JSON list file, one at a time: the file is never held whole (LLaVA-665k is 1 GB).

    Bytes that are not UTF-8 come through as surrogates (the record is then quarantined as
    bad_encoding); a file that is not a JSON list fails the stage with the position of the error.
    """
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8", errors="surrogateescape") as handle:
        buffer, pos, eof, index = "", 0, False, 0

        def fill() -> None:
            nonlocal buffer, pos, eof
            more = handle.read(chunk_chars)
            eof = not more
            buffer, pos = buffer[pos:] + more, 0

        def skip_space() -> str:
            """The next non-blank character ('' at the end of the file)."""
            nonlocal pos
            while True:
                while pos < len(buffer) and buffer[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buffer) or eof:
                    return buffer[pos : pos + 1]
                fill()

        if skip_space() != "[":
            raise CurateError(f"{path}: expected a JSON list of LLaVA records (the file does not start with '[')")
        pos += 1
        while True:
            char = skip_space()
            if char == "]":
                return
            if index:
                if char != ",":
                    raise CurateError(f"{path}: not valid JSON after item {index - 1} (expected ',' or ']', got {char or 'the end of the file'!r})")
                pos += 1
                skip_space()
            while True:
                try:
                    item, end = decoder.raw_decode(buffer, pos)
                except json.JSONDecodeError as error:
                    if eof:
                        raise CurateError(f"{path}: not valid JSON in item {index} ({error.msg}); expected a list of LLaVA records") from None
                    fill()  # the item runs past the buffer: read on
                    continue
                if not isinstance(item, (dict, list, str)) and not eof and (end == len(buffer) or buffer[end] not in ",] \t\r\n"):
                    fill()  # a number cut by the chunk ("3" of "3.25"): read on and decode it again
                    continue
                break
            pos = end
            yield item
            index += 1


def jsonl_records(path: Path, source: str, split: str, image_root: Path) -> Iterator[Raw]:
    """Records of a .jsonl (one per line) or .json (a list) file, streamed; undecodable lines become errors, not crashes."""
    if path.suffix == ".json":
        for i, item in enumerate(json_list_items(path)):
            raw = Raw(source, i, split, image_root, record=item if isinstance(item, dict) else None)
            if not isinstance(item, dict):
                raw.error = ("bad_json", f"item is a {type(item).__name__}, not an object")
            elif _has_surrogates(item):
                raw.error = ("bad_encoding", "a string holds bytes that are not UTF-8")
            yield raw
        return
    with path.open("rb") as handle:
        for i, line in enumerate(handle):
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            raw = Raw(source, i, split, image_root)
            try:
                raw.text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                raw.text = line.decode("utf-8", errors="replace")
                raw.error = ("bad_encoding", f"line {i + 1}: {error.reason} at byte {error.start}")
                yield raw
                continue
            try:
                item = json.loads(raw.text)
            except json.JSONDecodeError as error:
                raw.error = ("bad_json", f"line {i + 1}: {error.msg}")
                yield raw
                continue
            if not isinstance(item, dict):
                raw.error = ("bad_json", f"line {i + 1}: a {type(item).__name__}, not an object")
            raw.record = item if isinstance(item, dict) else None
            yield raw


def _has_surrogates(value) -> bool:
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, dict):
        return any(_has_surrogates(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_surrogates(v) for v in value)
    return False


def preference_records(source: PreferenceSource) -> Iterator[Raw]:
    """RLAIF-V-style rows (image, question, chosen, rejected) as preference records."""
    path, root = Path(source.path), Path(source.image_root)
    name = f"preference:{path.name}"
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = (row for batch in pq.ParquetFile(path).iter_batches(batch_size=1024) for row in batch.to_pylist())
        for i, row in enumerate(rows):
            raw = Raw(name, i, "preference", root)
            image = row.get("image")
            if isinstance(image, dict):  # a datasets Image feature: {"bytes": ..., "path": ...}
                raw.image_bytes = image.get("bytes")
                image = image.get("path") if raw.image_bytes is None else f"{path.name}#{i}"
            raw.record = _preference_row(row, image, i)
            yield raw
        return
    for raw in jsonl_records(path, name, "preference", root):
        if raw.record is not None and "conversations" not in raw.record:
            raw.record = _preference_row(raw.record, raw.record.get("image"), raw.index)
        yield raw


def _preference_row(row: dict, image, index: int) -> dict:
    question = row.get("question")
    if isinstance(question, str) and IMAGE_TOKEN not in question:
        question = f"{IMAGE_TOKEN}\n{question}"
    return {
        "id": str(row.get("id", row.get("idx", f"pref-{index:06d}"))),
        "image": image,
        "conversations": [{"from": "human", "value": question}],
        "chosen": row.get("chosen"),
        "rejected": row.get("rejected"),
    }


def all_sources(params: CurateParams, paths: StagePaths) -> Iterator[Raw]:
    """Every source's records, streamed (the world's from ``paths.world``, generated before)."""
    # Probes first: training records are checked against the probe images.
    sources = sorted(params.sources, key=lambda s: s.kind != "world")
    for source in sources:
        if source.kind == "world":
            yield from world_records(paths.world)
        elif isinstance(source, LlavaJsonSource):
            path = Path(source.path)
            if not path.exists():
                raise CurateError(f"curate.sources: {path} does not exist (kind: llava_json)")
            yield from jsonl_records(path, f"llava_json:{path.name}", source.split, Path(source.image_root))
        else:
            if not Path(source.path).exists():
                raise CurateError(f"curate.sources: {source.path} does not exist (kind: preference)")
            yield from preference_records(source)


# ---------------------------------------------------------------- checks


def check_conversation(record: dict, preference: bool) -> None:
    """Schema, roles, the image placeholder and non-empty answers of a LLaVA record."""
    if not isinstance(record.get("id", ""), (str, int)):
        raise Rejected("schema", "`id` must be a string")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise Rejected("schema", "`conversations` must be a non-empty list")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise Rejected("schema", f"conversations[{i}] must be {{'from': str, 'value': str}}")
    if preference:
        for key in ("chosen", "rejected"):
            if not isinstance(record.get(key), str):
                raise Rejected("schema", f"`{key}` must be a string")
    if not isinstance(record.get("image"), str) or not record["image"]:
        if record.get("image") is None:
            raise Rejected("no_image", "record has no `image`")
        raise Rejected("schema", "`image` must be one relative path (a string)")
    expected = ["human", "gpt"] * len(turns)
    roles = [t["from"] for t in turns]
    if preference and roles != ["human"]:
        raise Rejected("roles", f"a preference prompt is one human turn, got {roles}")
    if not preference and (roles != expected[: len(roles)] or roles[-1] != "gpt"):
        raise Rejected("roles", f"expected human, gpt, human, ... ending with gpt; got {roles}")
    placeholders = [t["value"].count(IMAGE_TOKEN) for t in turns]
    if placeholders[0] != 1 or sum(placeholders) != 1:
        raise Rejected("image_token", f"<image> count per turn: {placeholders}")
    answers = [t["value"] for t in turns if t["from"] == "gpt"]
    if preference:
        answers = [record["chosen"], record["rejected"]]
    for i, answer in enumerate(answers):
        if not answer.strip():
            raise Rejected("empty_answer", f"answer {i} is empty")
    if preference and record["chosen"].strip() == record["rejected"].strip():
        raise Rejected("same_pair", "chosen == rejected")


def resolve_image(root: Path, relative: str) -> Path:
    """The image file, or Rejected when the path would leave ``root`` (.., absolute, symlink)."""
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise Rejected("path_escape", f"{relative!r} is absolute or climbs with '..'")
    real_root = root.resolve()
    path = (root / candidate).resolve()
    if not path.is_relative_to(real_root):
        raise Rejected("path_escape", f"{relative!r} resolves to {path}, outside {real_root}")
    if not path.is_file():
        raise Rejected("image_missing", f"{relative!r} not found under {root}")
    return path


def check_image(data: bytes, params: CurateParams) -> tuple[str, str]:
    """Check the header's size, then decode the whole image; returns (sha256, file extension).

    The size comes from the header, so an oversized image (a decompression bomb included) is
    rejected without being decoded. Any error of the image library quarantines the record.
    """
    low, high = params.min_image_side, params.max_image_side
    # lmms-eval sets this process-wide on import; a truncated image must fail here all the same.
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if not (low <= width <= high and low <= height <= high):
                    raise Rejected("image_size", f"{width}x{height}, allowed sides {low}..{high}")
                image.load()
                fmt = (image.format or "png").lower()
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise Rejected("image_size", f"decompression bomb: {_without_addresses(error)}") from None
    except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        raise Rejected("image_undecodable", f"{type(error).__name__}: {_without_addresses(error)}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    return hashlib.sha256(data).hexdigest(), {"jpeg": "jpg"}.get(fmt, fmt)


def _without_addresses(error: BaseException) -> str:
    """The message without object addresses (``<_io.BytesIO object at 0x7f..>``): identical runs, identical quarantine."""
    return re.sub(r" at 0x[0-9a-f]+", "", str(error))


def conversation_text(record: dict, preference: bool) -> str:
    """The record as the model reads it (ChatML), to count its tokens."""
    turns = record["conversations"]
    text = "".join(
        f"<|im_start|>{'user' if t['from'] == 'human' else 'assistant'}\n{t['value']}<|im_end|>\n" for t in turns
    )
    if preference:
        longest = max(record["chosen"], record["rejected"], key=len)
        text += f"<|im_start|>assistant\n{longest}<|im_end|>\n"
    return text


# ---------------------------------------------------------------- the stage


def staged(paths: StagePaths) -> StagePaths:
    """``paths`` with the stage's folders (world, curated, tokenizer) moved to their staging names."""
    out = copy.copy(paths)
    out.world, out.curated, out.tokenizer = (p.with_name(p.name + STAGING) for p in (paths.world, paths.curated, paths.tokenizer))
    out.probes = out.curated / "probes"
    return out


def curate(params: Params, paths: StagePaths, show_progress: bool = True) -> dict:
    """Run the whole stage in staging folders and swap them in on success; returns the metrics (metrics/curate.json)."""
    cp = params.curate
    started = time.time()
    final, paths = paths, staged(paths)
    for folder in (paths.world, paths.curated, paths.tokenizer):
        if folder.exists():
            shutil.rmtree(folder)
    (paths.curated / "images").mkdir(parents=True)
    if any(source.kind == "world" for source in cp.sources):
        generate_world_files(cp, paths.world)
    tokenizer = build_tokenizer(cp, lambda: all_sources(cp, paths), paths.tokenizer)
    outcome = Outcome()
    probe_hashes: set[str] = set()
    seen: set[bytes] = set()  # 16-byte digests of (split, image, text): 200k records take a few MB
    images: dict[tuple[Path, str], tuple[str, str] | Rejected] = {}  # one check per image file, however many records use it
    with RecordWriters(paths.curated) as out:
        pending: list[tuple[Raw, dict]] = []
        progress = tqdm(all_sources(cp, paths), desc="curate", unit="rec", disable=None if show_progress else True)
        for raw in progress:
            outcome.counts[raw.split]["in"] += 1
            try:
                record, digest, ext, data = _check(raw, cp, images)
            except Rejected as rejection:
                _reject(outcome, out, raw, rejection)
                continue
            if raw.split.startswith("probes/"):
                probe_hashes.add(digest)
            elif digest in probe_hashes:
                _reject(outcome, out, raw, Rejected("probe_leak", f"image sha256 {digest[:12]} is used by an evaluation probe"))
                continue
            key = json.dumps([raw.split, digest, record["conversations"], record.get("chosen"), record.get("rejected")])
            key_digest = hashlib.blake2b(key.encode("utf-8", errors="surrogateescape"), digest_size=16).digest()
            if key_digest in seen:
                outcome.counts[raw.split]["duplicates"] += 1
                continue
            seen.add(key_digest)
            stored = f"images/{digest[:2]}/{digest}.{ext}"
            target = paths.curated / stored
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data if data is not None else raw.image_path.read_bytes())
            pending.append((raw, {**record, "image": stored, "source": raw.source}))
            if len(pending) == TOKENIZE_BATCH:
                _keep(outcome, out, tokenizer, pending, cp)
                pending = []
        _keep(outcome, out, tokenizer, pending, cp)
    metrics = _metrics(outcome, time.time() - started)
    fraction = metrics["rejected_fraction"]
    if fraction > cp.max_rejected_fraction:
        write_json(paths.curated / "curate.json", metrics)
        raise CurateError(
            f"{metrics['rejected']} of {metrics['in']} records rejected ({fraction:.1%}), above "
            f"curate.max_rejected_fraction ({cp.max_rejected_fraction:.1%}). Reasons: {dict(outcome.reasons)}. "
            f"Every rejected record is in {paths.curated / 'quarantine.jsonl'} with its reason; fix the source "
            f"or raise the threshold. The previous outputs ({final.curated}, {final.world}, {final.tokenizer}) are untouched."
        )
    for folder in ("world", "curated", "tokenizer"):
        if getattr(paths, folder).exists():
            swap_in(getattr(paths, folder), getattr(final, folder))
    write_json(final.metrics / "curate.json", metrics)
    write_data_card(final, params, outcome, metrics)
    return metrics


def _check(raw: Raw, cp: CurateParams, images: dict) -> tuple[dict, str, str, bytes | None]:
    """The record, its image's sha256 and extension, and the image bytes (None: read from ``raw.image_path``).

    An image file's verdict is kept in ``images``: LLaVA-665k's records share 600k images, and each is
    decoded once.
    """
    if raw.error:
        raise Rejected(*raw.error)
    record = raw.record
    assert record is not None
    check_conversation(record, raw.split == "preference")
    if raw.image_bytes is not None:
        return record, *check_image(raw.image_bytes, cp), raw.image_bytes
    key = (raw.image_root, record["image"])
    if key not in images:
        try:
            path = resolve_image(raw.image_root, record["image"])
            images[key] = (*check_image(path.read_bytes(), cp), path)
        except Rejected as rejection:
            images[key] = rejection
    verdict = images[key]
    if isinstance(verdict, Rejected):
        raise verdict
    digest, ext, raw.image_path = verdict
    return record, digest, ext, None


class RecordWriters:
    """The curated split files and the quarantine, written as records arrive; every training split exists, even empty."""

    def __init__(self, curated: Path):
        self.curated = curated
        self.handles: dict[str, object] = {}

    def write(self, name: str, record: dict) -> None:
        if name not in self.handles:
            path = self.curated / f"{name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handles[name] = path.open("w", encoding="utf-8")
        self.handles[name].write(json.dumps(record, ensure_ascii=False) + "\n")

    def __enter__(self) -> RecordWriters:
        for name in (*TRAIN_SPLITS, "quarantine"):
            self.handles[name] = (self.curated / f"{name}.jsonl").open("w", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles.values():
            handle.close()


TOKENIZE_BATCH = 2048


def _keep(outcome: Outcome, out: RecordWriters, tokenizer: PreTrainedTokenizerBase, pending: list[tuple[Raw, dict]], cp: CurateParams) -> None:
    """Write the records that passed every check and fit curate.max_tokens; quarantine the others as too_long."""
    lengths = _token_lengths(tokenizer, [record for _, record in pending], cp.image_tokens)
    for (raw, record), length in zip(pending, lengths, strict=True):
        if length > cp.max_tokens:
            _reject(outcome, out, raw, Rejected("too_long", f"{length} tokens (image included), limit {cp.max_tokens}"))
            continue
        out.write(raw.split, record)
        outcome.counts[raw.split]["kept"] += 1
        outcome.token_lengths.append(length)


def _reject(outcome: Outcome, out: RecordWriters, raw: Raw, rejection: Rejected) -> None:
    outcome.counts[raw.split]["rejected"] += 1
    outcome.reasons[rejection.reason] += 1
    entry = {
        "source": raw.source,
        "index": raw.index,
        "split": raw.split,
        "id": (raw.record or {}).get("id"),
        "reason": rejection.reason,
        "detail": rejection.detail,
        "record": raw.record if raw.record is not None and not _has_surrogates(raw.record) else raw.text,
    }
    out.write("quarantine", entry)
    outcome.examples.setdefault(rejection.reason, entry)


def _texts(raws: Iterable[Raw]) -> Iterator[str]:
    yield from ("user", "assistant", "system")
    for raw in raws:
        # The lookup split repeats multitask's own sentences, so it adds no word; counted, it would
        # only renumber the merges, and a tokenizer trained with it starts the teacher's first phase
        # from other embeddings: adding the second phase must leave the first as it was.
        if raw.split == "lookup":
            continue
        if raw.record and not raw.error and not _has_surrogates(raw.record):
            for turn in raw.record.get("conversations") or []:
                if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                    yield turn["value"]
            yield from (v for v in (raw.record.get("chosen"), raw.record.get("rejected")) if isinstance(v, str))


def build_tokenizer(cp: CurateParams, sources: Callable[[], Iterable[Raw]], out: Path) -> PreTrainedTokenizerBase:
    """Train the world tokenizer on the records' text (one streamed pass of ``sources()``), or load the user's; save it to ``out``."""
    if cp.tokenizer.source == "world":
        tokenizer = train_tokenizer(_texts(sources()), cp.tokenizer.vocab_size)
    else:
        source = Path(cp.tokenizer.source)
        if not source.is_dir():
            raise CurateError(f"curate.tokenizer.source: {source} is not a folder with a Hugging Face tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(source)
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            raise CurateError(f"curate.tokenizer.source: {source} has no {IMAGE_TOKEN} token; a LLaVA tokenizer needs one")
        if tokenizer.chat_template is None:
            tokenizer.chat_template = CHAT_TEMPLATE
    if out.exists():
        shutil.rmtree(out)
    save_tokenizer(tokenizer, out)
    return tokenizer


def _token_lengths(tokenizer: PreTrainedTokenizerBase, records: list[dict], image_tokens: int) -> list[int]:
    lengths: list[int] = []
    batch = 2048
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        texts = [conversation_text(r, "chosen" in r) for r in chunk]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        # The one <image> placeholder expands to `image_tokens` tokens in the model's input.
        lengths += [len(ids) - 1 + image_tokens for ids in encoded]
    return lengths


def _metrics(outcome: Outcome, seconds: float) -> dict:
    splits = {}
    for split, counts in sorted(outcome.counts.items()):
        splits[split] = {key: counts.get(key, 0) for key in ("in", "kept", "duplicates", "rejected")}
    total = {key: sum(s[key] for s in splits.values()) for key in ("in", "kept", "duplicates", "rejected")}
    assert total["in"] == total["kept"] + total["duplicates"] + total["rejected"], total
    lengths = sorted(outcome.token_lengths) or [0]  # 4 bytes a record
    return {
        **total,
        "rejected_fraction": total["rejected"] / max(1, total["in"]),
        "rejected_by_reason": dict(sorted(outcome.reasons.items())),
        "splits": splits,
        "tokens": {"median": lengths[len(lengths) // 2], "max": lengths[-1]},
        "seconds": round(seconds, 2),
    }


def write_data_card(paths: StagePaths, params: Params, outcome: Outcome, metrics: dict) -> None:
    paths.reports.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Data card",
        "",
        f"Sources: {', '.join(s.kind + (':' + getattr(s, 'path', '') if getattr(s, 'path', '') else '') for s in params.curate.sources)}.",
        f"In {metrics['in']} = kept {metrics['kept']} + duplicates {metrics['duplicates']} + rejected {metrics['rejected']}"
        f" ({metrics['rejected_fraction']:.2%} rejected; the stage fails above {params.curate.max_rejected_fraction:.0%}).",
        f"Tokens per record (image included): median {metrics['tokens']['median']}, max {metrics['tokens']['max']}"
        f" (limit {params.curate.max_tokens}).",
        "",
        "| split | in | kept | duplicates | rejected |",
        "|---|---:|---:|---:|---:|",
    ]
    for split, c in metrics["splits"].items():
        lines.append(f"| {split} | {c['in']} | {c['kept']} | {c['duplicates']} | {c['rejected']} |")
    lines += ["", "## Rejected records", ""]
    if not outcome.reasons:
        lines.append("None.")
    else:
        lines += ["| reason | count | meaning | first example |", "|---|---:|---|---|"]
        for reason, count in sorted(outcome.reasons.items()):
            example = outcome.examples[reason]
            where = f"{example['source']} #{example['index']}: {example['detail']}".replace("|", "\\|")
            lines.append(f"| {reason} | {count} | {REASONS[reason]} | {where[:160]} |")
        lines.append("")
        lines.append("Every rejected record is in `data/curated/quarantine.jsonl` with its reason and detail.")
    if params.uses_world:
        lines += ["", *_world_summary(paths, params)]
    (paths.reports / "data_card.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _world_summary(paths: StagePaths, params: Params) -> list[str]:
    info = json.loads((paths.world / "world.json").read_text(encoding="utf-8"))
    w = params.curate.world
    noisy = sum(1 for name in info["objects"] if name.startswith(("images/general", "images/multitask")))
    lines = [
        "## The embedded world",
        "",
        f"{len(info['objects'])} images of {w.image_size}x{w.image_size} px; shapes {', '.join(w.shapes)};"
        f" {w.min_objects}-{w.max_objects} objects each.",
        f"Annotation noise: {len(info['phantoms'])} of {noisy} training images ({len(info['phantoms']) / max(1, noisy):.1%})"
        f" are annotated with a co-occurring partner that is not in the image (hallucination_rate {w.hallucination_rate}).",
        "Probes and preference `chosen` answers use the ground truth.",
        "",
        "| shape | images | partner pulled in |",
        "|---|---:|---|",
    ]
    partner = {p.anchor: f"{p.partner} ({p.probability:.0%})" for p in w.pairings}
    for shape, count in sorted(info["frequency"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {shape} | {count} | {partner.get(shape, '')} |")
    sample = _sample_grid(paths)
    if sample:
        lines += ["", f"![sample images]({sample.relative_to(paths.reports).as_posix()})"]
    return lines


def _sample_grid(paths: StagePaths) -> Path | None:
    images = sorted((paths.world / "images").glob("general-*.png"))[:32]
    if not images:
        return None
    first = Image.open(images[0])
    side = first.width
    gap = max(2, side // 16)  # a white border, so that neighbouring images cannot be mistaken for one
    cell = side + gap
    grid = Image.new("RGB", (cell * 8 + gap, cell * ((len(images) + 7) // 8) + gap), "white")
    for i, path in enumerate(images):
        grid.paste(Image.open(path).convert("RGB"), (gap + (i % 8) * cell, gap + (i // 8) * cell))
    paths.plots.mkdir(parents=True, exist_ok=True)
    out = paths.plots / "world_samples.png"
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    return run_stage(
        "curate",
        curate,
        __doc__,
        argv,
        lambda m: f"in {m['in']} = kept {m['kept']} + duplicates {m['duplicates']} + rejected {m['rejected']} ({m['seconds']} s)",
    )


if __name__ == "__main__":
    sys.exit(main())
