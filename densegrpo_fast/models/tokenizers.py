"""Tokenizers written from a word list, for the tiny models (every word one token): CLIP BPE and T5 Unigram."""
from __future__ import annotations

import json
import os
import string


def learn_bpe_merges(spelt: list) -> list:
    """BPE training on symbol sequences: merge the most frequent adjacent pair over all sequences (ties by the pair's
    text), until every sequence is one symbol. -> the merges (a, b) in rank order. Applying them by rank, as a BPE
    tokenizer does, rebuilds each sequence whole."""
    spelt = [list(x) for x in spelt if len(x) > 1]
    merges = []
    while spelt:
        counts: dict = {}
        for sym in spelt:
            for pair in zip(sym, sym[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda pr: (-counts[pr], pr))
        merges.append(best)
        for k, sym in enumerate(spelt):
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            spelt[k] = out
        spelt = [x for x in spelt if len(x) > 1]
    return merges


def write_clip_tokenizer(folder: str, words: list[str], max_length: int) -> None:
    """A CLIP BPE tokenizer that spells every word of `words` (lower-case letters and digits) as one token.

    vocab: every letter, every letter+'</w>', and every token the merges make. merges: learnt the way BPE is trained
    (merge the most frequent adjacent pair over the word list, ties by the pair's text, until every word is one
    token), so applying them by rank, as the tokenizer does, rebuilds each word whole. (Merging each word's prefixes
    in turn does not: "and"'s a+n merge ranks before "triangle"'s and splits it into six tokens.) Unknown characters
    map to <unk>.
    """
    os.makedirs(folder, exist_ok=True)
    letters = list(string.ascii_lowercase + string.digits)
    vocab: dict[str, int] = {}

    def add(tok):
        if tok not in vocab:
            vocab[tok] = len(vocab)

    for ch in letters:
        add(ch)
    for ch in letters:
        add(ch + "</w>")
    spelt = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words)) if w]
    merges = learn_bpe_merges(spelt)
    for a, b in merges:
        add(a + b)
    for special in ("<unk>", "<|startoftext|>", "<|endoftext|>"):
        add(special)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    cfg = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
           "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>",
           "do_lower_case": True}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f)


def write_t5_tokenizer(folder: str, words: list[str], max_length: int) -> None:
    """A T5 (Unigram) tokenizer whose vocabulary spells every word of `words` as one piece ('▁word'), with single
    letters and digits as a fallback: <pad> = 0, </s> = 1, <unk> = 2 as in T5."""
    from transformers import T5Tokenizer
    chars = string.ascii_lowercase + string.digits
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in sorted(set(words)) if w]
    vocab += [("▁" + c, -4.0) for c in chars] + [(c, -5.0) for c in chars]
    seen: set = set()
    vocab = [v for v in vocab if not (v[0] in seen or seen.add(v[0]))]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)
    tok.save_pretrained(folder)
