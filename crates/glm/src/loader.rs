//! Reading checkpoints: memory-mapped safetensors (one file or shards), names mapped per layout.
//!
//! [`Checkpoint`] maps every file and parses its header once; a tensor is copied out of the map only
//! when the decoder asks for it, converted to the compute dtype on the way, so the whole file is never
//! held twice. [`WeightLoader`] knows each layout's names (transformers' `model.*`, GLM-4.1V's
//! `model.language_model.*`, ChatGLM's `transformer.encoder.*` with its fused `query_key_value`) and
//! checks every shape against config.json.
//!
//! Loading streams: one tensor at a time goes from the map to the device, and a weight quantized at
//! load is quantized there (on a CUDA device by our kernel) and its full-precision copy dropped before
//! the next is read, so the peak is the final footprint plus about one tensor, on the device and in
//! host memory alike. [`LoadProgress`] hears the bytes read.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, Metadata, TensorView};
use safetensors::SafeTensors;
use serde::Deserialize;

use crate::config::{Architecture, Config};
use crate::error::{GlmError, Result};
use crate::gpu::MemoryTracker;
use crate::linear::Linear;

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";
/// A 4-bit output projection with more weights than this (256 Mi, 512 MiB in bf16) is quantized in host
/// memory rather than on the GPU, so that its full-precision copy never sits on the device.
const HOST_QUANTIZE_MIN_ELEMENTS: usize = 256 << 20;

/// One memory-mapped safetensors file with its parsed header.
struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8-byte length prefix + JSON header).
    data_start: usize,
    metadata: Metadata,
}

impl SafetensorsFile {
    fn open(path: PathBuf) -> Result<Self> {
        let file = File::open(&path).map_err(|source| GlmError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the map is read-only and lives as long as this struct; like every mmap-based loader
        // (candle, safetensors) we rely on the checkpoint not being truncated while it is loaded.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| GlmError::Io {
            path: path.clone(),
            source,
        })?;
        // read_metadata validates the header, every offset and the file length.
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| GlmError::Safetensors {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            path,
            mmap,
            data_start: 8 + header_len,
            metadata,
        })
    }

    /// Drops the mapped pages of `name` from this process once its data has been copied out, so that
    /// the resident memory of a load stays about one tensor (the pages stay in the page cache).
    fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(info) = self.metadata.info(name) {
            let (start, end) = info.data_offsets;
            // SAFETY: the map is read-only and private: dropped pages are read again from the
            // unchanged file if touched, so every view of them still sees the same bytes.
            // Only a hint: the load is correct without it.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    self.data_start + start,
                    end - start,
                )
            };
        }
    }

    fn view(&self, name: &str) -> Option<TensorView<'_>> {
        let info = self.metadata.info(name)?;
        let (start, end) = info.data_offsets;
        let data = &self.mmap[self.data_start + start..self.data_start + end];
        // The header was validated, so dtype, shape and data length agree.
        TensorView::new(info.dtype, info.shape.clone(), data).ok()
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// The safetensors files of a model directory: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` lists.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    locations: HashMap<String, usize>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field(
                "files",
                &self.files.iter().map(|f| &f.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.locations.len())
            .finish()
    }
}

