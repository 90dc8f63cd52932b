"""Reference numbers for the shipped demo model, from transformers + bitsandbytes on the CPU.

For each variant (f32, f16, NF4, NF4 with double quant) it reports the held-out perplexity on
heldout.txt and greedy continuations of a few prompts, and writes them to eval.json; the loss of every
held-out window and the top-1 ids of the first SUBSET_WINDOWS windows go to eval_windows.json. The Rust
tests compare glm-run against these numbers.

Perplexity method (glm-run must do the same to compare): ids = tokenizer(heldout.txt,
add_special_tokens=False); cut ids into n = (len(ids) - 1) // 512 non-overlapping windows of 512
inputs, each predicting the next 512 ids (no [gMASK]<sop> prefix, no KV cache across windows);
loss = mean next-token cross-entropy over all n * 512 predictions; perplexity = exp(loss).

Run: ~/.cache/glm-run/venv/bin/python models/demo/eval.py [--model DIR]
"""

import argparse
import hashlib
import json
import math
import platform
import time
from pathlib import Path

import bitsandbytes
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

HERE = Path(__file__).resolve().parent
WINDOW = 512
# The fixed subset of held-out windows (the first ones) that a debug-build test can score in seconds.
SUBSET_WINDOWS = 16
MAX_NEW_TOKENS = 48
# Raw prompts are encoded as the CLI's --raw mode does: tokenizer(prompt) adds [gMASK]<sop>.
RAW_PROMPTS = ["ROMEO.\n", "To be, or not to be", "KING.\nWhat news from France?\n\n"]
# Chat prompts go through the chat template with the generation prompt, as the CLI's default mode.
CHAT_PROMPTS = ["Who is there?", "What say you to my love?"]


def variants() -> dict[str, dict]:
    def nf4(double_quant: bool) -> BitsAndBytesConfig:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=torch.float32)

    return {
        "f32": {"dtype": torch.float32},
        "f16": {"dtype": torch.float16},
        "nf4": {"dtype": torch.float32, "quantization_config": nf4(False)},
        "nf4_double_quant": {"dtype": torch.float32, "quantization_config": nf4(True)},
    }


