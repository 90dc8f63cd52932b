#!/usr/bin/env python3
"""The end-to-end benchmark's peers (issue 9): transformers in bf16/f16 and transformers + bitsandbytes NF4.

Two commands:

  peers.py make-synthetic --out DIR [--preset glm4-9b|tiny] [--device cuda]
      A GLM-4-9B-0414-shaped Glm4ForCausalLM with random weights, built on the device in bf16 and saved as
      safetensors with config.json, a tokenizer with the model's vocabulary size (a word-level vocabulary
      whose special tokens sit at GLM-4's ids, so that glm-run loads it) and bench-prompts.json: the token
      ids of the 128/512/2048-token prompts every runtime in the benchmark is given.

  peers.py peer --model DIR --variant bf16|f16|nf4-dq [--out FILE]
      Loads DIR with transformers (nf4-dq: bitsandbytes NF4, blocksize 64, double quant, as load_in_4bit
      does) and measures, on one prompt of bench-prompts.json at a time: load time, time to first token and
      prefill tokens/s (one new token), decode tokens/s at batch 1 (greedy, a fixed count of new tokens,
      eos ignored), device memory (the driver's used memory polled by a thread, minus what was used before
      the load; and torch's allocator peaks). Warm-up runs first; each figure is the median of --reps
      runs with its min and max. One JSON object, in the schema glm-bench reads (benches/src/record.rs).

Runs one variant per process, so that each starts with an empty device. Needs torch, transformers and (for
nf4-dq) bitsandbytes; see benches/run-gpu.sh for the GPU machine.
"""

import argparse
from pathlib import Path
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time

# The shared list of GLM's special tokens lives in models/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from glm_special_tokens import GLM4_SPECIAL_TOKENS  # noqa: E402

# GLM-4-9B-0414's config.json (THUDM/GLM-4-9B-0414), and a small model of the same layout for a quick
# check on the CPU.
PRESETS = {
    "glm4-9b": dict(
        hidden_size=4096,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=128,
        intermediate_size=13696,
        vocab_size=151552,
        max_position_embeddings=32768,
    ),
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=640,
        vocab_size=4096,
        max_position_embeddings=4096,
    ),
}
COMMON = dict(
    partial_rotary_factor=0.5,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    attention_bias=True,
    hidden_act="silu",
    tie_word_embeddings=False,
)
# GLM-4's added tokens in id order, from <|endoftext|> = 151329 (= vocab_size - 223) on; the rest of the
# 223 reserved ids are unused padding rows of the embedding.
SPECIAL_TOKENS = GLM4_SPECIAL_TOKENS[:10]
SPECIAL_SPAN = 223
PROMPT_LENGTHS = (128, 512, 2048)
VARIANTS = ("bf16", "f16", "nf4-dq")


def log(message):
    print(f"peers: {message}", file=sys.stderr, flush=True)


def first_special_id(vocab_size):
    return vocab_size - SPECIAL_SPAN


def tokenizer_json(vocab_size):
    """A word-level tokenizer.json: ids below the specials are `t<id>`, the specials are added tokens at
    GLM-4's ids, and raw text gets GLM's `[gMASK]<sop>` prefix."""
    first = first_special_id(vocab_size)
    vocab = {f"t{i}": i for i in range(vocab_size)}
    added = []
    for offset, content in enumerate(SPECIAL_TOKENS):
        del vocab[f"t{first + offset}"]
        vocab[content] = first + offset
        added.append(
            dict(
                id=first + offset,
                content=content,
                single_word=False,
                lstrip=False,
                rstrip=False,
                normalized=False,
                special=True,
            )
        )
    gmask, sop = first + 2, first + 4
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "[gMASK]", "type_id": 0}},
                {"SpecialToken": {"id": "<sop>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": "[gMASK]", "type_id": 0}},
                {"SpecialToken": {"id": "<sop>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {
                "[gMASK]": {"id": "[gMASK]", "ids": [gmask], "tokens": ["[gMASK]"]},
                "<sop>": {"id": "<sop>", "ids": [sop], "tokens": ["<sop>"]},
            },
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
    }