impl Checkpoint {
    /// Maps the checkpoint files of `dir` and reads their headers (no tensor data is read).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index_path = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let (files, expected) = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| GlmError::Io {
                path: index_path.clone(),
                source,
            })?;
            let index: ShardIndex =
                serde_json::from_str(&text).map_err(|source| GlmError::Json {
                    path: index_path.clone(),
                    source,
                })?;
            let mut shard_names: Vec<&String> = index.weight_map.values().collect();
            shard_names.sort();
            shard_names.dedup();
            let files = shard_names
                .into_iter()
                .map(|name| {
                    let path = dir.join(name);
                    if !path.exists() {
                        return Err(GlmError::MissingShard {
                            path,
                            index: index_path.clone(),
                        });
                    }
                    SafetensorsFile::open(path)
                })
                .collect::<Result<Vec<_>>>()?;
            (files, Some(index.weight_map))
        } else if single.exists() {
            (vec![SafetensorsFile::open(single)?], None)
        } else {
            return Err(GlmError::NoCheckpoint { dir });
        };
        let mut locations = HashMap::new();
        for (i, file) in files.iter().enumerate() {
            for name in file.metadata.tensors().keys() {
                locations.entry(name.clone()).or_insert(i);
            }
        }
        // Every tensor the index promises must be in the shard it names.
        for (name, shard) in expected.iter().flatten() {
            let path = dir.join(shard);
            let found = locations.get(name).map(|&i| &files[i].path);
            if found != Some(&path) {
                return Err(GlmError::MissingTensor {
                    name: name.clone(),
                    location: format!("{} (listed there by {INDEX_FILE})", path.display()),
                });
            }
        }
        Ok(Self {
            dir,
            files,
            locations,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.locations.contains_key(name)
    }

    /// Releases the mapped pages of `name` after its data was copied out (see [`SafetensorsFile::release`]).
    fn release(&self, name: &str) {
        if let Some(&i) = self.locations.get(name) {
            self.files[i].release(name);
        }
    }

    /// Bytes of the stored tensor `name` (0 when absent).
    fn stored_bytes(&self, name: &str) -> u64 {
        self.locations
            .get(name)
            .and_then(|&i| self.files[i].metadata.info(name))
            .map_or(0, |info| (info.data_offsets.1 - info.data_offsets.0) as u64)
    }

    /// Every tensor name in the checkpoint.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.locations.keys().map(String::as_str)
    }

    /// The file holding `name`, or None.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.locations
            .get(name)
            .map(|&i| self.files[i].path.as_path())
    }

    /// A zero-copy view of `name` into the mapped file.
    pub fn view(&self, name: &str) -> Result<TensorView<'_>> {
        self.locations
            .get(name)
            .and_then(|&i| self.files[i].view(name))
            .ok_or_else(|| GlmError::MissingTensor {
                name: name.to_string(),
                location: self.describe(),
            })
    }

    /// The checkpoint's files, for messages.
    fn describe(&self) -> String {
        match self.files.as_slice() {
            [one] => one.path.display().to_string(),
            _ => format!(
                "the {} shards of {}",
                self.files.len(),
                self.dir.join(INDEX_FILE).display()
            ),
        }
    }
}

/// Copies a float tensor out of the map into a candle tensor of its stored dtype.
fn view_to_tensor(name: &str, path: &Path, view: &TensorView, device: &Device) -> Result<Tensor> {
    let shape = view.shape().to_vec();
    let bytes = view.data();
    // Safetensors data is little-endian, as is every target we build for. Aligned data (the usual
    // case) goes straight from the map to the device; unaligned data is first copied into an aligned
    // buffer, since mapped data need not be aligned.
    fn typed<T: bytemuck::Pod>(bytes: &[u8]) -> Cow<'_, [T]> {
        match bytemuck::try_cast_slice(bytes) {
            Ok(aligned) => Cow::Borrowed(aligned),
            Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
        }
    }
    let tensor = match view.dtype() {
        StDtype::F32 => Tensor::from_slice(&typed::<f32>(bytes), shape, device)?,
        StDtype::F16 => Tensor::from_slice(&typed::<f16>(bytes), shape, device)?,
        StDtype::BF16 => Tensor::from_slice(&typed::<bf16>(bytes), shape, device)?,
        other => {
            return Err(GlmError::UnsupportedDtype {
                name: name.to_string(),
                path: path.to_path_buf(),
                found: format!("{other:?}"),
                expected: "F32, F16 or BF16",
            })
        }
    };
    Ok(tensor)
}

/// Norms of a decoder layer.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LayerNorm {
    Input,
    PostAttention,
    /// Glm4 only.
    PostSelfAttn,
    /// Glm4 only.
    PostMlp,
}

/// Linear layers of a decoder layer other than q/k/v (see [`WeightLoader::qkv`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum LayerProj {
    O,
    GateUp,
    Down,
}

