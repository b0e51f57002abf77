"""BAGEL's tokenizer: Qwen2's byte-level BPE plus BAGEL's four control tokens.

Contract:
- `BagelTokenizer.from_folder(path)` loads the tokenizer files of a checkpoint folder in the official
  Hugging Face layout: tokenizer.json, or vocab.json + merges.txt (tokenizer_config.json,
  special_tokens_map.json and added_tokens.json are read when present). Missing files raise
  FileNotFoundError naming the folder and the files; a tokenizer that is not a byte-level BPE raises
  ValueError.
- BAGEL's special tokens are applied as the official `data/data_utils.py:add_special_tokens` does:
  any of <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|> that the tokenizer does not
  declare as a special token is added with `add_tokens` (a normal added token; a token already in
  the vocabulary keeps its id). `bos_id`, `eos_id`, `start_of_image`, `end_of_image` are their ids.
- `encode(text)` tokenizes user or model TEXT: normalizer (NFC) + pre-tokenizer + BPE, with no
  added-token extraction, so a literal "<|im_end|>" typed by a user is plain text, never a control
  token (the reference tokenizes it as the control token; BAGEL.md section 10, quirk 10). For text
  without added-token strings the ids equal the reference's `tokenizer.encode(text)`. No BOS/EOS.
- `segment(text)` = [bos] + encode(text) + [eos]: BAGEL's T(x) (bagel.py prepare_prompts).
- `decode(ids)` = the reference's `tokenizer.decode(ids)` (skip_special_tokens=False): added tokens
  are written verbatim, the bytes between them decoded as UTF-8 with U+FFFD replacement; unknown ids
  are skipped.
- `StreamDecoder` turns ids, one at a time, into printable text deltas. It holds back an incomplete
  UTF-8 sequence until it completes (or cannot), so that the deltas plus `flush()` concatenate to
  `decode(all ids)`.
"""

from __future__ import annotations

import codecs
import json
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer
from transformers import Qwen2Tokenizer

BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
START_OF_IMAGE_TOKEN = "<|vision_start|>"
END_OF_IMAGE_TOKEN = "<|vision_end|>"
BAGEL_TOKENS = (BOS_TOKEN, EOS_TOKEN, START_OF_IMAGE_TOKEN, END_OF_IMAGE_TOKEN)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte 0..255 as the printable character that stands for it."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _find_tokenizer_files(folder: Path) -> None:
    """Raise a clear error unless the folder holds tokenizer.json or vocab.json + merges.txt."""
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist or is not a directory")
    if (folder / "tokenizer.json").is_file():
        return
    missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"no tokenizer in {folder}: missing {', '.join(missing)} (and no tokenizer.json); "
            "expected the Qwen2 files of a BAGEL checkpoint"
        )


def _plain_tokenizer(backend: Tokenizer) -> Tokenizer:
    """A copy of the backend pipeline (normalizer, pre-tokenizer, BPE) without any added tokens."""
    spec = json.loads(backend.to_str())
    spec["added_tokens"] = []
    spec["post_processor"] = None
    spec["truncation"] = None
    spec["padding"] = None
    return Tokenizer.from_str(json.dumps(spec))


class BagelTokenizer:
    """Qwen2 tokenizer with BAGEL's control tokens; see the module docstring for the contract."""

    def __init__(self, hf_tokenizer: Qwen2Tokenizer) -> None:
        backend = hf_tokenizer.backend_tokenizer
        spec = json.loads(backend.to_str())
        if spec["model"]["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise ValueError(
                "BAGEL needs Qwen2's byte-level BPE tokenizer; got model "
                f"{spec['model']['type']} with decoder {(spec.get('decoder') or {}).get('type')}"
            )
        # data/data_utils.py:add_special_tokens: add what is not declared special; an existing token
        # keeps its id. transformers 5 keeps extra special tokens out of special_tokens_map, so read
        # all_special_tokens (map values plus extras, as transformers 4's special_tokens_map had them).
        declared = set(hf_tokenizer.all_special_tokens)
        self.num_new_tokens = hf_tokenizer.add_tokens([t for t in BAGEL_TOKENS if t not in declared])
        self._hf = hf_tokenizer
        self._plain = _plain_tokenizer(backend)
        self.bos_id, self.eos_id, self.start_of_image, self.end_of_image = (
            hf_tokenizer.convert_tokens_to_ids(t) for t in BAGEL_TOKENS
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> BagelTokenizer:
        folder = Path(path)
        _find_tokenizer_files(folder)
        return cls(Qwen2Tokenizer.from_pretrained(str(folder)))

    def __len__(self) -> int:
        return len(self._hf)

    @property
    def hf_tokenizer(self) -> Qwen2Tokenizer:
        """The underlying transformers tokenizer (the reference behaviour, control tokens included)."""
        return self._hf

    def encode(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def segment(self, text: str) -> list[int]:
        return [self.bos_id, *self.encode(text), self.eos_id]

    def decode(self, ids: list[int]) -> str:
        # clean_up_tokenization_spaces is off in Qwen2's config, and transformers 5 ignores it for BPE.
        return self._hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @cached_property
    def added_token_text(self) -> dict[int, str]:
        """Added tokens (control tokens included) by id: decode writes them verbatim."""
        return {i: token.content for i, token in self._hf.added_tokens_decoder.items()}

    @cached_property
    def token_bytes(self) -> dict[int, bytes]:
        """The bytes of each BPE-vocabulary token (built on first use: ~150k entries for Qwen2)."""
        byte_of = {char: b for b, char in bytes_to_unicode().items()}
        vocab = self._hf.backend_tokenizer.get_vocab(with_added_tokens=False)
        return {i: bytes(byte_of[c] for c in token) for token, i in vocab.items()}

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental `decode`: `push(id)` returns the text that became printable, `flush()` the rest."""

    def __init__(self, tokenizer: BagelTokenizer) -> None:
        self._added = tokenizer.added_token_text
        self._bytes = tokenizer.token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if token_id in self._added:
            # decode() decodes the bytes before an added token on their own: an incomplete
            # sequence there becomes U+FFFD, and the token's text follows verbatim.
            return self.flush() + self._added[token_id]
        piece = self._bytes.get(token_id)
        if piece is None:  # unknown id (e.g. an embedding padding row): decode() skips it
            return ""
        return self._utf8.decode(piece)

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
