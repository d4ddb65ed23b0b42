#!/usr/bin/env python3
"""Writes CLIPTokenizer golden cases (module "CLIPTokenizer") for dynamicid.

The reference is transformers' CLIPTokenizer (5.x: the tokenizers-backed
class; no ftfy) built from the merges file the library ships,
data/clip/bpe_simple_vocab_16e6.txt.gz: vocab.json and merges.txt are derived
from it exactly as CLIP derives its vocabulary, so no hub download is needed.
CLIPTokenizerFast (an alias in transformers 5) and the slow tokenizer of older
releases are checked where available; disagreements are reported, and the
golden keeps CLIPTokenizer's ids.

Cases (tests/data/golden/tokenizer/):
  prompts.safetensors     config "prompts": a few dozen strings -> input_ids (N, 77) I64
  malformed.safetensors   config "prompts_hex": raw byte strings (hex) that are not all
                          valid UTF-8; the reference tokenizes
                          bytes.decode("utf-8", errors="replace")
  toy_folder.safetensors  config "prompts" and "tokenizer_folder": "toy_tokenizer", a
                          diffusers-style folder (vocab.json, merges.txt,
                          tokenizer_config.json with pad_token "!") next to the case,
                          with a small vocabulary and shuffled ids

Usage (developer tool only; tests never run it):
    python3 tools/golden/make_tokenizer_goldens.py [--out tests/data/golden/tokenizer]
"""

import argparse
import gzip
import json
import random
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
MERGES_GZ = ROOT / "data" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
CONTEXT = 77
EXACT = {"atol": 0.0, "rtol": 0.0}

PROMPTS = [
    "",
    "a photo of a cat",
    "A Photo Of A CAT",
    "a portrait of sks person, smiling, 4k, highly detailed",
    "two people: a man and a woman; standing (outdoors) [sunset] {bokeh}",
    "it's a dog's life; they're here, we've won, I'm sure, you'll see, he'd go",
    "IT'S LOUD and it’s curly (typographic apostrophe)",
    "numbers 0123456789 and 3.14159, 1/2, 100%, $5, #1",
    "   leading and trailing   spaces   ",
    "tabs\tand\nnewlines\r\nand\u00a0no-break\u2003em\u3000ideographic spaces",
    "punctuation!!! ??? ... --- ,,, ;;; ::: @@@ ^^^ ~~~",
    "quotes \"double\" 'single' `back` «guillemets»",
    "café naïve résumé über straße ÆØÅ æøå",
    "e\u0301 composed by NFC, A\u030a too, and \u1e0a\u0323 reordered",
    "İstanbul and DİYARBAKIR",
    "ΟΔΥΣΣΕΥΣ and ΣΑΣ.",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀🎉👩‍👩‍👧 and ❤️ flags 🇫🇷",
    "mixed日本abc123def",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "arabic العربية hebrew עברית devanagari हिन्दी thai ภาษาไทย",
    "roman numeral Ⅻ and superscript ² and fraction ½ and circled ①",
    "zero\u200bwidth\ufeffmarks and soft\u00adhyphen",
    "control\x1cchars\x1fhere and \x85next-line",
    "<|startoftext|>explicit start and end<|endoftext|> tokens",
    "<|ENDOFTEXT|> upper-case special strings are plain text <|StartOfText|>",
    "a<|endoftext|>b <|endoftext|><|endoftext|>",
    "url https://example.com/path?query=1&x=y#frag and email a.b@c.de",
    "snake_case camelCase kebab-case CONSTANT_CASE",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ".join(["word"] * 80),
    ", ".join(f"tag{i}" for i in range(60)),
    "masterpiece, best quality, " * 12,
    "\u00c5ngstr\u00f6m \u212b kelvin \u212a ohm \u2126",
    "ǅungla ǈ ǋ titlecase digraphs",
    "\U0001d400\U0001d401 math bold and \U00010400 deseret",
]

MALFORMED = [
    b"valid then \xff invalid",
    b"\xc3\x28 bad continuation",
    b"truncated \xe2\x82",
    b"overlong \xc0\xaf and \xe0\x80\xaf",
    b"surrogate \xed\xa0\x80 half",
    b"above max \xf4\x90\x80\x80 and \xf5\x80",
    b"lone continuation \x80\x80 bytes",
    b"end in the middle \xf0\x9f\x98",
    b"caf\xe9 latin-1",
    b"\xfe\xff\x00 nul and bom bytes",
    "ok 😀 ok".encode("utf-8"),
]