/// How a load turns checkpoint tensors into modules: compute dtype, device, and NF4 handling.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Dtype of activations and dense weights (f32, f16 or bf16).
    pub dtype: DType,
    pub device: Device,
    /// Quantize the decoder's linear weights of a dense checkpoint to 4 bits at load, as
    /// transformers+bitsandbytes `load_in_4bit` does (embedding and lm_head stay dense). Ignored for a
    /// checkpoint that is already quantized.
    pub quantize: Option<nf4::QuantOptions>,
    /// With 4-bit weights (quantized at load or stored so), quantize the lm_head too: it is the
    /// largest single weight of a GLM (vocabulary × hidden). A tied head gets its own 4-bit copy.
    pub quantize_lm_head: bool,
    /// Keep the embedding table in host memory: each step looks its rows up on the CPU and copies
    /// them to the device. A tied lm_head then gets its own copy on the device.
    pub embeddings_on_host: bool,
    /// Tokens the KV cache is allocated for once, at the first step, and written in place; None: the
    /// cache grows by concatenation at each step.
    pub kv_capacity: Option<usize>,
    /// Told the bytes read so far after each tensor.
    pub progress: Option<LoadProgress>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            quantize: None,
            quantize_lm_head: false,
            embeddings_on_host: false,
            kv_capacity: None,
            progress: None,
        }
    }
}

/// A callback told `(bytes read, bytes to read)` after each tensor a load reads from the checkpoint.
#[derive(Clone)]
pub struct LoadProgress(Arc<dyn Fn(u64, u64) + Send + Sync>);

impl LoadProgress {
    pub fn new(callback: impl Fn(u64, u64) + Send + Sync + 'static) -> Self {
        Self(Arc::new(callback))
    }
}

impl std::fmt::Debug for LoadProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadProgress(..)")
    }
}

/// Builds the decoder's tensors from a [`Checkpoint`], by logical name, in the requested dtype.
pub(crate) struct WeightLoader<'a> {
    checkpoint: &'a Checkpoint,
    config: &'a Config,
    options: &'a LoadOptions,
    /// `model.`, or `model.language_model.` for GLM-4.1V (unused for ChatGLM).
    prefix: &'static str,
    /// Names read so far, to report what the checkpoint holds beyond the decoder.
    used: RefCell<HashSet<String>>,
    /// Bytes read so far, and in all (every tensor but the vision tower's).
    bytes_read: RefCell<u64>,
    bytes_total: u64,
    /// Device memory, sampled after each tensor (CUDA only).
    memory: Option<MemoryTracker>,
}

impl<'a> WeightLoader<'a> {
    pub(crate) fn new(
        checkpoint: &'a Checkpoint,
        config: &'a Config,
        options: &'a LoadOptions,
    ) -> Result<Self> {
        if !matches!(options.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(GlmError::Unsupported(format!(
                "compute dtype {:?} is not supported: use f32, f16 or bf16",
                options.dtype
            )));
        }
        let prefix = match config.architecture {
            // Checkpoints saved before transformers' VLM refactor keep the text decoder at `model.*`.
            Architecture::Glm4v
                if !checkpoint.contains("model.language_model.embed_tokens.weight")
                    && checkpoint.contains("model.embed_tokens.weight") =>
            {
                "model."
            }
            Architecture::Glm4v => "model.language_model.",
            _ => "model.",
        };
        let mut loader = Self {
            checkpoint,
            config,
            options,
            prefix,
            used: RefCell::new(HashSet::new()),
            bytes_read: RefCell::new(0),
            bytes_total: 0,
            memory: MemoryTracker::start(&options.device)?,
        };
        loader.bytes_total = checkpoint
            .tensor_names()
            .filter(|n| !is_vision(n))
            .map(|n| checkpoint.stored_bytes(n))
            .sum::<u64>()
            // A tied head of its own reads the embedding table twice.
            + if config.tie_word_embeddings && loader.separate_lm_head() {
                checkpoint.stored_bytes(&loader.embed_name())
            } else {
                0
            };
        Ok(loader)
    }

    /// Ends the load: the device's usage is sampled and the progress callback told it is complete.
    pub(crate) fn finish(self) -> Result<(Option<MemoryTracker>, Vec<String>)> {
        if let Some(memory) = &self.memory {
            memory.finish_load()?;
        }
        if let Some(progress) = &self.options.progress {
            (progress.0)(self.bytes_total, self.bytes_total);
        }
        let notes = self.unused_report();
        Ok((self.memory, notes))
    }

