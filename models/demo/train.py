"""Train the shipped demo model: a small Glm4ForCausalLM on Shakespeare (see models/README.md).

Inputs: the token streams and tokenizer written by make_tokenizer.py (models/demo/.data, models/demo).
Outputs in --out: model.safetensors (f16), config.json, generation_config.json, hparams.json (every
hyper-parameter, the data and software versions, the results), loss.csv and loss.svg.

Run (GPU):      python models/demo/train.py --out OUT
Smoke test:     python models/demo/train.py --tiny --out /tmp/demo-tiny   (CPU, seconds)
"""

import argparse
import csv
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import Glm4Config, Glm4ForCausalLM, GenerationConfig

HERE = Path(__file__).resolve().parent

# Dims are multiples of 64 so every linear weight splits into whole NF4 blocks of 64.
MODEL = dict(
    hidden_size=256,
    intermediate_size=640,  # 2.5x hidden: 7.3M parameters, a 14.7 MB f16 checkpoint
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA, as in GLM-4 (32 query heads share 2 kv heads)
    head_dim=64,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    attention_bias=True,
    tie_word_embeddings=False,
    rope_theta=10000.0,
    partial_rotary_factor=0.5,
)
TRAIN = dict(
    seed=1234,
    seq_len=512,
    batch_size=32,
    steps=3000,
    warmup_steps=200,
    lr=1e-3,
    min_lr=1e-4,  # cosine decay from lr to min_lr
    betas=[0.9, 0.95],
    weight_decay=0.1,  # on matrices only, not on norms, biases or embeddings
    grad_clip=1.0,
    dropout=0.2,  # on embeddings and on each residual branch, training only (hooks)
    chat_fraction=0.25,  # share of batch rows drawn from the chat-formatted dialogue stream
    eval_every=250,  # validation loss; the best step is the one saved
    log_every=50,
    max_minutes=4.5,  # wall-clock guard so the run fits the GPU lease
    autocast="bfloat16",  # on CUDA; f32 master weights
    save_dtype="float16",
)
TINY = dict(
    model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1),
    train=dict(seq_len=64, batch_size=4, steps=30, warmup_steps=5, eval_every=10, log_every=5),
)


def build_config(vocab_size: int, eos_ids: list[int], model: dict) -> Glm4Config:
    m = dict(model)
    rope = {"rope_type": "default", "rope_theta": m.pop("rope_theta"),
            "partial_rotary_factor": m.pop("partial_rotary_factor")}
    return Glm4Config(vocab_size=vocab_size, rope_parameters=rope, pad_token_id=eos_ids[0],
                      eos_token_id=eos_ids, bos_token_id=None, **m)


def add_dropout(model: Glm4ForCausalLM, p: float) -> None:
    """Residual dropout (as in GPT-2) without changing the architecture that gets saved."""
    def hook(module, _inputs, output):
        return F.dropout(output, p, module.training)

    model.model.embed_tokens.register_forward_hook(hook)
    for layer in model.model.layers:
        layer.post_self_attn_layernorm.register_forward_hook(hook)
        layer.post_mlp_layernorm.register_forward_hook(hook)


def lr_at(step: int, t: dict) -> float:
    if step < t["warmup_steps"]:
        return t["lr"] * (step + 1) / t["warmup_steps"]
    progress = (step - t["warmup_steps"]) / max(1, t["steps"] - t["warmup_steps"])
    return t["min_lr"] + 0.5 * (t["lr"] - t["min_lr"]) * (1 + math.cos(math.pi * min(1.0, progress)))


def sample_batch(streams, t, gen, device):
    n_chat = round(t["batch_size"] * t["chat_fraction"])
    rows = []
    for stream, n in ((streams["train_raw"], t["batch_size"] - n_chat), (streams["train_chat"], n_chat)):
        if n:
            starts = torch.randint(0, stream.numel() - t["seq_len"] - 1, (n,), generator=gen)
            idx = starts[:, None] + torch.arange(t["seq_len"] + 1)
            rows.append(stream[idx.to(stream.device)])
    batch = torch.cat(rows).to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


def lm_loss(model, x, y):
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def eval_loss(model, tokens: torch.Tensor, seq_len: int, autocast) -> float:
    """Mean next-token loss over non-overlapping windows of seq_len + 1 tokens."""
    model.eval()
    n = (tokens.numel() - 1) // seq_len
    x = tokens[: n * seq_len].view(n, seq_len)
    y = tokens[1 : n * seq_len + 1].view(n, seq_len)
    total = 0.0
    for i in range(0, n, 16):
        with autocast():
            total += lm_loss(model, x[i : i + 16], y[i : i + 16]).item() * x[i : i + 16].numel()
    model.train()
    return total / (n * seq_len)