def use_portable_4bit_path(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights at the first forward and computes in
    bf16 whatever bnb_4bit_compute_dtype says, so its numbers would depend on the CPU. Take the path every
    other CPU takes (dequantize_4bit in f32, then an f32 linear), which is also what glm-run computes."""
    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


@torch.no_grad()
def heldout_loss(model, ids: list[int]) -> tuple[float, int, list[float], list[int]]:
    """Mean loss, predictions, the mean loss of each window, and the top-1 ids of the first
    SUBSET_WINDOWS windows (what the Rust tests score in a debug build)."""
    n = (len(ids) - 1) // WINDOW
    tokens = torch.tensor(ids[: n * WINDOW + 1])
    x = tokens[:-1].view(n, WINDOW)
    y = tokens[1:].view(n, WINDOW)
    total = 0.0
    window_losses, top1 = [], []
    for i in range(0, n, 8):
        logits = model(input_ids=x[i : i + 8]).logits.float()
        flat, targets = logits.reshape(-1, logits.shape[-1]), y[i : i + 8].reshape(-1)
        total += F.cross_entropy(flat, targets, reduction="sum").item()
        per_token = F.cross_entropy(flat, targets, reduction="none").double().view(-1, WINDOW)
        window_losses += per_token.mean(1).tolist()
        top1 += logits[: max(0, SUBSET_WINDOWS - i)].argmax(-1).reshape(-1).tolist()
    return total / (n * WINDOW), n * WINDOW, window_losses, top1


@torch.no_grad()
def greedy(model, tok, prompt_ids: list[int]) -> dict:
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                         output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, len(prompt_ids) :].tolist()
    # Top-1 minus top-2 logit at each step: where this is small, another runtime's rounding may pick
    # a different token, so tests should compare tokens only up to the first small margin.
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return {"tokens": new, "text": tok.decode(new, skip_special_tokens=False),
            "min_top2_margin": min(margins), "margins": [round(m, 4) for m in margins]}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=HERE)
    ap.add_argument("--out", type=Path, default=None, help="default: MODEL/eval.json")
    args = ap.parse_args()
    torch.manual_seed(0)

    tok = AutoTokenizer.from_pretrained(args.model)
    heldout_ids = tok((args.model / "heldout.txt").read_text(), add_special_tokens=False).input_ids
    prompts = [{"mode": "raw", "prompt": p, "ids": tok(p).input_ids} for p in RAW_PROMPTS]
    prompts += [{"mode": "chat", "prompt": p,
                 "ids": tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                return_dict=False)}
                for p in CHAT_PROMPTS]

    results, per_window = {}, {}
    for name, kwargs in variants().items():
        t0 = time.time()
        model = AutoModelForCausalLM.from_pretrained(args.model, device_map="cpu", **kwargs).eval()
        use_portable_4bit_path(model)
        loss, n_tokens, window_losses, top1 = heldout_loss(model, heldout_ids)
        per_window[name] = {"window_losses": window_losses, "top1_subset": top1}
        samples = [greedy(model, tok, p["ids"]) for p in prompts]
        results[name] = {"heldout_loss": loss, "heldout_perplexity": math.exp(loss),
                         "heldout_tokens_predicted": n_tokens, "greedy": samples,
                         "seconds": round(time.time() - t0, 1)}
        print(f"{name:17s} loss {loss:.4f}  ppl {math.exp(loss):.3f}  ({time.time() - t0:.0f}s)", flush=True)
        for p, s in zip(prompts, samples):
            print(f"   [{p['mode']}] {p['prompt']!r} -> {s['text']!r}", flush=True)
        del model

    base = results["f32"]["heldout_loss"]
    report = {
        "model": str(args.model.name),
        "model_safetensors_sha256": sha256(args.model / "model.safetensors"),
        "heldout_txt_sha256": sha256(args.model / "heldout.txt"),
        "method": {
            "perplexity": __doc__.split("Perplexity method")[1].split("Run:")[0].strip(" :\n").replace("\n", " "),
            "window": WINDOW,
            "greedy": f"do_sample=False, max_new_tokens={MAX_NEW_TOKENS}, stops at eos ids "
                      f"{tok.convert_tokens_to_ids(['<|endoftext|>', '<|user|>', '<|observation|>'])}",
            "variants": {
                "f32": "weights (stored f16) upcast to f32, f32 compute",
                "f16": "f16 weights and compute",
                "nf4": "bitsandbytes NF4, blocksize 64, no double quant, f32 compute (portable CPU path: "
                       "dequantize_4bit in f32, then an f32 linear, also on AVX512-BF16 CPUs); embeddings, "
                       "lm_head and norms unquantized (f32)",
                "nf4_double_quant": "as nf4 with double-quantized absmax (8-bit, blocks of 256)",
            },
        },
        "prompts": [{k: p[k] for k in ("mode", "prompt", "ids")} for p in prompts],
        "results": results,
        "loss_increase_vs_f32": {k: v["heldout_loss"] - base for k, v in results.items()},
        "software": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version()},
    }
    out = args.out or args.model / "eval.json"
    write_json(out, json.dumps(report, indent=2) + "\n")
    # Per-window detail, one line per variant (long id lists): the Rust tests' subset reference.
    detail = {"heldout_tokens": len(heldout_ids), "window": WINDOW, "subset_windows": SUBSET_WINDOWS,
              "heldout_txt_sha256": report["heldout_txt_sha256"],
              "model_safetensors_sha256": report["model_safetensors_sha256"]}
    lines = [json.dumps(detail)[:-1] + ', "variants": {']
    lines += [f"{json.dumps(k)}: {json.dumps(v)}," for k, v in per_window.items()]
    lines[-1] = lines[-1].rstrip(",")
    write_json(out.with_name(out.stem + "_windows.json"), "\n".join(lines) + "\n}}\n")


def write_json(path: Path, text: str) -> None:
    json.loads(text)  # never leave an unreadable file behind
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.rename(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