    /// Counts `name` as read and tells the progress callback.
    fn mark_read(&self, name: &str) {
        self.used.borrow_mut().insert(name.to_string());
        let read = {
            let mut read = self.bytes_read.borrow_mut();
            *read += self.checkpoint.stored_bytes(name);
            *read
        };
        if let Some(progress) = &self.options.progress {
            (progress.0)(read.min(self.bytes_total), self.bytes_total);
        }
    }

    /// Samples the device memory where a load holds the most: a tensor and what it becomes.
    fn sample_memory(&self) -> Result<()> {
        if let Some(memory) = &self.memory {
            memory.sample()?;
        }
        Ok(())
    }

    pub(crate) fn config(&self) -> &Config {
        self.config
    }

    pub(crate) fn dtype(&self) -> DType {
        self.options.dtype
    }

    pub(crate) fn device(&self) -> &Device {
        &self.options.device
    }

    fn chatglm(&self) -> bool {
        self.config.architecture == Architecture::ChatGlm
    }

    /// Reads `name` onto the device, checks its shape and converts it to the compute dtype.
    fn dense(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.dense_as(name, shape, Some(self.options.dtype), &self.options.device)
    }

    /// Dtype to read a weight in that is to be quantized: on the CPU f32 (exact for any stored float
    /// type), so quantization sees the checkpoint's own values; on a CUDA device the stored dtype,
    /// which the quantize kernel widens to f32 itself, so the transient copy stays as small as stored.
    fn to_quantize_dtype(&self) -> Option<DType> {
        match self.options.device {
            Device::Cpu => Some(DType::F32),
            _ => None,
        }
    }

    /// Dtype to read decoder linear weights in: see [`Self::to_quantize_dtype`] when they are to be
    /// quantized, else the compute dtype.
    fn linear_weight_dtype(&self) -> Option<DType> {
        if self.quantize_at_load().is_some() {
            self.to_quantize_dtype()
        } else {
            Some(self.options.dtype)
        }
    }

    /// The options to quantize decoder linear weights with at load: none for a checkpoint stored in 4 bits,
    /// whose dense ones were left so on purpose (`llm_int8_skip_modules`).
    fn quantize_at_load(&self) -> Option<&nf4::QuantOptions> {
        self.options
            .quantize
            .as_ref()
            .filter(|_| self.config.quantization.is_none())
    }

