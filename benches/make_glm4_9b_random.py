"""A GLM-4-9B-shaped checkpoint (glm-4-9b-chat-hf's exact config) with random bf16 weights, built on the GPU and
saved as safetensors shards, with the demo model's tokenizer (ids < 4096). lm_head rows of ids >= 4096 are zeroed
so that greedy picks ids the tokenizer knows."""
import shutil, sys, time
import torch
from transformers import GlmConfig, GlmForCausalLM

out = sys.argv[1]
config = GlmConfig(
    vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
    num_attention_heads=32, num_key_value_heads=2, head_dim=128, partial_rotary_factor=0.5,
    max_position_embeddings=131072, rms_norm_eps=1.5625e-07, rope_theta=10000.0, attention_bias=True,
    tie_word_embeddings=False, pad_token_id=151329, eos_token_id=[151329, 151336, 151338],
)
t = time.time()
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    model = GlmForCausalLM(config)
with torch.no_grad():
    model.lm_head.weight[4096:].zero_()
model.save_pretrained(out, max_shard_size="5GB")
for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
    shutil.copy(f"models/demo/{f}", out)
print(f"built and saved in {time.time() - t:.1f} s")
