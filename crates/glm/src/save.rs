//! `--save-quantized`: a dense checkpoint rewritten as the NF4 checkpoint transformers + bitsandbytes
//! write (`save_pretrained` after `load_in_4bit`), loadable by them and by us.
//!
//! Tensors stream from the mmap'd input one at a time: the decoder's linear weights are quantized in
//! their stored dtype, everything else (embedding, norms, biases, lm_head, vision weights) is copied byte
//! for byte. The output directory is built under a temporary name and renamed when complete.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView, View};

use crate::config::{Architecture, Config};
use crate::error::{GlmError, Result};
use crate::loader::Checkpoint;

/// Files copied beside the weights when present.
const SIDE_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
    "preprocessor_config.json",
];

/// The linear projections bitsandbytes quantizes in a GLM decoder layer (lm_head stays dense).
const LINEAR_SUFFIXES: [&str; 6] = [
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_up_proj.weight",
    "mlp.down_proj.weight",
];

/// A tensor to write: borrowed from the input, or produced here.
enum OutTensor<'a> {
    Copied(TensorView<'a>),
    Quantized(nf4::StoredTensor),
}

impl View for &OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            OutTensor::Copied(v) => v.dtype(),
            OutTensor::Quantized(t) => t.dtype,
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            OutTensor::Copied(v) => v.shape(),
            OutTensor::Quantized(t) => &t.shape,
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            OutTensor::Copied(v) => Cow::Borrowed(v.data()),
            OutTensor::Quantized(t) => Cow::Borrowed(&t.data),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            OutTensor::Copied(v) => v.data().len(),
            OutTensor::Quantized(t) => t.data.len(),
        }
    }
}

/// Writes `dir`'s checkpoint quantized with `opts` into the new directory `out`; returns the bytes of
/// the written safetensors file.
pub fn save_quantized(dir: &Path, out: &Path, opts: &nf4::QuantOptions) -> Result<u64> {
    let config = Config::from_model_dir(dir)?;
    if config.quantization.is_some() {
        return Err(GlmError::Input(format!(
            "{} is already quantized (config.json has quantization_config): nothing to do",
            dir.display()
        )));
    }
    if config.architecture == Architecture::ChatGlm {
        return Err(GlmError::Unsupported(format!(
            "{}: --save-quantized writes the transformers layouts (GlmForCausalLM, Glm4ForCausalLM, \
             Glm4vForConditionalGeneration); for the ChatGLM layout use the converted glm-4-9b-chat-hf",
            dir.display()
        )));
    }
    let staging = prepare_output(out)?;
    let result = write_into(dir, &staging, &config, opts);
    let finished = result.and_then(|bytes| {
        std::fs::rename(&staging, out).map_err(|source| GlmError::Io {
            path: out.to_path_buf(),
            source,
        })?;
        Ok(bytes)
    });
    if finished.is_err() {
        // Best effort: the error that matters is the one returned.
        let _ = std::fs::remove_dir_all(&staging);
    }
    finished
}

/// Checks `out` can be created (absent, or an empty directory, which is removed) and returns the
/// staging directory beside it.
fn prepare_output(out: &Path) -> Result<PathBuf> {
    let io = |path: &Path, source| GlmError::Io {
        path: path.to_path_buf(),
        source,
    };
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(|e| io(out, e))?;
        if entries.next().is_some() {
            return Err(GlmError::Input(format!(
                "{} exists and is not empty: choose a new directory for --save-quantized",
                out.display()
            )));
        }
        std::fs::remove_dir(out).map_err(|e| io(out, e))?;
    }
    let name = out
        .file_name()
        .ok_or_else(|| GlmError::Input(format!("{} is not a directory name", out.display())))?;
    let staging = out.with_file_name(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::create_dir_all(&staging).map_err(|e| io(&staging, e))?;
    Ok(staging)
}

