//! Model configuration: config.json of each GLM release normalized into one [`Config`].
//!
//! Four layouts are read as published:
//! - `GlmForCausalLM` (glm-4-9b-chat-hf) and `Glm4ForCausalLM` (GLM-4-0414): keys at top level.
//! - `Glm4vForConditionalGeneration` (GLM-4.1V, AutoGLM-Phone-9B): the decoder's keys under `text_config`.
//! - `ChatGLMModel` / `ChatGLMForConditionalGeneration` (glm-4-9b-chat): its own key names
//!   (`num_layers`, `padded_vocab_size`, `ffn_hidden_size`, `kv_channels`, `multi_query_group_num`,
//!   `rope_ratio`, `layernorm_epsilon`, `add_qkv_bias`, ...).
//!
//! `rope_theta` and `partial_rotary_factor` may sit at top level (releases before transformers 5) or in
//! `rope_parameters` / `rope_scaling` (transformers 5); where both are, the nested ones count, as in
//! transformers 5 (which itself saves GlmConfig/Glm4Config with a stale top-level
//! `partial_rotary_factor` of 0.5). Keys a release leaves out take the defaults of the matching
//! transformers 5.17 config class (ChatGLM: of configuration_chatglm.py). Eos ids from
//! generation_config.json are merged in.

use std::fs;
use std::path::Path;

use candle_core::DType;
use serde::Deserialize;

use crate::error::{GlmError, Result};

/// Which published layout the checkpoint follows: decides tensor names and a few details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `GlmForCausalLM` (glm-4-9b-chat-hf): pre-norm decoder.
    Glm,
    /// `Glm4ForCausalLM` (GLM-4-0414): adds a norm on each sub-layer output.
    Glm4,
    /// Text decoder of `Glm4vForConditionalGeneration` (GLM-4.1V): Glm4 under `model.language_model.*`.
    Glm4v,
    /// The older ChatGLM layout of glm-4-9b-chat (`transformer.encoder.*`, fused `query_key_value`).
    ChatGlm,
}

impl Architecture {
    /// The class name as written in config.json.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Glm => "GlmForCausalLM",
            Architecture::Glm4 => "Glm4ForCausalLM",
            Architecture::Glm4v => "Glm4vForConditionalGeneration",
            Architecture::ChatGlm => "ChatGLMModel",
        }
    }

    /// Glm4-style decoder layers carry `post_self_attn_layernorm` and `post_mlp_layernorm`.
    pub fn has_post_sublayer_norms(self) -> bool {
        matches!(self, Architecture::Glm4 | Architecture::Glm4v)
    }

    fn from_class(name: &str) -> Option<Self> {
        match name {
            "GlmForCausalLM" | "GlmModel" => Some(Architecture::Glm),
            "Glm4ForCausalLM" | "Glm4Model" => Some(Architecture::Glm4),
            "Glm4vForConditionalGeneration" | "Glm4vModel" => Some(Architecture::Glm4v),
            "ChatGLMModel" | "ChatGLMForConditionalGeneration" => Some(Architecture::ChatGlm),
            _ => None,
        }
    }

    fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "glm" => Some(Architecture::Glm),
            "glm4" => Some(Architecture::Glm4),
            "glm4v" => Some(Architecture::Glm4v),
            "chatglm" => Some(Architecture::ChatGlm),
            _ => None,
        }
    }
}

/// One decoder configuration, whatever layout config.json used.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Fraction of each head's dimensions that rotary embeddings rotate (the first ones).
    pub partial_rotary_factor: f64,
    /// transformers' rotary `dim`, int(head_dim × partial_rotary_factor): the inverse frequencies are
    /// theta^(-2i / rope_dim) for i < ceil(rope_dim / 2). GLM-4.1V takes head_dim here from its head_dim
    /// key when there is one (its attention ignores the key, its rotary embedding does not).
    pub rope_dim: usize,
    /// q, k and v projections carry a bias (the output projection never does).
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    /// Every end-of-sequence id of config.json and generation_config.json, in that order, no repeats.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The dtype the checkpoint was saved in (`torch_dtype` or `dtype`), if config.json says.
    pub torch_dtype: Option<DType>,
    /// Present when the checkpoint holds bitsandbytes 4-bit weights.
    pub quantization: Option<nf4::QuantizationConfig>,
    /// ChatGLM only: `query_key_value` is [q | k | v] along its rows (`multi_query_attention`), rather
    /// than interleaved per head.
    pub chatglm_grouped_qkv: bool,
}