def bench_prompts(vocab_size, seed):
    """Prompt ids: `[gMASK]<sop>` then uniformly random ordinary tokens, one prompt per length."""
    first = first_special_id(vocab_size)
    rng = random.Random(seed)
    prompts = {}
    for length in PROMPT_LENGTHS:
        body = [rng.randrange(0, first) for _ in range(length - 2)]
        prompts[str(length)] = [first + 2, first + 4] + body
    return {"seed": seed, "prompts": prompts}


def write_json(path, value):
    """Writes through a temporary file, so that a failed run leaves no half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def make_synthetic(args):
    import torch
    from transformers import Glm4Config, Glm4ForCausalLM

    shape = dict(PRESETS[args.preset])
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    first = first_special_id(shape["vocab_size"])
    config = Glm4Config(
        **shape,
        **COMMON,
        # <|endoftext|>, <|user|>, <|observation|>, as GLM-4-9B-0414 has them.
        eos_token_id=[first, first + 7, first + 9],
        pad_token_id=first,
        architectures=["Glm4ForCausalLM"],
    )
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_default_dtype(dtype)
    with torch.device(args.device):
        model = Glm4ForCausalLM(config)
    model.eval()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    built = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    saved = time.perf_counter() - start - built
    with open(os.path.join(args.out, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json(shape["vocab_size"]), f)
    write_json(os.path.join(args.out, "bench-prompts.json"), bench_prompts(shape["vocab_size"], args.seed))
    params = sum(p.numel() for p in model.parameters())
    log(
        f"{args.out}: {args.preset} ({params / 1e6:,.1f} M parameters, {args.dtype}) built in {built:.1f} s "
        f"on {args.device}, saved in {saved:.1f} s"
    )


class DriverMemory:
    """Polls the driver's used device memory on a thread and keeps the maximum; `start()` takes the
    baseline (the used memory before the model exists, CUDA context included)."""

    def __init__(self, torch, interval_s=0.005):
        self.torch = torch
        self.interval_s = interval_s
        self.baseline = self.used()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def used(self):
        free, total = self.torch.cuda.mem_get_info()
        return total - free

    def sample(self):
        used = max(0, self.used() - self.baseline)
        self.peak = max(self.peak, used)
        return used

    def _poll(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval_s)

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.sample()


def stats(samples):
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": samples,
    }


def device_name(torch, device):
    """As glm-bench names it: the driver's name of a GPU, `CPU <model name> (<n> threads)` of a CPU."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model} ({os.cpu_count()} threads)"


def run_peer(args):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.generation.streamers import BaseStreamer

    cuda = args.device.startswith("cuda")
    compute = {"bf16": torch.bfloat16, "f16": torch.float16, "nf4-dq": getattr(torch, args.compute_dtype)}[
        args.variant
    ]
    with open(os.path.join(args.model, "bench-prompts.json")) as f:
        prompts = {int(k): v for k, v in json.load(f)["prompts"].items()}
    lengths = [n for n in args.prompt_lengths if n in prompts]
    missing = sorted(set(args.prompt_lengths) - set(lengths))
    if missing:
        sys.exit(f"peers: {args.model}/bench-prompts.json has no prompt of {missing} tokens; remake it")

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    memory = None
    if cuda:
        torch.cuda.init()
        torch.empty(1, device=args.device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        memory = DriverMemory(torch)

    kwargs = dict(dtype=compute, device_map=args.device)
    if args.variant == "nf4-dq":
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    model.eval()
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    load_memory = {}
    if memory:
        load_memory = {"driver_after_load_bytes": memory.sample(), "driver_peak_load_bytes": memory.peak}
    log(f"{args.variant}: loaded in {load_s:.1f} s")

    # Every run makes exactly the new tokens asked for: eos is not a stop.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = model.config.pad_token_id

    class Clock(BaseStreamer):
        """The time each new token is known on the host (the first put is the prompt)."""

        def __init__(self):
            self.times = []
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            value.cpu()
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def generate(ids, new_tokens):
        input_ids = torch.tensor([ids], device=args.device)
        clock = Clock()
        begin = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                streamer=clock,
            )
        made = out.shape[1] - input_ids.shape[1]
        if made != new_tokens or len(clock.times) != new_tokens:
            sys.exit(f"peers: asked for {new_tokens} new tokens, got {made}")
        ttft = clock.times[0] - begin
        decode = (new_tokens - 1) / (clock.times[-1] - clock.times[0]) if new_tokens > 1 else None
        return ttft, decode, out[0, input_ids.shape[1] :].tolist()

    prefill = []
    for length in lengths:
        for _ in range(args.warmup):
            generate(prompts[length], 1)
        ttfts = [generate(prompts[length], 1)[0] for _ in range(args.reps)]
        prefill.append(
            {"prompt_tokens": length, "ttft_s": stats(ttfts), "tok_s": stats([length / t for t in ttfts])}
        )
        log(f"{args.variant}: prefill {length} tokens: TTFT {statistics.median(ttfts) * 1e3:.1f} ms")
    decode_prompt = prompts[lengths[0]]
    for _ in range(args.warmup):
        generate(decode_prompt, args.new_tokens)
    rates, tokens = [], None
    for _ in range(args.reps):
        _, rate, tokens = generate(decode_prompt, args.new_tokens)
        rates.append(rate)
    log(f"{args.variant}: decode {statistics.median(rates):.1f} tokens/s")

    result = {
        "runtime": "transformers",
        "variant": args.variant,
        "dtype": {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}[compute],
        "device": device_name(torch, args.device),
        "model": os.path.abspath(args.model),
        "versions": versions,
        "warmup": args.warmup,
        "reps": args.reps,
        "load_s": load_s,
        "prefill": prefill,
        "decode": {
            "prompt_tokens": lengths[0],
            "new_tokens": args.new_tokens,
            "batch": 1,
            "tok_s": stats(rates),
            "tokens": tokens,
        },
        "memory": None,
    }
    if memory:
        memory.stop()
        result["memory"] = {
            **load_memory,
            "driver_peak_bytes": memory.peak,
            "allocator_peak_bytes": torch.cuda.max_memory_allocated(),
            "allocator_reserved_peak_bytes": torch.cuda.max_memory_reserved(),
            "method": "driver used memory (cudaMemGetInfo) polled every 5 ms minus the usage before the load "
            "(CUDA context excluded); allocator: torch.cuda.max_memory_allocated/reserved",
        }
    if args.out:
        write_json(args.out, result)
    else:
        json.dump(result, sys.stdout)
        print()