fn write_into(
    dir: &Path,
    staging: &Path,
    config: &Config,
    opts: &nf4::QuantOptions,
) -> Result<u64> {
    let checkpoint = Checkpoint::open(dir)?;
    let mut names: Vec<&str> = checkpoint.tensor_names().collect();
    names.sort_unstable();
    let mut tensors: Vec<(String, OutTensor)> = Vec::with_capacity(names.len());
    let mut compute_dtype = None;
    for name in names {
        let view = checkpoint.view(name)?;
        if !is_decoder_linear(name) {
            tensors.push((name.to_string(), OutTensor::Copied(view)));
            continue;
        }
        let packed = quantize_view(name, &view, opts).map_err(|source| GlmError::Nf4 {
            name: name.to_string(),
            path: checkpoint.file_of(name).unwrap_or(dir).to_path_buf(),
            source: Box::new(source),
        })?;
        compute_dtype.get_or_insert(packed.dtype());
        tensors.extend(
            packed
                .to_safetensors_tensors(name)
                .into_iter()
                .map(|(k, t)| (k, OutTensor::Quantized(t))),
        );
    }
    let Some(compute_dtype) = compute_dtype else {
        return Err(GlmError::Input(format!(
            "{}: no decoder linear weight found to quantize",
            dir.display()
        )));
    };
    let weights = staging.join("model.safetensors");
    let refs: Vec<(&str, &OutTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    nf4::save_file(&weights, refs)
        .map_err(|e| GlmError::Input(format!("writing {}: {e}", weights.display())))?;
    write_config(dir, staging, config, opts, compute_dtype)?;
    for file in SIDE_FILES {
        let from = dir.join(file);
        if from.is_file() {
            std::fs::copy(&from, staging.join(file))
                .map_err(|source| GlmError::Io { path: from, source })?;
        }
    }
    std::fs::metadata(&weights)
        .map(|m| m.len())
        .map_err(|source| GlmError::Io {
            path: weights,
            source,
        })
}

/// A decoder layer's linear weight (not lm_head, not the vision tower).
fn is_decoder_linear(name: &str) -> bool {
    let in_text_layers =
        name.starts_with("model.layers.") || name.starts_with("model.language_model.layers.");
    in_text_layers && LINEAR_SUFFIXES.iter().any(|s| name.ends_with(s))
}

fn quantize_view(
    name: &str,
    view: &TensorView,
    opts: &nf4::QuantOptions,
) -> std::result::Result<nf4::Nf4Tensor, nf4::Nf4Error> {
    let bytes = view.data();
    let shape = view.shape();
    match view.dtype() {
        Dtype::F32 => {
            nf4::Nf4Tensor::quantize_f32(&le_values(bytes, f32::from_le_bytes), shape, opts)
        }
        Dtype::F16 => nf4::Nf4Tensor::quantize_f16(
            &le_values(bytes, |b| half::f16::from_bits(u16::from_le_bytes(b))),
            shape,
            opts,
        ),
        Dtype::BF16 => nf4::Nf4Tensor::quantize_bf16(
            &le_values(bytes, |b| half::bf16::from_bits(u16::from_le_bytes(b))),
            shape,
            opts,
        ),
        found => Err(nf4::Nf4Error::WrongDtype {
            key: name.to_string(),
            found,
            expected: "f32, f16 or bf16 (the dtypes 4-bit quantization reads)",
        }),
    }
}

/// Little-endian values of `N` bytes each.
fn le_values<T, const N: usize>(bytes: &[u8], from: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| from(c.try_into().expect("chunks_exact yields N bytes")))
        .collect()
}

/// config.json as given, plus the `quantization_config` transformers writes for these options.
fn write_config(
    dir: &Path,
    staging: &Path,
    config: &Config,
    opts: &nf4::QuantOptions,
    compute_dtype: nf4::FloatDtype,
) -> Result<()> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| GlmError::Io {
        path: path.clone(),
        source,
    })?;
    let mut json: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| GlmError::Json {
            path: path.clone(),
            source,
        })?;
    let mut quant = nf4::QuantizationConfig::new(opts, compute_dtype);
    if config.architecture == Architecture::Glm4v {
        // Vision weights are copied dense; say so, as transformers does for modules it skips.
        quant.llm_int8_skip_modules = Some(vec!["lm_head".into(), "model.visual".into()]);
    }
    quant.insert_into(&mut json).map_err(|e| GlmError::Config {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let out = staging.join("config.json");
    let body = serde_json::to_string_pretty(&json).map_err(|source| GlmError::Json {
        path: out.clone(),
        source,
    })?;
    std::fs::write(&out, body + "\n").map_err(|source| GlmError::Io { path: out, source })
}