impl Config {
    /// Reads `config.json` of a model directory, and `generation_config.json` beside it when present.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("config.json");
        let text = fs::read_to_string(&path).map_err(|source| GlmError::Io {
            path: path.clone(),
            source,
        })?;
        let mut config = Self::from_json(&text, &path)?;
        let generation = dir.join("generation_config.json");
        if generation.exists() {
            let text = fs::read_to_string(&generation).map_err(|source| GlmError::Io {
                path: generation.clone(),
                source,
            })?;
            let raw: RawGeneration = parse_json(&text, &generation)?;
            let extra = raw
                .eos_token_id
                .map(|e| e.ids(&generation))
                .transpose()?
                .unwrap_or_default();
            merge_ids(&mut config.eos_token_ids, extra);
        }
        Ok(config)
    }

    /// Parses the text of a config.json; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: RawConfig = parse_json(text, path)?;
        let arch = raw.architecture(path)?;
        let config = match arch {
            Architecture::ChatGlm => raw.chatglm(path)?,
            Architecture::Glm4v => {
                let text_config = raw.text_config.as_deref().ok_or_else(|| GlmError::Config {
                    path: path.to_path_buf(),
                    message: "Glm4vForConditionalGeneration config has no text_config".into(),
                })?;
                let mut config = text_config.hf(arch, path)?;
                // transformers 5 reads tie_word_embeddings, eos and dtype at the outer level too.
                config.tie_word_embeddings |= raw.tie_word_embeddings.unwrap_or(false);
                if let Some(eos) = &raw.eos_token_id {
                    merge_ids(&mut config.eos_token_ids, eos.ids(path)?);
                }
                if config.torch_dtype.is_none() {
                    config.torch_dtype = raw.dtype(path)?;
                }
                if config.quantization.is_none() {
                    config.quantization = raw.quantization(path)?;
                }
                config
            }
            Architecture::Glm | Architecture::Glm4 => raw.hf(arch, path)?,
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Number of leading dimensions of each head that rotary embeddings rotate: a pair per inverse
    /// frequency, so [`Config::rope_dim`] rounded up to even (as in transformers and modeling_chatglm.py).
    pub fn rotary_dim(&self) -> usize {
        self.rope_dim.div_ceil(2) * 2
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let fail = |message: String| {
            Err(GlmError::Config {
                path: path.to_path_buf(),
                message,
            })
        };
        for (key, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if value == 0 {
                return fail(format!("{key} must be positive"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return fail(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !(self.partial_rotary_factor > 0.0 && self.partial_rotary_factor <= 1.0) {
            return fail(format!(
                "partial_rotary_factor must be in (0, 1], got {}",
                self.partial_rotary_factor
            ));
        }
        if self.rope_dim == 0 || self.rotary_dim() > self.head_dim {
            return fail(format!(
                "rotary dimension head_dim × partial_rotary_factor = {} must be positive and, rounded up \
                 to even, at most head_dim ({})",
                self.rope_dim, self.head_dim
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return fail(format!(
                "rope_theta must be positive, got {}",
                self.rope_theta
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return fail(format!(
                "rms_norm_eps must be ≥ 0, got {}",
                self.rms_norm_eps
            ));
        }
        Ok(())
    }
}

fn parse_json<T: for<'de> Deserialize<'de>>(text: &str, path: &Path) -> Result<T> {
    serde_json::from_str(text).map_err(|source| GlmError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Deserializes a key that is present, null or not, as Some (with `#[serde(default)]` for absent).
fn present<'de, D, T>(deserializer: D) -> std::result::Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::deserialize(deserializer).map(Some)
}

fn merge_ids(into: &mut Vec<u32>, extra: Vec<u32>) {
    for id in extra {
        if !into.contains(&id) {
            into.push(id);
        }
    }
}

/// `eos_token_id`: one id or a list (or null).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

impl TokenIds {
    fn ids(&self, path: &Path) -> Result<Vec<u32>> {
        let list = match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        };
        list.into_iter()
            .map(|id| {
                u32::try_from(id).map_err(|_| GlmError::Config {
                    path: path.to_path_buf(),
                    message: format!("token id {id} is not a valid id"),
                })
            })
            .collect()
    }
}

#[derive(Debug, Default, Deserialize)]
struct RawGeneration {
    eos_token_id: Option<TokenIds>,
}

/// `rope_parameters` (transformers 5) or `rope_scaling` (earlier releases).
#[derive(Debug, Default, Clone, Deserialize)]
struct RawRope {
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// Every key any of the four layouts uses; which ones matter depends on the architecture.
#[derive(Debug, Default, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    text_config: Option<Box<RawConfig>>,
    // transformers names
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    /// Outer None: absent; Some(None): null (Glm4vTextConfig tells the two apart).
    #[serde(default, deserialize_with = "present")]
    num_key_value_heads: Option<Option<usize>>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rope_parameters: Option<RawRope>,
    rope_scaling: Option<RawRope>,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
    eos_token_id: Option<TokenIds>,
    pad_token_id: Option<TokenIds>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    quantization_config: Option<serde_json::Value>,
    // ChatGLM names
    num_layers: Option<usize>,
    padded_vocab_size: Option<usize>,
    ffn_hidden_size: Option<usize>,
    kv_channels: Option<usize>,
    multi_query_attention: Option<bool>,
    multi_query_group_num: Option<usize>,
    rope_ratio: Option<f64>,
    layernorm_epsilon: Option<f64>,
    add_qkv_bias: Option<bool>,
    add_bias_linear: Option<bool>,
    rmsnorm: Option<bool>,
    apply_residual_connection_post_layernorm: Option<bool>,
    post_layer_norm: Option<bool>,
    seq_length: Option<usize>,
}

impl RawConfig {
    fn architecture(&self, path: &Path) -> Result<Architecture> {
        let unknown = |found: String| GlmError::UnknownArchitecture {
            path: path.to_path_buf(),
            found,
        };
        match (&self.architectures, &self.model_type) {
            (Some(names), _) if !names.is_empty() => names
                .iter()
                .find_map(|n| Architecture::from_class(n))
                .ok_or_else(|| unknown(format!("{names:?}"))),
            (_, Some(model_type)) => Architecture::from_model_type(model_type)
                .ok_or_else(|| unknown(format!("model_type {model_type:?}"))),
            _ => Err(unknown(
                "(neither \"architectures\" nor \"model_type\" is set)".into(),
            )),
        }
    }

    fn dtype(&self, path: &Path) -> Result<Option<DType>> {
        let Some(name) = self.torch_dtype.as_deref().or(self.dtype.as_deref()) else {
            return Ok(None);
        };
        let dtype = match name {
            "float32" => DType::F32,
            "float16" => DType::F16,
            "bfloat16" => DType::BF16,
            other => {
                return Err(GlmError::Config {
                    path: path.to_path_buf(),
                    message: format!(
                        "torch_dtype {other:?} is not supported (float32, float16 or bfloat16)"
                    ),
                })
            }
        };
        Ok(Some(dtype))
    }

    fn quantization(&self, path: &Path) -> Result<Option<nf4::QuantizationConfig>> {
        let Some(value) = &self.quantization_config else {
            return Ok(None);
        };
        let config_error = |message| GlmError::Config {
            path: path.to_path_buf(),
            message,
        };
        let config: nf4::QuantizationConfig = serde_json::from_value(value.clone())
            .map_err(|e| config_error(format!("quantization_config: {e}")))?;
        // Refuse what cannot run (another method, 8 bits, an unknown storage dtype) here, naming
        // config.json, rather than at the first weight it stores differently.
        config
            .quant_options()
            .map_err(|e| config_error(e.to_string()))?;
        Ok(Some(config))
    }

    fn eos(&self, path: &Path) -> Result<Vec<u32>> {
        Ok(match &self.eos_token_id {
            Some(ids) => ids.ids(path)?,
            None => Vec::new(),
        })
    }

    fn pad(&self, path: &Path) -> Result<Option<u32>> {
        Ok(match &self.pad_token_id {
            Some(ids) => ids.ids(path)?.first().copied(),
            None => None,
        })
    }

    /// The transformers layouts (Glm, Glm4, and Glm4v's text_config).
    fn hf(&self, arch: Architecture, path: &Path) -> Result<Config> {
        let require = |key: &str, value: Option<usize>| {
            value.ok_or_else(|| GlmError::Config {
                path: path.to_path_buf(),
                message: format!("missing key {key:?}"),
            })
        };
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(GlmError::Config {
                    path: path.to_path_buf(),
                    message: format!("hidden_act {act:?} is not supported (GLM uses \"silu\")"),
                });
            }
        }
        let hidden_size = require("hidden_size", self.hidden_size)?;
        let num_attention_heads = require("num_attention_heads", self.num_attention_heads)?;
        let glm4v = arch == Architecture::Glm4v;
        // transformers 5 takes rope_scaling over rope_parameters, and the keys in them over top-level ones.
        let rope = self.rope_scaling.as_ref().or(self.rope_parameters.as_ref());
        if let Some(kind) = rope.and_then(|r| r.rope_type.as_deref().or(r.kind.as_deref())) {
            // GLM-4.1V writes "default" (its mrope sections reduce to plain rotary for text).
            if kind != "default" && !(glm4v && kind == "mrope") {
                return Err(GlmError::Config {
                    path: path.to_path_buf(),
                    message: format!("rope type {kind:?} is not supported (only \"default\")"),
                });
            }
        }
        let rope_theta = rope
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0);
        // GlmConfig/Glm4Config default partial_rotary_factor to 0.5; Glm4vTextConfig rotates whole heads.
        let partial_rotary_factor = rope
            .and_then(|r| r.partial_rotary_factor)
            .or(self.partial_rotary_factor)
            .unwrap_or(if glm4v { 1.0 } else { 0.5 });
        // Glm4vTextAttention ignores head_dim (its rotary embedding does not); GlmConfig/Glm4Config
        // default it to 128.
        let (head_dim, rope_head_dim) = if glm4v {
            let natural = hidden_size / num_attention_heads;
            (natural, self.head_dim.unwrap_or(natural))
        } else {
            let head_dim = self.head_dim.unwrap_or(128);
            (head_dim, head_dim)
        };
        Ok(Config {
            architecture: arch,
            vocab_size: require("vocab_size", self.vocab_size)?,
            hidden_size,
            intermediate_size: require("intermediate_size", self.intermediate_size)?,
            num_hidden_layers: require("num_hidden_layers", self.num_hidden_layers)?,
            num_attention_heads,
            // The class default is 2; Glm4vTextConfig turns an explicit null into num_attention_heads.
            num_key_value_heads: match self.num_key_value_heads {
                Some(Some(n)) => n,
                Some(None) if glm4v => num_attention_heads,
                _ => 2,
            },
            head_dim,
            rms_norm_eps: self
                .rms_norm_eps
                .unwrap_or(if glm4v { 1e-5 } else { 1.5625e-7 }),
            rope_theta,
            partial_rotary_factor,
            rope_dim: (rope_head_dim as f64 * partial_rotary_factor) as usize,
            // Glm4vTextAttention always has q/k/v biases.
            attention_bias: glm4v || self.attention_bias.unwrap_or(true),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            max_position_embeddings: self.max_position_embeddings.unwrap_or(if glm4v {
                32768
            } else {
                131072
            }),
            eos_token_ids: self.eos(path)?,
            pad_token_id: self.pad(path)?,
            torch_dtype: self.dtype(path)?,
            quantization: self.quantization(path)?,
            chatglm_grouped_qkv: false,
        })
    }

    /// The ChatGLM layout (configuration_chatglm.py of glm-4-9b-chat).
    fn chatglm(&self, path: &Path) -> Result<Config> {
        let require = |key: &str, value: Option<usize>| {
            value.ok_or_else(|| GlmError::Config {
                path: path.to_path_buf(),
                message: format!("missing key {key:?}"),
            })
        };
        // Variants of the ChatGLM family that glm-4-9b-chat does not use and the decoder does not have.
        for (key, value, supported) in [
            ("rmsnorm", self.rmsnorm, true),
            ("add_bias_linear", self.add_bias_linear, false),
            (
                "apply_residual_connection_post_layernorm",
                self.apply_residual_connection_post_layernorm,
                false,
            ),
            ("post_layer_norm", self.post_layer_norm, true),
        ] {
            if value.is_some_and(|v| v != supported) {
                return Err(GlmError::Config {
                    path: path.to_path_buf(),
                    message: format!(
                        "{key} = {} is not supported (glm-4-9b-chat uses {supported})",
                        !supported
                    ),
                });
            }
        }
        let hidden_size = require("hidden_size", self.hidden_size)?;
        let num_attention_heads = require("num_attention_heads", self.num_attention_heads)?;
        let grouped = self.multi_query_attention.unwrap_or(false);
        // Keys left out take ChatGLMConfig's defaults (multi_query_group_num 1, kv_channels 128).
        let num_key_value_heads = if grouped {
            self.multi_query_group_num.unwrap_or(1)
        } else {
            num_attention_heads
        };
        let head_dim = self.kv_channels.unwrap_or(128);
        let vocab_size =
            self.padded_vocab_size
                .or(self.vocab_size)
                .ok_or_else(|| GlmError::Config {
                    path: path.to_path_buf(),
                    message: "missing key \"padded_vocab_size\"".into(),
                })?;
        Ok(Config {
            architecture: Architecture::ChatGlm,
            vocab_size,
            hidden_size,
            intermediate_size: require("ffn_hidden_size", self.ffn_hidden_size)?,
            num_hidden_layers: require("num_layers", self.num_layers.or(self.num_hidden_layers))?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: self.layernorm_epsilon.unwrap_or(1e-5),
            // modeling_chatglm.py: base = 10000 * rope_ratio, on half of each head.
            rope_theta: 10000.0 * self.rope_ratio.unwrap_or(1.0),
            partial_rotary_factor: 0.5,
            rope_dim: head_dim / 2,
            attention_bias: self.add_qkv_bias.unwrap_or(false),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            max_position_embeddings: self.seq_length.unwrap_or(2048),
            eos_token_ids: self.eos(path)?,
            pad_token_id: self.pad(path)?,
            torch_dtype: self.dtype(path)?,
            quantization: self.quantization(path)?,
            chatglm_grouped_qkv: grouped,
        })
    }
}