def write_svg(rows: list[dict], path: Path) -> None:
    """A dependency-free loss plot: train loss line, validation points."""
    w, h, pad = 640, 360, 48
    steps = [r["step"] for r in rows]
    losses = [r["train_loss"] for r in rows] + [r["val_loss"] for r in rows if r["val_loss"] != ""]
    x_max, y_lo, y_hi = max(steps), math.floor(min(losses)), math.ceil(max(losses))

    def px(step, loss):
        return (pad + (w - 2 * pad) * step / x_max, h - pad - (h - 2 * pad) * (loss - y_lo) / (y_hi - y_lo))

    train = " ".join("%.1f,%.1f" % px(r["step"], r["train_loss"]) for r in rows)
    val = "".join('<circle cx="%.1f" cy="%.1f" r="3" fill="#d62728"/>' % px(r["step"], r["val_loss"])
                  for r in rows if r["val_loss"] != "")
    grid = ""
    for loss in range(y_lo, y_hi + 1):
        _, y = px(0, loss)
        grid += (f'<line x1="{pad}" y1="{y:.1f}" x2="{w - pad}" y2="{y:.1f}" stroke="#ddd"/>'
                 f'<text x="{pad - 6}" y="{y + 4:.1f}" text-anchor="end">{loss}</text>')
    for frac in (0, 0.25, 0.5, 0.75, 1):
        x, _ = px(x_max * frac, y_lo)
        grid += f'<text x="{x:.1f}" y="{h - pad + 18}" text-anchor="middle">{round(x_max * frac)}</text>'
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
        f'font-size="12"><rect width="100%" height="100%" fill="white"/>{grid}'
        f'<polyline points="{train}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>{val}'
        f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle">step</text>'
        f'<text x="{pad}" y="20">loss (nats/token): train (blue line), validation (red points)</text>'
        "</svg>\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE / ".data")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny model and a few steps, for a CPU smoke test")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model_hp, t = dict(MODEL), dict(TRAIN)
    if args.tiny:
        model_hp.update(TINY["model"])
        t.update(TINY["train"])
    meta = json.loads((args.data / "meta.json").read_text())
    torch.manual_seed(t["seed"])
    gen = torch.Generator().manual_seed(t["seed"])
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast("cuda", dtype=getattr(torch, t["autocast"]), enabled=on_cuda)

    streams = {name: torch.from_numpy(np.load(args.data / f"{name}.npy").astype(np.int64)).to(device)
               for name in ("train_raw", "train_chat", "val", "heldout")}

    config = build_config(meta["vocab_size"], meta["eos_token_ids"], model_hp)
    model = Glm4ForCausalLM(config).to(device)
    add_dropout(model, t["dropout"])
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=t["lr"], betas=tuple(t["betas"]), fused=on_cuda)
    print(f"params {n_params:,}  device {device}  torch {torch.__version__}  transformers "
          f"{transformers.__version__}", flush=True)

    rows, window, best = [], [], (float("inf"), -1, None)
    start = time.time()
    stopped_early = False
    step = 0
    for step in range(t["steps"]):
        lr = lr_at(step, t)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = sample_batch(streams, t, gen, device)
        with autocast():
            loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        window.append(loss.detach())
        last = step == t["steps"] - 1
        out_of_time = time.time() - start > 60 * t["max_minutes"]
        if (step + 1) % t["log_every"] == 0 or last or out_of_time:
            val = ""
            if (step + 1) % t["eval_every"] == 0 or last or out_of_time:
                val = eval_loss(model, streams["val"], t["seq_len"], autocast)
                if val < best[0]:
                    best = (val, step + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
            train_loss = torch.stack(window).mean().item()
            window = []
            rows.append({"step": step + 1, "tokens": (step + 1) * t["batch_size"] * t["seq_len"],
                         "lr": lr, "train_loss": train_loss, "val_loss": val,
                         "elapsed_s": round(time.time() - start, 1)})
            print(f"step {step + 1:5d}  lr {lr:.2e}  train {train_loss:.4f}  val {val if val == '' else f'{val:.4f}'}"
                  f"  {time.time() - start:.0f}s", flush=True)
        if out_of_time and not last:
            stopped_early = True
            break
    train_seconds = time.time() - start

    model.load_state_dict(best[2])
    model.float()
    heldout_f32 = eval_loss(model, streams["heldout"], t["seq_len"], lambda: torch.autocast("cpu", enabled=False))
    model.to(getattr(torch, t["save_dtype"])).to("cpu")
    model.generation_config = GenerationConfig(
        eos_token_id=meta["eos_token_ids"], pad_token_id=meta["eos_token_ids"][0],
        do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=200)
    model.save_pretrained(args.out)

    with open(args.out / "loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_svg(rows, args.out / "loss.svg")
    hparams = {
        "model": {"architecture": "Glm4ForCausalLM", "vocab_size": meta["vocab_size"], **model_hp,
                  "parameters": n_params},
        "train": t,
        "data": meta,
        "software": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(),
                     "device": torch.cuda.get_device_name(device) if on_cuda else platform.processor() or "cpu"},
        "result": {
            "steps_run": step + 1,
            "stopped_early_by_time_guard": stopped_early,
            "train_seconds": round(train_seconds, 1),
            "tokens_seen": (step + 1) * t["batch_size"] * t["seq_len"],
            "saved_step": best[1],
            "best_val_loss": best[0],
            "final_train_loss": rows[-1]["train_loss"],
            "heldout_loss_f32_before_f16_rounding": heldout_f32,
        },
    }
    (args.out / "hparams.json").write_text(json.dumps(hparams, indent=2) + "\n")
    print(json.dumps(hparams["result"], indent=2))


if __name__ == "__main__":
    main()
