"""GLM-4's added special tokens in the order of the real tokenizer (from <|endoftext|> = 151329 in
glm-4-9b-chat-hf on). The project's tokenizers (the demo model, the test fixtures, the benchmark's
synthetic model) each take a prefix of it, so their ids keep GLM's order."""

GLM4_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
]