    /// Reads `name` onto `device`, checks its shape and converts it to `dtype` (None: as stored).
    fn dense_as(
        &self,
        name: &str,
        shape: &[usize],
        dtype: Option<DType>,
        device: &Device,
    ) -> Result<Tensor> {
        let view = self.checkpoint.view(name)?;
        let path = self.path_of(name);
        if view.shape() != shape {
            return Err(GlmError::ShapeMismatch {
                name: name.to_string(),
                path,
                found: view.shape().to_vec(),
                expected: shape.to_vec(),
            });
        }
        self.mark_read(name);
        let stored = view_to_tensor(name, &path, &view, device)?;
        self.checkpoint.release(name);
        let converted = match dtype {
            Some(dtype) => stored.to_dtype(dtype)?,
            None => stored.clone(),
        };
        // Both copies are alive here: the load's peak.
        self.sample_memory()?;
        Ok(converted)
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.checkpoint
            .file_of(name)
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.checkpoint.dir().to_path_buf())
    }

    fn embed_name(&self) -> String {
        if self.chatglm() {
            "transformer.embedding.word_embeddings.weight".to_string()
        } else {
            format!("{}embed_tokens.weight", self.prefix)
        }
    }

    /// The embedding table, on the device or, with `embeddings_on_host`, in host memory.
    pub(crate) fn embed_tokens(&self) -> Result<Tensor> {
        let device = if self.options.embeddings_on_host {
            &Device::Cpu
        } else {
            &self.options.device
        };
        self.dense_as(
            &self.embed_name(),
            &[self.config.vocab_size, self.config.hidden_size],
            Some(self.options.dtype),
            device,
        )
    }

    /// The 4-bit options for the lm_head, when it is to be quantized: the load's, or those the
    /// checkpoint was quantized with.
    fn lm_head_quantization(&self) -> Result<Option<nf4::QuantOptions>> {
        if !self.options.quantize_lm_head {
            return Ok(None);
        }
        if let Some(opts) = self.options.quantize {
            return Ok(Some(opts));
        }
        self.config
            .quantization
            .as_ref()
            .map(|q| q.quant_options())
            .transpose()
            .map_err(|e| GlmError::Input(format!("quantization_config of config.json: {e}")))
    }

    /// True when the output projection is a weight of its own on the device, also for a model whose
    /// head is tied to the embedding table (kept in host memory, or quantized).
    fn separate_lm_head(&self) -> bool {
        !self.config.tie_word_embeddings
            || (self.options.embeddings_on_host && !self.options.device.is_cpu())
            || (self.options.quantize_lm_head
                && (self.options.quantize.is_some() || self.config.quantization.is_some()))
    }

    pub(crate) fn final_norm(&self) -> Result<Tensor> {
        let name = if self.chatglm() {
            "transformer.encoder.final_layernorm.weight".to_string()
        } else {
            format!("{}norm.weight", self.prefix)
        };
        self.dense(&name, &[self.config.hidden_size])
    }

    /// The output projection, or None when it is the embedding table on the device.
    pub(crate) fn lm_head(&self) -> Result<Option<Linear>> {
        if !self.separate_lm_head() {
            return Ok(None);
        }
        let name = if self.config.tie_word_embeddings {
            self.embed_name()
        } else if self.chatglm() {
            "transformer.output_layer.weight".to_string()
        } else {
            "lm_head.weight".to_string()
        };
        let shape = [self.config.vocab_size, self.config.hidden_size];
        // transformers quantizes the head too when llm_int8_skip_modules is given without it.
        if nf4::is_quantized(&name, self.checkpoint.tensor_names()) {
            let base = name.trim_end_matches(".weight");
            return self.projection(base, shape[0], shape[1], false).map(Some);
        }
        match self.lm_head_quantization()? {
            Some(opts) => {
                // Quantizing on the GPU holds the full-precision copy there beside everything loaded
                // so far; for a head this large (1.2 GB in bf16 at GLM-4-9B's size) that would lift
                // the load's peak over the final footprint by more than a GiB, so it is quantized in
                // host memory and uploaded packed.
                let on_host = !self.options.device.is_cpu()
                    && shape[0] * shape[1] > HOST_QUANTIZE_MIN_ELEMENTS;
                let (dtype, device) = if on_host {
                    (Some(DType::F32), Device::Cpu)
                } else {
                    (self.to_quantize_dtype(), self.options.device.clone())
                };
                let weight = self.dense_as(&name, &shape, dtype, &device)?;
                Ok(Some(self.quantized_linear(weight, None, &name, &opts)?))
            }
            // Kept dense by default, as bitsandbytes keeps it.
            None => Ok(Some(Linear::dense(self.dense(&name, &shape)?, None)?)),
        }
    }

    fn layer_prefix(&self, layer: usize) -> String {
        if self.chatglm() {
            format!("transformer.encoder.layers.{layer}.")
        } else {
            format!("{}layers.{layer}.", self.prefix)
        }
    }

    pub(crate) fn layer_norm(&self, layer: usize, which: LayerNorm) -> Result<Tensor> {
        let suffix = match which {
            LayerNorm::Input => "input_layernorm.weight",
            LayerNorm::PostAttention => "post_attention_layernorm.weight",
            LayerNorm::PostSelfAttn => "post_self_attn_layernorm.weight",
            LayerNorm::PostMlp => "post_mlp_layernorm.weight",
        };
        let name = format!("{}{suffix}", self.layer_prefix(layer));
        self.dense(&name, &[self.config.hidden_size])
    }

    pub(crate) fn linear(&self, layer: usize, which: LayerProj) -> Result<Linear> {
        let c = self.config;
        let attn_width = c.num_attention_heads * c.head_dim;
        let (hf, chatglm, out, inp) = match which {
            LayerProj::O => (
                "self_attn.o_proj",
                "self_attention.dense",
                c.hidden_size,
                attn_width,
            ),
            LayerProj::GateUp => (
                "mlp.gate_up_proj",
                "mlp.dense_h_to_4h",
                2 * c.intermediate_size,
                c.hidden_size,
            ),
            LayerProj::Down => (
                "mlp.down_proj",
                "mlp.dense_4h_to_h",
                c.hidden_size,
                c.intermediate_size,
            ),
        };
        let base = format!(
            "{}{}",
            self.layer_prefix(layer),
            if self.chatglm() { chatglm } else { hf }
        );
        self.projection(&base, out, inp, false)
    }

    /// The q, k and v projections; ChatGLM's fused `query_key_value` is split here.
    pub(crate) fn qkv(&self, layer: usize) -> Result<(Linear, Linear, Linear)> {
        let c = self.config;
        let q_out = c.num_attention_heads * c.head_dim;
        let kv_out = c.num_key_value_heads * c.head_dim;
        let prefix = self.layer_prefix(layer);
        if !self.chatglm() {
            let proj = |p: &str, out| {
                self.projection(
                    &format!("{prefix}self_attn.{p}_proj"),
                    out,
                    c.hidden_size,
                    c.attention_bias,
                )
            };
            return Ok((proj("q", q_out)?, proj("k", kv_out)?, proj("v", kv_out)?));
        }
        let base = format!("{prefix}self_attention.query_key_value");
        let name = format!("{base}.weight");
        let rows = q_out + 2 * kv_out;
        let parts = chatglm_qkv_rows(c);
        let split = |t: &Tensor| -> Result<[Tensor; 3]> {
            let take = |ranges: &[Range<usize>]| -> Result<Tensor> {
                let pieces = ranges
                    .iter()
                    .map(|r| t.narrow(0, r.start, r.len()))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Ok(Tensor::cat(&pieces, 0)?.contiguous()?)
            };
            Ok([take(&parts[0])?, take(&parts[1])?, take(&parts[2])?])
        };
        // The bias stays dense, also beside a 4-bit weight.
        let [bq, bk, bv] = match c.attention_bias {
            true => split(&self.dense(&format!("{base}.bias"), &[rows])?)?.map(Some),
            false => [None, None, None],
        };
        if let Some(fused) = self.read_nf4(&name)? {
            self.check_nf4_shape(&fused, &name, &[rows, c.hidden_size])?;
            let [wq, wk, wv] = self.split_nf4_qkv(&fused, &name, &parts)?;
            return Ok((
                self.packed_linear(wq, bq, &name)?,
                self.packed_linear(wk, bk, &name)?,
                self.packed_linear(wv, bv, &name)?,
            ));
        }
        let weight = self.dense_as(
            &name,
            &[rows, c.hidden_size],
            self.linear_weight_dtype(),
            &self.options.device,
        )?;
        let [wq, wk, wv] = split(&weight)?;
        let make = |w: Tensor, b: Option<Tensor>| self.make_linear(w, b, &base);
        Ok((make(wq, bq)?, make(wk, bk)?, make(wv, bv)?))
    }

    /// The q, k and v rows (`parts`, [`chatglm_qkv_rows`]) of ChatGLM's fused 4-bit `query_key_value`
    /// (`name`), cut out of its stored codes and scales (see [`nf4::Nf4Tensor::slice_rows`]), so they equal
    /// bitsandbytes' dequantization.
    fn split_nf4_qkv(
        &self,
        fused: &nf4::Nf4Tensor,
        name: &str,
        parts: &[Vec<Range<usize>>; 3],
    ) -> Result<[nf4::Nf4Tensor; 3]> {
        let part = |i: usize| -> std::result::Result<nf4::Nf4Tensor, nf4::Nf4Error> {
            let pieces = parts[i]
                .iter()
                .map(|r| fused.slice_rows(r.clone()))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            nf4::Nf4Tensor::concat_rows(&pieces)
        };
        let refused = |e: nf4::Nf4Error| {
            GlmError::Unsupported(format!(
                "{name} in {} is stored in 4 bits and cannot be split into q, k and v without \
                 dequantizing: {e}; load the dense checkpoint with 4-bit quantization at load instead",
                self.path_of(name).display()
            ))
        };
        Ok([
            part(0).map_err(refused)?,
            part(1).map_err(refused)?,
            part(2).map_err(refused)?,
        ])
    }

    /// Fails unless the 4-bit weight `name` has the shape config.json implies.
    fn check_nf4_shape(
        &self,
        packed: &nf4::Nf4Tensor,
        name: &str,
        expected: &[usize],
    ) -> Result<()> {
        if packed.shape() == expected {
            return Ok(());
        }
        Err(GlmError::ShapeMismatch {
            path: self.path_of(name),
            name: name.to_string(),
            found: packed.shape().to_vec(),
            expected: expected.to_vec(),
        })
    }

    /// A linear layer `base.weight` [out, inp] (+ `base.bias` [out]), dense or 4-bit.
    fn projection(&self, base: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let bias = if bias {
            Some(self.dense(&format!("{base}.bias"), &[out])?)
        } else {
            None
        };
        let name = format!("{base}.weight");
        if let Some(packed) = self.read_nf4(&name)? {
            self.check_nf4_shape(&packed, &name, &[out, inp])?;
            return self.packed_linear(packed, bias, &name);
        }
        let weight = self.dense_as(
            &name,
            &[out, inp],
            self.linear_weight_dtype(),
            &self.options.device,
        )?;
        self.make_linear(weight, bias, base)
    }

    /// Wraps a weight read in [`Self::linear_weight_dtype`]: quantized when the options ask for 4 bits,
    /// else as it is.
    fn make_linear(&self, weight: Tensor, bias: Option<Tensor>, base: &str) -> Result<Linear> {
        match self.quantize_at_load() {
            Some(opts) => self.quantized_linear(weight, bias, &format!("{base}.weight"), opts),
            None => Linear::dense(weight, bias),
        }
    }

    /// A 4-bit layer from the weight `name` read in [`Self::to_quantize_dtype`], quantized where it
    /// lies; the full-precision copy is dropped on return.
    fn quantized_linear(
        &self,
        weight: Tensor,
        bias: Option<Tensor>,
        name: &str,
        opts: &nf4::QuantOptions,
    ) -> Result<Linear> {
        #[cfg(feature = "cuda")]
        if weight.device().is_cuda() {
            let packed = glm_kernels::CudaNf4Tensor::quantize(name, &weight, opts)
                .map_err(crate::gpu::kernel_error)?;
            // The dense weight and its codes are both alive here.
            self.sample_memory()?;
            return Linear::cuda_nf4(packed, self.options.dtype, bias);
        }
        let shape = weight.dims().to_vec();
        // The checkpoint's values in f32 (exact for bf16/f16), so the codes equal what bitsandbytes
        // computes from the checkpoint loaded in its own dtype.
        let values = weight.flatten_all()?.to_vec1::<f32>()?;
        let packed = nf4::Nf4Tensor::quantize_f32(&values, &shape, opts).map_err(|source| {
            GlmError::Nf4 {
                name: name.to_string(),
                path: self.path_of(name),
                source: Box::new(source),
            }
        })?;
        self.packed_linear(packed, bias, name)
    }

    /// A 4-bit layer from packed codes in host memory: kept there on the CPU, uploaded as they are to
    /// a CUDA device (no re-quantizing).
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn packed_linear(
        &self,
        packed: nf4::Nf4Tensor,
        bias: Option<Tensor>,
        name: &str,
    ) -> Result<Linear> {
        #[cfg(feature = "cuda")]
        if self.options.device.is_cuda() {
            let host = glm_kernels::HostNf4::from_nf4(name, &packed).map_err(|e| {
                GlmError::Safetensors {
                    path: self.path_of(name),
                    reason: e.to_string(),
                }
            })?;
            let uploaded = glm_kernels::CudaNf4Tensor::upload(&host, &self.options.device)
                .map_err(crate::gpu::kernel_error)?;
            self.sample_memory()?;
            return Linear::cuda_nf4(uploaded, self.options.dtype, bias);
        }
        Linear::nf4(packed, self.options.dtype, &self.options.device, bias)
    }

    /// Reads `name` as a bitsandbytes 4-bit weight with its quant state; None when it is stored dense.
    fn read_nf4(&self, name: &str) -> Result<Option<nf4::Nf4Tensor>> {
        let nf4_error = |source| GlmError::Nf4 {
            name: name.to_string(),
            path: self.path_of(name),
            source: Box::new(source),
        };
        let read = RefCell::new(Vec::new());
        let lookup = |key: &str| -> Option<TensorView<'a>> {
            let view = self.checkpoint.view(key).ok()?;
            self.mark_read(key);
            read.borrow_mut().push(key.to_string());
            Some(view)
        };
        let packed = nf4::Nf4Tensor::read(name, lookup).map_err(nf4_error)?;
        // The packed codes and their state are copies now.
        for key in read.into_inner() {
            self.checkpoint.release(&key);
        }
        // Packed bytes without a quant state cannot be decoded: say so rather than report a bad shape.
        // They are U8, or [bytes / size, 1] in another bnb_4bit_quant_storage dtype.
        if let (None, Some(quant)) = (&packed, &self.config.quantization) {
            if self
                .checkpoint
                .view(name)
                .is_ok_and(|v| v.dtype() == StDtype::U8 || matches!(v.shape(), [_, 1]))
            {
                return Err(nf4_error(nf4::Nf4Error::MissingTensor {
                    key: format!(
                        "{name}.quant_state.bitsandbytes__{}",
                        quant.bnb_4bit_quant_type
                    ),
                    weight: name.to_string(),
                }));
            }
        }
        Ok(packed)
    }

    /// Checkpoint tensors the decoder did not read, summarised for the load report. Vision weights of
    /// GLM-4.1V and ChatGLM's stored rotary table are expected; anything else is listed.
    fn unused_report(&self) -> Vec<String> {
        let used = self.used.borrow();
        let mut vision = 0usize;
        let mut other: Vec<&str> = Vec::new();
        for name in self.checkpoint.tensor_names() {
            if used.contains(name) || name == "transformer.rotary_pos_emb.inv_freq" {
                continue;
            }
            if is_vision(name) {
                vision += 1;
            } else {
                other.push(name);
            }
        }
        other.sort_unstable();
        let mut notes = Vec::new();
        if vision > 0 {
            notes.push(format!(
                "ignoring the {vision} vision-tower tensors (model.visual.*): glm-run runs the text decoder only"
            ));
        }
        if !other.is_empty() {
            let shown: Vec<&str> = other.iter().take(5).copied().collect();
            notes.push(format!(
                "ignoring {} checkpoint tensors the decoder does not use: {}{}",
                other.len(),
                shown.join(", "),
                if other.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            ));
        }
        notes
    }
}