def gpu_env(args):
    """The device and driver as nvidia-smi names them, and the commit the binaries were built from (the
    first line of the pack's build-info.txt: `commit <hash>[ + uncommitted changes]`), for the report."""
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    name, driver, total = [x.strip() for x in subprocess.check_output(query, text=True).splitlines()[0].split(",")]
    env = {"device": name, "driver": driver, "memory_total": total}
    if args.build_info:
        with open(args.build_info) as f:
            lines = f.read().splitlines()
        env["commit"] = lines[0].removeprefix("commit ") if lines else None
        env["build"] = lines[1:]
    write_json(args.out, env)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("make-synthetic", help="a random GLM-4-9B-shaped checkpoint")
    synth.add_argument("--out", required=True)
    synth.add_argument("--preset", choices=sorted(PRESETS), default="glm4-9b")
    synth.add_argument("--device", default="cuda")
    synth.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--layers", type=int, help="override the preset's layer count (a quicker model of its shapes)")
    synth.set_defaults(run=make_synthetic)

    peer = commands.add_parser("peer", help="measure transformers (+ bitsandbytes) on a checkpoint")
    peer.add_argument("--model", required=True)
    peer.add_argument("--variant", choices=VARIANTS, required=True)
    peer.add_argument("--compute-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    peer.add_argument("--device", default="cuda")
    peer.add_argument(
        "--prompt-lengths", type=lambda s: [int(x) for x in s.split(",")], default=list(PROMPT_LENGTHS)
    )
    peer.add_argument("--new-tokens", type=int, default=32)
    peer.add_argument("--warmup", type=int, default=1)
    peer.add_argument("--reps", type=int, default=3)
    peer.add_argument("--out")
    peer.set_defaults(run=run_peer)

    env = commands.add_parser("gpu-env", help="device and driver from nvidia-smi, as JSON")
    env.add_argument("--out", required=True)
    env.add_argument("--build-info", help="build-info.txt of the pack (scripts/gpu-pack.sh)")
    env.set_defaults(run=gpu_env)

    args = parser.parse_args()
    if getattr(args, "new_tokens", 2) < 2 or getattr(args, "reps", 1) < 1:
        parser.error("--new-tokens must be at least 2 and --reps at least 1")
    args.run(args)


if __name__ == "__main__":
    main()
