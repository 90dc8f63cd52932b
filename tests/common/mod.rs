//! What the end-to-end tests share: where the models are, transformers' references for the demo model,
//! and fixture models made runnable by the CLI.

// Each test crate uses its own part of this module.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

pub const FIXTURES: [&str; 6] = ["glm", "glm4", "glm4v", "chatglm", "glm4-nf4", "chatglm-nf4"];

/// Below this top-1/top-2 logit margin another runtime's rounding may pick the other token, so greedy
/// tokens are compared with transformers' only up to the first step this close (eval.py's advice).
pub const NEAR_TIE: f64 = 1e-3;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn demo() -> PathBuf {
    root().join("models/demo")
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/models").join(name)
}

pub fn read_json(path: &Path) -> Value {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array of ids: {value}"))
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// One greedy continuation transformers recorded in models/demo/eval.json.
pub struct GreedyReference {
    /// "raw" or "chat".
    pub mode: String,
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
    /// Top-1 minus top-2 logit at each step.
    pub margins: Vec<f64>,
}

impl GreedyReference {
    /// The tokens up to the first near-tie (the whole continuation when there is none).
    pub fn trusted_tokens(&self) -> &[u32] {
        let n = self
            .margins
            .iter()
            .position(|&m| m < NEAR_TIE)
            .unwrap_or(self.tokens.len());
        &self.tokens[..n]
    }
}

/// Every greedy continuation of eval.json for `variant` (f32, f16, nf4, nf4_double_quant).
pub fn demo_greedy(variant: &str) -> Vec<GreedyReference> {
    let eval = read_json(&demo().join("eval.json"));
    let prompts = eval["prompts"].as_array().unwrap();
    let results = eval["results"][variant]["greedy"].as_array().unwrap();
    assert_eq!(prompts.len(), results.len());
    prompts
        .iter()
        .zip(results)
        .map(|(p, r)| GreedyReference {
            mode: p["mode"].as_str().unwrap().to_string(),
            prompt: p["prompt"].as_str().unwrap().to_string(),
            prompt_ids: ids(&p["ids"]),
            tokens: ids(&r["tokens"]),
            text: r["text"].as_str().unwrap().to_string(),
            margins: r["margins"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_f64().unwrap())
                .collect(),
        })
        .collect()
}

/// Copies the files of `from` (not recursive) into `to`.
pub fn copy_files(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// Where the word-level test tokenizer puts GLM's special tokens: the top of the fixtures' 320 ids.
const SPECIAL_TOKENS: [(&str, u32); 7] = [
    ("[gMASK]", 313),
    ("<sop>", 314),
    ("<|system|>", 315),
    ("<|user|>", 316),
    ("<|assistant|>", 317),
    ("<|observation|>", 318),
    ("<|endoftext|>", 319),
];

/// The fixture models ship no tokenizer (their tests feed ids). For the CLI, a copy of the fixture gets a
/// word-level tokenizer.json in which the word `t{id}` is token `id`, so `--raw "t87 t265"` feeds
/// exactly [87, 265] and generated ids read back as words.
pub fn fixture_with_tokenizer(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_files(&fixture(name), dir.path());
    let vocab: serde_json::Map<String, Value> = (0..320u32)
        .filter(|id| SPECIAL_TOKENS.iter().all(|&(_, s)| s != *id))
        .map(|id| (format!("t{id}"), json!(id)))
        .collect();
    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .map(|&(content, id)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
    });
    fs::write(
        dir.path().join("tokenizer.json"),
        serde_json::to_string(&tokenizer).unwrap(),
    )
    .unwrap();
    dir
}

/// A fixture's two prompts (as `t{id}` words) and transformers' 32 greedy tokens for each.
pub fn fixture_greedy(name: &str) -> Vec<(String, Vec<u32>)> {
    let tensors = candle_core::safetensors::load(
        fixture(name).join("reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let rows = |key: &str| -> Vec<Vec<u32>> {
        tensors[key]
            .to_vec2::<i64>()
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u32).collect())
            .collect()
    };
    rows("prompt_ids")
        .into_iter()
        .zip(rows("greedy_tokens"))
        .map(|(prompt, tokens)| {
            let words: Vec<String> = prompt.iter().map(|id| format!("t{id}")).collect();
            (words.join(" "), tokens)
        })
        .collect()
}

/// The eos ids a fixture stops on (config.json / generation_config.json), for cutting its reference.
pub fn eos_ids(dir: &Path) -> Vec<u32> {
    glm::Config::from_model_dir(dir).unwrap().eos_token_ids
}

/// `tokens` up to and including the first eos, as a generation that stops there returns them.
pub fn until_eos(tokens: &[u32], eos: &[u32], max: usize) -> Vec<u32> {
    let mut out = Vec::new();
    for &t in tokens.iter().take(max) {
        out.push(t);
        if eos.contains(&t) {
            break;
        }
    }
    out
}

/// Names of the entries of `dir`, sorted (to check nothing was left behind).
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
