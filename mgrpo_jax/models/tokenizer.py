"""A byte-level tokenizer for the tiny default model (no vocabulary file, nothing to download).

Real generators use the Hugging Face tokenizers of their text encoders; the tiny model reads
UTF-8 bytes so the whole pipeline runs on a fresh machine with no model hub.
"""

from __future__ import annotations

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
_BYTE_OFFSET = 3
VOCAB_SIZE = 256 + _BYTE_OFFSET


class ByteTokenizer:
  """UTF-8 bytes -> ids `byte + 3`, framed by BOS / EOS and right-padded with PAD to `max_length`.

  Text longer than `max_length - 2` bytes is truncated (EOS is always kept), like CLIP's
  tokenizer with `truncation=True`.
  """

  def __init__(self, max_length: int):
    if max_length < 2:
      raise ValueError(f"max_length={max_length}: need room for BOS and EOS (>= 2)")
    self.max_length = int(max_length)
    self.vocab_size = VOCAB_SIZE

  def __call__(self, prompts: list[str]) -> dict[str, np.ndarray]:
    """list of B strings -> {'input_ids': int32 [B, max_length]}."""
    if isinstance(prompts, str):
      raise TypeError("tokenize takes a list of prompts, got a single string")
    ids = np.full((len(prompts), self.max_length), PAD_ID, np.int32)
    for row, text in enumerate(prompts):
      data = np.frombuffer(str(text).encode("utf-8"), np.uint8)[: self.max_length - 2]
      ids[row, 0] = BOS_ID
      ids[row, 1:1 + len(data)] = data.astype(np.int32) + _BYTE_OFFSET
      ids[row, 1 + len(data)] = EOS_ID
    return {"input_ids": ids}

  def decode(self, ids: np.ndarray) -> str:
    """One row of ids -> text (special tokens dropped; invalid UTF-8 replaced)."""
    ids = np.asarray(ids)
    data = bytes(int(i) - _BYTE_OFFSET for i in ids if i >= _BYTE_OFFSET)
    return data.decode("utf-8", errors="replace")