/// The rows of ChatGLM's fused `query_key_value` that make q, k and v, in order: [q | k | v] with
/// `multi_query_attention`, else per head [q_h | k_h | v_h] (modeling_chatglm.py's view(np, 3 * hn)).
fn chatglm_qkv_rows(c: &Config) -> [Vec<Range<usize>>; 3] {
    let (q_out, kv_out, d) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.head_dim,
    );
    if c.chatglm_grouped_qkv {
        return [
            0..q_out,
            q_out..q_out + kv_out,
            q_out + kv_out..q_out + 2 * kv_out,
        ]
        .map(|r| [r].into());
    }
    [0, 1, 2].map(|i| {
        (0..c.num_attention_heads)
            .map(|h| (3 * h + i) * d..(3 * h + i + 1) * d)
            .collect()
    })
}

/// A tensor of GLM-4.1V's vision tower, which the text decoder does not read.
fn is_vision(name: &str) -> bool {
    name.starts_with("model.visual.") || name.starts_with("visual.")
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::model::Model;

    #[test]
    fn progress_counts_every_byte_read_up_to_the_checkpoint_size() {
        // The sharded fixture: two files, every tensor read once.
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/models/glm"
        );
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let options = LoadOptions {
            progress: Some(LoadProgress::new(move |read, total| {
                record.lock().unwrap().push((read, total));
            })),
            ..LoadOptions::default()
        };
        Model::load(dir, &options).unwrap();
        let checkpoint = Checkpoint::open(dir).unwrap();
        let size: u64 = checkpoint
            .tensor_names()
            .map(|n| checkpoint.stored_bytes(n))
            .sum();
        let seen = seen.lock().unwrap();
        // One call per tensor, then the final one.
        assert_eq!(seen.len(), checkpoint.tensor_names().count() + 1);
        assert!(seen.iter().all(|&(_, total)| total == size));
        let reads = &seen[..seen.len() - 1];
        assert!(reads.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(seen[seen.len() - 2], (size, size), "every byte counted");
        assert_eq!(seen.last(), Some(&(size, size)));
    }
}