def byte_characters():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_vocab_and_merges():
    lines = gzip.open(MERGES_GZ).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    vocab = byte_characters()
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    return vocab, merges


def write_folder(folder, vocab_ids, merges, pad_token=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab_ids, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    if pad_token is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad_token}), encoding="utf-8")


def encode(tok, prompts):
    out = tok(prompts, padding="max_length", max_length=CONTEXT, truncation=True)["input_ids"]
    return torch.tensor(out, dtype=torch.int64)


def cross_check(folder, prompts, ids):
    """Other reference tokenizers, where installed; reports disagreements."""
    others = {}
    fast = getattr(transformers, "CLIPTokenizerFast", None)
    if fast is not None and fast is not transformers.CLIPTokenizer:
        others["CLIPTokenizerFast"] = fast.from_pretrained(str(folder))
    for name, tok in others.items():
        got = encode(tok, prompts)
        bad = [p for p, a, b in zip(prompts, got, ids) if not torch.equal(a, b)]
        print(f"  {name}: {len(prompts) - len(bad)}/{len(prompts)} agree" + (f"; differ on {bad!r}" if bad else ""))
    if not others:
        print("  CLIPTokenizerFast is CLIPTokenizer in this transformers release")
    try:  # open_clip's tokenizer (the original CLIP code path, with ftfy when installed)
        import open_clip
        oc = open_clip.SimpleTokenizer()
        got = oc(prompts, context_length=CONTEXT)
        got = torch.where(got == 0, torch.full_like(got, 49407), got)  # open_clip pads with 0
        bad = [p for p, a, b in zip(prompts, got, ids) if not torch.equal(a, b)]
        print(f"  open_clip SimpleTokenizer: {len(prompts) - len(bad)}/{len(prompts)} agree"
              + (f"; differ on {bad!r}" if bad else ""))
    except Exception as e:  # noqa: BLE001 - informational only
        print(f"  open_clip check skipped: {e}")


def save(path, ids, config):
    cfg = {"module": "CLIPTokenizer", **config, **EXACT}
    save_file({"output.input_ids": ids.contiguous()}, str(path),
              metadata={"config": json.dumps(cfg), "transformers": transformers.__version__})
    print(f"wrote {path} ({ids.shape[0]} prompts)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "tests" / "data" / "golden" / "tokenizer"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    vocab, merges = clip_vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tokenizer"
        write_folder(folder, {t: i for i, t in enumerate(vocab)}, merges)
        tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
        assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407 and tok.pad_token_id == 49407

        ids = encode(tok, PROMPTS)
        cross_check(folder, PROMPTS, ids)
        save(out / "prompts.safetensors", ids, {"prompts": PROMPTS})

        decoded = [b.decode("utf-8", errors="replace") for b in MALFORMED]
        ids = encode(tok, decoded)
        save(out / "malformed.safetensors", ids, {"prompts_hex": [b.hex() for b in MALFORMED]})

    # A small vocabulary with shuffled ids and "!" as the pad token.
    rng = random.Random(7)
    toy_merges = merges[:400]
    toy_tokens = vocab[:512] + ["".join(m.split()) for m in toy_merges] + ["<|startoftext|>", "<|endoftext|>"]
    ids_perm = list(range(len(toy_tokens)))
    rng.shuffle(ids_perm)
    toy_folder = out / "toy_tokenizer"
    write_folder(toy_folder, {t: i for t, i in zip(toy_tokens, ids_perm)}, toy_merges, pad_token="!")
    toy = transformers.CLIPTokenizer.from_pretrained(str(toy_folder))
    toy_prompts = ["a photo of a cat", "The quick brown fox jumps over the lazy dog's back!", "", "über 42 😀",
                   " ".join(["the"] * 90)]
    save(out / "toy_folder.safetensors", encode(toy, toy_prompts),
         {"prompts": toy_prompts, "tokenizer_folder": "toy_tokenizer"})


if __name__ == "__main__":
    main()
