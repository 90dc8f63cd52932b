//! The decode step on a CUDA device as a fixed sequence of our kernels over preallocated buffers, launched
//! directly or replayed as one captured CUDA graph.
//!
//! [`Model::forward`] decodes op by op through candle: about 65 launches per layer, each with host-side
//! dispatch and an allocation, which costs far more than reading the weights (benches/results/decode-overhead.md).
//! [`CudaDecoder`] runs the same arithmetic as nine kernels per layer (RMSNorm fused with the residual add before
//! it, q, k and v in one GEMV launch, bias + rotary + KV-cache write in one, silu·up in one, GEMVs writing into
//! scratch buffers; seven at batch 1, where each norm is computed by the GEMVs after it) with nothing allocated
//! per token. The token ids and the position live in device memory: the embedding lookup reads the ids the
//! previous step chose (greedy argmax, or the sampling kernel), the rotary and attention kernels read the
//! position, and the choosing kernel advances it, so that every step has the same arguments and one CUDA graph,
//! captured at the second step, serves all the others. The only host-device traffic per token is reading the
//! chosen token ids back (and, when sampling, writing each sequence's uniform number before the step).
//!
//! Both modes launch the same kernels with the same arguments, so they give identical logits; the plain
//! [`Model::forward`] stays for the CPU, for prefill and for debugging (the GPU tests compare the three).

use candle_core::cuda_backend::cudarc::driver::sys::{
    CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaSlice, CudaStream};
use candle_core::{CudaDevice, DType, Device, Storage, Tensor};
use glm_kernels::{
    device_pointer, sampling_scratch_bytes, AttentionAt, CudaNf4Tensor, DecodeKernels, DenseGemv,
    DevicePointer, GemvInput, NormedInput, RotaryKvWrite, SampleParams, SampleRows,
    SamplingKernels,
};
use std::sync::Arc;

use super::{DecoderLayer, KvCache, Model};
use crate::error::{GlmError, Result};
use crate::gpu::kernel_error;
use crate::linear::{Linear, LinearWeight};
use crate::sampling::SamplingConfig;

/// A projection as the step launches it.
enum Projection<'m> {
    /// A dense `[n, k]` weight in the compute dtype.
    Dense {
        weight: DevicePointer,
        n: usize,
        k: usize,
    },
    Nf4(&'m glm_kernels::CudaNf4Tensor),
}

/// Device addresses of one layer's weights.
struct LayerWeights<'m> {
    input_norm: DevicePointer,
    post_attention_norm: DevicePointer,
    /// GLM-4-0414: the norms of the attention and MLP outputs.
    post_sublayer_norms: Option<(DevicePointer, DevicePointer)>,
    q: Projection<'m>,
    k: Projection<'m>,
    v: Projection<'m>,
    qkv_bias: Option<[DevicePointer; 3]>,
    o: Projection<'m>,
    gate_up: Projection<'m>,
    down: Projection<'m>,
}

/// The step's scratch, allocated once: activations of every stage for `batch` rows, the token ids and the
/// position.
struct Buffers {
    /// The residual stream, in two buffers: a GEMV that normalizes its input reads one while its first block
    /// writes the sum into the other. The embedding goes into the first; each layer's attention input moves it
    /// to the second, its MLP input back.
    residuals: [CudaSlice<u8>; 2],
    normed: CudaSlice<u8>,
    q_raw: CudaSlice<u8>,
    k_raw: CudaSlice<u8>,
    v_raw: CudaSlice<u8>,
    q: CudaSlice<u8>,
    attention: CudaSlice<u8>,
    projected: CudaSlice<u8>,
    gate_up: CudaSlice<u8>,
    activation: CudaSlice<u8>,
    logits: CudaSlice<u8>,
    argmax_scratch: CudaSlice<u8>,
    attention_scratch: CudaSlice<u8>,
    tokens: CudaSlice<u32>,
    position: CudaSlice<u32>,
    inv_freq: CudaSlice<f32>,
}

/// How the step's last kernel chooses the next tokens on the device.
enum DeviceChoice {
    /// The first maximum of each row (greedy decoding).
    Greedy,
    /// A draw as the host's `Sampler` makes it, from uniform numbers the host writes before each step
    /// ([`CudaDecoder::set_uniforms`]).
    Sample(Box<DeviceSampler>),
}

/// The sampling kernel and its buffers.
struct DeviceSampler {
    kernels: SamplingKernels,
    params: SampleParams,
    /// f64 per sequence.
    uniforms: CudaSlice<f64>,
    /// u8 `[batch, vocab]`: the tokens the repetition penalty applies to, when it is on.
    seen: Option<CudaSlice<u8>>,
    scratch: CudaSlice<u8>,
}

/// A captured decode step and the KV-cache buffers it was captured with.
struct CapturedStep {
    graph: CudaGraph,
    cache: Vec<(DevicePointer, DevicePointer)>,
}

/// How a [`CudaDecoder`] launches its step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepLaunch {
    /// Kernel by kernel from the host, every step.
    Direct,
    /// Captured once as a CUDA graph, then replayed.
    Graph,
}

/// The fused decode step of a [`Model`] on a CUDA device for a batch of equal-length sequences.
pub struct CudaDecoder<'m> {
    model: &'m Model,
    dev: CudaDevice,
    stream: Arc<CudaStream>,
    kernels: DecodeKernels,
    layers: Vec<LayerWeights<'m>>,
    final_norm: DevicePointer,
    lm_head: Projection<'m>,
    /// The embedding table's address when it is on the device; None when it is in host memory.
    embedding: Option<DevicePointer>,
    buffers: Buffers,
    batch: usize,
    launch: StepLaunch,
    captured: Option<CapturedStep>,
    /// The token ids of the next step as the host knows them (needed for a table in host memory).
    host_tokens: Vec<u32>,
    steps: usize,
    /// Whether projections after a norm compute it themselves ([`Self::set_fused_norms`]).
    fused_norms: bool,
    choice: DeviceChoice,
}

impl<'m> CudaDecoder<'m> {
    /// The decoder for `batch` sequences of `model`, or why the model cannot take this path (it then decodes
    /// through [`Model::forward`]).
    pub fn new(model: &'m Model, batch: usize, launch: StepLaunch) -> Result<Self> {
        let Device::Cuda(dev) = model.device() else {
            return Err(unsupported("the model is not on a CUDA device"));
        };
        if model.kv_capacity.is_none() {
            return Err(unsupported(
                "the KV cache grows instead of being preallocated (no context length planned)",
            ));
        }
        if batch == 0 || batch > glm_kernels::GEMV_MAX_ROWS {
            return Err(unsupported(&format!(
                "a batch of {batch}: the decode kernels take 1 to {}",
                glm_kernels::GEMV_MAX_ROWS
            )));
        }
        let c = model.config();
        if c.hidden_size > glm_kernels::NORM_MAX_DIM {
            return Err(unsupported(&format!(
                "a hidden size of {} (the norm kernels take up to {})",
                c.hidden_size,
                glm_kernels::NORM_MAX_DIM
            )));
        }
        // The rotary dimension is even and within the head (Config::validate).
        if !c.head_dim.is_multiple_of(2) {
            return Err(unsupported("an odd head dimension"));
        }
        let dtype = model.dtype();
        let kernels = DecodeKernels::new(dev, dtype).map_err(kernel_error)?;
        let layers = model
            .layers
            .iter()
            .map(LayerWeights::new)
            .collect::<Result<Vec<_>>>()?;
        let on_device = model.embed_tokens.device().is_cuda();
        let lm_head = match &model.lm_head {
            Some(head) => projection(head, "lm_head")?,
            None if on_device => Projection::Dense {
                weight: tensor_pointer(&model.embed_tokens)?,
                n: c.vocab_size,
                k: c.hidden_size,
            },
            None => {
                return Err(unsupported(
                    "the lm_head is tied to an embedding table kept in host memory",
                ))
            }
        };
        let embedding = if on_device {
            Some(tensor_pointer(&model.embed_tokens)?)
        } else {
            None
        };
        let buffers = Buffers::new(dev, model, batch)?;
        Ok(Self {
            model,
            dev: dev.clone(),
            stream: dev.cuda_stream(),
            kernels,
            layers,
            final_norm: tensor_pointer(&model.norm.weight)?,
            lm_head,
            embedding,
            buffers,
            batch,
            launch,
            captured: None,
            host_tokens: Vec::new(),
            steps: 0,
            fused_norms: fused_norms_from_env().unwrap_or(batch == 1),
            choice: DeviceChoice::Greedy,
        })
    }

    /// How many steps have run.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Whether the projections after each norm compute the norm themselves (every block into its shared memory, no
    /// norm kernel between two GEMVs) where their kernel can. By default on for a batch of one row, off for more:
    /// measured on an H200 (benches/results/decode-overhead.md), it gains at batch 1 and loses at batch 4 and 8,
    /// where every block normalizes all rows. `GLM_RUN_FUSED_NORMS=1` or `0` overrides the default; the GPU tests
    /// compare both ways.
    pub fn set_fused_norms(&mut self, on: bool) {
        if on != self.fused_norms {
            self.fused_norms = on;
            self.captured = None;
        }
    }

    /// Makes the step end by choosing the next tokens as a [`crate::sampling::Sampler`] with `config` would, on the
    /// device: the first maximum for greedy decoding, else a draw from the uniform numbers given to
    /// [`Self::set_uniforms`] before each step (the sampler's own, so that the device chooses what the host would,
    /// up to rounding at the edge of a token's share). `contexts` holds each sequence's tokens so far (prompt and
    /// output), which the repetition penalty applies to; the device adds each chosen token. Returns false, changing
    /// nothing, for what the device cannot choose (greedy decoding with a repetition penalty): the host then
    /// chooses from [`Self::logits`]. The default is greedy.
    pub fn choose_on_device(
        &mut self,
        config: &SamplingConfig,
        contexts: &[&[u32]],
    ) -> Result<bool> {
        config.validate()?;
        let penalty = config.repetition_penalty != 1.0;
        if config.is_greedy() {
            if penalty {
                return Ok(false);
            }
            self.choice = DeviceChoice::Greedy;
            self.captured = None;
            return Ok(true);
        }
        self.check_batch(contexts.len(), "contexts")?;
        let vocab = self.model.config().vocab_size;
        let seen = if penalty {
            let mut mask = vec![0u8; self.batch * vocab];
            for (row, context) in contexts.iter().enumerate() {
                for &id in *context {
                    self.check_token(id, "of the context ")?;
                    mask[row * vocab + id as usize] = 1;
                }
            }
            Some(self.stream.clone_htod(&mask).map_err(candle)?)
        } else {
            None
        };
        self.choice = DeviceChoice::Sample(Box::new(DeviceSampler {
            kernels: SamplingKernels::new(&self.dev).map_err(kernel_error)?,
            params: SampleParams {
                temperature: config.temperature,
                top_k: config.top_k,
                top_p: config.top_p,
                repetition_penalty: config.repetition_penalty,
            },
            uniforms: self.stream.alloc_zeros::<f64>(self.batch).map_err(candle)?,
            seen,
            scratch: self
                .stream
                .alloc_zeros::<u8>(sampling_scratch_bytes(self.batch, vocab))
                .map_err(candle)?,
        }));
        self.captured = None;
        Ok(true)
    }

    /// Whether the step draws tokens on the device, needing [`Self::set_uniforms`] before each step.
    pub fn samples_on_device(&self) -> bool {
        matches!(self.choice, DeviceChoice::Sample(_))
    }

    /// The uniform numbers in [0, 1) of the next step's draws, one per sequence (see [`Self::choose_on_device`]).
    pub fn set_uniforms(&mut self, uniforms: &[f64]) -> Result<()> {
        self.check_batch(uniforms.len(), "uniform numbers")?;
        if let Some(bad) = uniforms.iter().find(|u| !(0.0..1.0).contains(*u)) {
            return Err(GlmError::Input(format!(
                "uniform number {bad} is outside [0, 1)"
            )));
        }
        let DeviceChoice::Sample(sampler) = &mut self.choice else {
            return Err(GlmError::Input(
                "uniform numbers for a decoder that does not sample on the device".into(),
            ));
        };
        self.stream
            .memcpy_htod(uniforms, &mut sampler.uniforms)
            .map_err(candle)?;
        Ok(())
    }

    /// Sets the next step's input: one token id per sequence, at the position after what `cache` holds (after a
    /// prefill, or after the host sampled tokens).
    pub fn set_tokens(&mut self, cache: &KvCache, tokens: &[u32]) -> Result<()> {
        self.check_batch(tokens.len(), "token ids")?;
        for &id in tokens {
            self.check_token(id, "")?;
        }
        let position = [cache.seq_len as u32];
        self.stream
            .memcpy_htod(tokens, &mut self.buffers.tokens)
            .map_err(candle)?;
        self.stream
            .memcpy_htod(&position, &mut self.buffers.position)
            .map_err(candle)?;
        self.host_tokens = tokens.to_vec();
        Ok(())
    }

    /// Runs one token per sequence (the ids last set or chosen on the device) through the model, appending to
    /// `cache`, and leaves the logits and the device's choice of the next tokens there.
    pub fn step(&mut self, cache: &mut KvCache) -> Result<()> {
        let (cache_pointers, capacity) = self.check_cache(cache)?;
        self.embed()?;
        match self.launch {
            // The first step loads every kernel module; capture needs them loaded.
            StepLaunch::Graph if self.steps > 0 => {
                if self
                    .captured
                    .as_ref()
                    .is_none_or(|c| c.cache != cache_pointers)
                {
                    self.captured = Some(self.capture(&cache_pointers, capacity)?);
                }
                let captured = self.captured.as_ref().expect("captured above");
                captured.graph.launch().map_err(candle)?;
            }
            _ => self.launch_body(&cache_pointers, capacity)?,
        }
        cache.seq_len += 1;
        self.steps += 1;
        Ok(())
    }

    /// The device's choice after the last step ([`Self::choose_on_device`]), one id per sequence: the device
    /// already holds it as the next step's input. Reading it waits for the step to finish.
    pub fn chosen_tokens(&mut self) -> Result<Vec<u32>> {
        let tokens = self
            .stream
            .clone_dtoh(&self.buffers.tokens)
            .map_err(candle)?;
        if tokens.contains(&u32::MAX) {
            return Err(GlmError::Input(
                "the logits hold NaN or infinity: the model's weights or activations overflowed (try --dtype bf16 or f32)"
                    .into(),
            ));
        }
        self.host_tokens.clone_from(&tokens);
        Ok(tokens)
    }

    /// The f32 logits of the last step, `[batch, vocab]`, on the host (for sampling other than greedy).
    pub fn logits(&self) -> Result<Tensor> {
        let bytes = self
            .stream
            .clone_dtoh(&self.buffers.logits)
            .map_err(candle)?;
        let shape = (self.batch, self.model.config().vocab_size);
        let host = match self.model.dtype() {
            DType::F16 => Tensor::from_vec(
                bytemuck::pod_collect_to_vec::<u8, half::f16>(&bytes),
                shape,
                &Device::Cpu,
            )?,
            DType::BF16 => Tensor::from_vec(
                bytemuck::pod_collect_to_vec::<u8, half::bf16>(&bytes),
                shape,
                &Device::Cpu,
            )?,
            _ => Tensor::from_vec(
                bytemuck::pod_collect_to_vec::<u8, f32>(&bytes),
                shape,
                &Device::Cpu,
            )?,
        };
        Ok(host.to_dtype(DType::F32)?)
    }

    /// An error unless `count` (of `what`, one per sequence) is the batch.
    fn check_batch(&self, count: usize, what: &str) -> Result<()> {
        if count != self.batch {
            return Err(GlmError::Input(format!(
                "{count} {what} for a decoder of {} sequences",
                self.batch
            )));
        }
        Ok(())
    }

    /// An error unless token `id` (`what`: where it comes from, with a trailing space) is in the vocabulary.
    fn check_token(&self, id: u32, what: &str) -> Result<()> {
        let vocab = self.model.config().vocab_size;
        if id as usize >= vocab {
            return Err(GlmError::Input(format!(
                "token id {id} {what}is outside the vocabulary of {vocab} tokens"
            )));
        }
        Ok(())
    }

    /// The KV-cache buffers of every layer, after checking that `cache` fits this decoder and has room.
    fn check_cache(&self, cache: &KvCache) -> Result<(Vec<(DevicePointer, DevicePointer)>, usize)> {
        let Some(capacity) = cache.capacity else {
            return Err(GlmError::Input(
                "the decode step needs a preallocated KV cache (a planned context length)".into(),
            ));
        };
        if cache.seq_len == 0 {
            return Err(GlmError::Input(
                "the decode step continues a prefilled KV cache; this one is empty".into(),
            ));
        }
        if cache.seq_len >= capacity {
            return Err(GlmError::Input(format!(
                "the KV cache is full ({capacity} tokens): plan a longer context (--context)"
            )));
        }
        let pointers = cache
            .layers
            .iter()
            .map(|layer| {
                let Some((k, v)) = layer else {
                    return Err(GlmError::Input(
                        "the KV cache belongs to a different model".into(),
                    ));
                };
                if k.dim(0)? != self.batch {
                    return Err(GlmError::Input(format!(
                        "the KV cache holds {} sequences, the decoder {}",
                        k.dim(0)?,
                        self.batch
                    )));
                }
                Ok((tensor_pointer(k)?, tensor_pointer(v)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((pointers, capacity))
    }

    /// The input rows of the step: looked up on the device from the ids there, or in host memory and copied.
    fn embed(&mut self) -> Result<()> {
        let hidden = self.model.config().hidden_size;
        let residual = device_pointer(&self.buffers.residuals[0], &self.dev);
        if let Some(table) = self.embedding {
            let tokens = device_pointer(&self.buffers.tokens, &self.dev);
            // SAFETY: the table has vocab rows of `hidden` (the ids were checked or came from argmax over the
            // vocab), `residual` holds batch rows.
            return unsafe {
                self.kernels
                    .embed_rows(table, tokens, residual, self.batch, hidden)
            }
            .map_err(kernel_error);
        }
        let ids = Tensor::new(self.host_tokens.as_slice(), &Device::Cpu)?;
        let rows = self
            .model
            .embed_tokens
            .index_select(&ids, 0)?
            .to_device(self.model.device())?;
        let bytes = rows.elem_count() * rows.dtype().size_in_bytes();
        let (storage, layout) = rows.storage_and_layout();
        let Storage::Cuda(storage) = &*storage else {
            unreachable!("moved to the CUDA device above")
        };
        let source = slice_pointer(storage, layout.start_offset(), rows.dtype())?;
        // SAFETY: both hold `bytes` bytes on this device; `rows` lives until the copy has been queued, and its
        // memory is freed in stream order after it.
        unsafe {
            candle_core::cuda_backend::cudarc::driver::result::memcpy_dtod_async(
                residual,
                source,
                bytes,
                self.stream.cu_stream(),
            )
        }
        .map_err(candle)
    }

    /// Captures the step's launches as a CUDA graph.
    fn capture(
        &self,
        cache: &[(DevicePointer, DevicePointer)],
        capacity: usize,
    ) -> Result<CapturedStep> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(candle)?;
        let launched = self.launch_body(cache, capacity);
        // End the capture whatever happened, so the stream is usable again.
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        launched?;
        let graph = graph
            .map_err(candle)?
            .ok_or_else(|| unsupported("the captured decode step is empty"))?;
        Ok(CapturedStep {
            graph,
            cache: cache.to_vec(),
        })
    }

    /// Every launch of one step after the embedding: the layers, the lm_head (which applies the final norm) and
    /// the choice of the next tokens.
    fn launch_body(&self, cache: &[(DevicePointer, DevicePointer)], capacity: usize) -> Result<()> {
        let c = self.model.config();
        let rows = self.batch;
        let eps = c.rms_norm_eps as f32;
        let b = &self.buffers;
        let p = |slice: &CudaSlice<u8>| device_pointer(slice, &self.dev);
        let [first, second] = [p(&b.residuals[0]), p(&b.residuals[1])];
        let projected = p(&b.projected);
        let position = device_pointer(&b.position, &self.dev);
        let k = &self.kernels;
        // What the next norm adds to the residual: the previous layer's MLP output (in `projected`) and, for
        // GLM-4-0414, that layer's norm of it. Nothing before the first layer.
        let mut mlp_output: Option<Option<DevicePointer>> = None;
        // SAFETY (every launch below): the scratch buffers were sized for `batch` rows of each stage in
        // Buffers::new, the weights are the model's (borrowed for 'm), the cache buffers hold `capacity`
        // tokens per head and check_cache made sure the position is inside.
        unsafe {
            for (i, layer) in self.layers.iter().enumerate() {
                let (q_raw, k_raw, v_raw) = (p(&b.q_raw), p(&b.k_raw), p(&b.v_raw));
                let attention_input = NormedInput {
                    residual: first,
                    delta: mlp_output.map(|_| projected),
                    delta_weight: mlp_output.flatten(),
                    weight: layer.input_norm,
                    residual_out: Some(second),
                    normed_out: None,
                    eps,
                };
                self.project_normed(
                    &[(&layer.q, q_raw), (&layer.k, k_raw), (&layer.v, v_raw)],
                    &attention_input,
                )?;
                let (k_cache, v_cache) = cache[i];
                k.rotary_kv_write(&RotaryKvWrite {
                    batch: rows,
                    heads: c.num_attention_heads,
                    kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                    rotary_dim: c.rotary_dim(),
                    capacity,
                    q_raw,
                    k_raw,
                    v_raw,
                    biases: layer.qkv_bias,
                    inv_freq: device_pointer(&b.inv_freq, &self.dev),
                    pos: position,
                    q_out: p(&b.q),
                    k_cache,
                    v_cache,
                })
                .map_err(kernel_error)?;
                k.attention_at(&AttentionAt {
                    q: p(&b.q),
                    out: p(&b.attention),
                    k_cache,
                    v_cache,
                    heads_total: rows * c.num_attention_heads,
                    rep: c.num_attention_heads / c.num_key_value_heads,
                    capacity,
                    head_dim: c.head_dim,
                    pos: position,
                    scale: (c.head_dim as f32).powf(-0.5),
                    scratch: p(&b.attention_scratch),
                })
                .map_err(kernel_error)?;
                self.project(&[(&layer.o, projected)], p(&b.attention))?;
                let mlp_input = NormedInput {
                    residual: second,
                    delta: Some(projected),
                    delta_weight: layer.post_sublayer_norms.map(|(attn, _)| attn),
                    weight: layer.post_attention_norm,
                    residual_out: Some(first),
                    normed_out: None,
                    eps,
                };
                self.project_normed(&[(&layer.gate_up, p(&b.gate_up))], &mlp_input)?;
                k.silu_mul(p(&b.gate_up), p(&b.activation), rows, c.intermediate_size)
                    .map_err(kernel_error)?;
                self.project(&[(&layer.down, projected)], p(&b.activation))?;
                mlp_output = Some(layer.post_sublayer_norms.map(|(_, mlp)| mlp));
            }
            let head_input = NormedInput {
                residual: first,
                delta: mlp_output.map(|_| projected),
                delta_weight: mlp_output.flatten(),
                weight: self.final_norm,
                residual_out: None,
                normed_out: None,
                eps,
            };
            self.project_normed(&[(&self.lm_head, p(&b.logits))], &head_input)?;
            let tokens = device_pointer(&b.tokens, &self.dev);
            match &self.choice {
                DeviceChoice::Greedy => k.argmax_rows(
                    p(&b.logits),
                    c.vocab_size,
                    tokens,
                    position,
                    rows,
                    p(&b.argmax_scratch),
                ),
                DeviceChoice::Sample(s) => s.kernels.sample_rows(&SampleRows {
                    logits: p(&b.logits),
                    dtype: k.dtype(),
                    rows,
                    vocab: c.vocab_size,
                    tokens,
                    pos: position,
                    uniforms: device_pointer(&s.uniforms, &self.dev),
                    seen: s.seen.as_ref().map(|seen| device_pointer(seen, &self.dev)),
                    scratch: p(&s.scratch),
                    params: s.params,
                }),
            }
            .map_err(kernel_error)
        }
    }

    /// `y_i = x · W_iᵀ` for each `(W_i, y_i)` of `outputs` (weights of one input width), with x the step's rows
    /// that `input` describes: normalized by the GEMV itself where its kernel can (and the step fuses norms), else
    /// by the norm kernel into the `normed` buffer first.
    ///
    /// # Safety
    /// `input`'s rows and weights are the step's buffers and the model's norms; each `y_i` holds `batch` rows of its
    /// weight's output width.
    unsafe fn project_normed(
        &self,
        outputs: &[(&Projection<'_>, DevicePointer)],
        input: &NormedInput,
    ) -> Result<()> {
        if self.fused_norms && unsafe { self.project_group(outputs, GemvInput::Normed(*input)) }? {
            return Ok(());
        }
        let normed = device_pointer(&self.buffers.normed, &self.dev);
        let input = NormedInput {
            normed_out: Some(normed),
            ..*input
        };
        unsafe {
            self.kernels
                .residual_rms_norm(&input, self.batch, self.model.config().hidden_size)
                .map_err(kernel_error)?;
            self.project(outputs, normed)
        }
    }

    /// `y_i = x · W_iᵀ` for each `(W_i, y_i)` of `outputs` and the step's rows x: one launch where the weights
    /// allow it, else one per weight.
    ///
    /// # Safety
    /// `x` holds `batch` rows of the weights' input width and each `y_i` of its weight's output width.
    unsafe fn project(
        &self,
        outputs: &[(&Projection<'_>, DevicePointer)],
        x: DevicePointer,
    ) -> Result<()> {
        if unsafe { self.project_group(outputs, GemvInput::Rows(x)) }? {
            return Ok(());
        }
        for &(weight, y) in outputs {
            match *weight {
                // Takes the generic kernel where the tiled one cannot.
                Projection::Nf4(w) => {
                    unsafe { w.gemv_into(self.kernels.dtype(), x, y, self.batch) }
                        .map_err(kernel_error)?
                }
                // A dense GEMV of rows always launches.
                Projection::Dense { .. } => {
                    unsafe { self.project_group(&[(weight, y)], GemvInput::Rows(x)) }?;
                }
            }
        }
        Ok(())
    }

    /// `y_i = x · W_iᵀ` for all of `outputs` in one launch where their kernel can take them together (all NF4, or
    /// all dense of one input width) and take `input`; false, launching nothing, where not.
    ///
    /// # Safety
    /// As [`Self::project_normed`] for a [`GemvInput::Normed`] input, as [`Self::project`] for rows.
    unsafe fn project_group(
        &self,
        outputs: &[(&Projection<'_>, DevicePointer)],
        input: GemvInput,
    ) -> Result<bool> {
        let nf4: Option<Vec<_>> = outputs
            .iter()
            .map(|&(weight, y)| match *weight {
                Projection::Nf4(w) => Some((w, y)),
                Projection::Dense { .. } => None,
            })
            .collect();
        if let Some(nf4) = nf4 {
            return unsafe {
                CudaNf4Tensor::gemv_group_into(&nf4, self.kernels.dtype(), input, self.batch)
            }
            .map_err(kernel_error);
        }
        let dense: Option<Vec<_>> = outputs
            .iter()
            .map(|&(weight, y)| match *weight {
                Projection::Dense { weight, n, k } => Some((DenseGemv { weight, y, n }, k)),
                Projection::Nf4(_) => None,
            })
            .collect();
        let Some(dense) = dense else {
            return Ok(false);
        };
        let Some(&(_, k)) = dense.first() else {
            return Ok(true);
        };
        if dense.iter().any(|&(_, width)| width != k) {
            return Ok(false);
        }
        let weights: Vec<DenseGemv> = dense.into_iter().map(|(w, _)| w).collect();
        unsafe { self.kernels.gemv_dense(&weights, input, self.batch, k) }.map_err(kernel_error)
    }
}

impl<'m> LayerWeights<'m> {
    fn new(layer: &'m DecoderLayer) -> Result<Self> {
        let a = &layer.self_attn;
        let biases = [&a.q_proj, &a.k_proj, &a.v_proj].map(Linear::bias);
        let qkv_bias = match biases {
            [Some(q), Some(k), Some(v)] => {
                Some([tensor_pointer(q)?, tensor_pointer(k)?, tensor_pointer(v)?])
            }
            [None, None, None] => None,
            _ => return Err(unsupported("only some of q/k/v have a bias")),
        };
        if a.o_proj.bias().is_some()
            || layer.mlp.gate_up_proj.bias().is_some()
            || layer.mlp.down_proj.bias().is_some()
        {
            return Err(unsupported("an o/gate_up/down projection with a bias"));
        }
        let post_sublayer_norms = match &layer.post_sublayer_norms {
            Some((attn, mlp)) => {
                Some((tensor_pointer(&attn.weight)?, tensor_pointer(&mlp.weight)?))
            }
            None => None,
        };
        Ok(Self {
            input_norm: tensor_pointer(&layer.input_layernorm.weight)?,
            post_attention_norm: tensor_pointer(&layer.post_attention_layernorm.weight)?,
            post_sublayer_norms,
            q: projection(&a.q_proj, "q_proj")?,
            k: projection(&a.k_proj, "k_proj")?,
            v: projection(&a.v_proj, "v_proj")?,
            qkv_bias,
            o: projection(&a.o_proj, "o_proj")?,
            gate_up: projection(&layer.mlp.gate_up_proj, "gate_up_proj")?,
            down: projection(&layer.mlp.down_proj, "down_proj")?,
        })
    }
}

fn projection<'m>(linear: &'m Linear, what: &str) -> Result<Projection<'m>> {
    match linear.weight() {
        LinearWeight::Dense(w) => Ok(Projection::Dense {
            weight: tensor_pointer(w)?,
            n: linear.out_features(),
            k: linear.in_features(),
        }),
        LinearWeight::CudaNf4 { packed, .. } => Ok(Projection::Nf4(packed.tensor())),
        LinearWeight::Nf4 { .. } => Err(unsupported(&format!(
            "{what} is a 4-bit weight in host memory"
        ))),
    }
}

impl Buffers {
    fn new(dev: &CudaDevice, model: &Model, batch: usize) -> Result<Self> {
        let c = model.config();
        let elem = model.dtype().size_in_bytes();
        let alloc = |elements: usize| -> Result<CudaSlice<u8>> {
            Ok(dev.alloc_zeros::<u8>(batch * elements * elem)?)
        };
        let q_width = c.num_attention_heads * c.head_dim;
        let kv_width = c.num_key_value_heads * c.head_dim;
        let inv_freq: Vec<f32> = model.rotary.inv_freq.flatten_all()?.to_vec1()?;
        Ok(Self {
            residuals: [alloc(c.hidden_size)?, alloc(c.hidden_size)?],
            normed: alloc(c.hidden_size)?,
            q_raw: alloc(q_width)?,
            k_raw: alloc(kv_width)?,
            v_raw: alloc(kv_width)?,
            q: alloc(q_width)?,
            attention: alloc(q_width)?,
            projected: alloc(c.hidden_size)?,
            gate_up: alloc(2 * c.intermediate_size)?,
            activation: alloc(c.intermediate_size)?,
            logits: alloc(c.vocab_size)?,
            argmax_scratch: dev.alloc_zeros::<u8>(glm_kernels::argmax_scratch_bytes(batch))?,
            attention_scratch: dev.alloc_zeros::<u8>(glm_kernels::attention_scratch_bytes(
                batch * c.num_attention_heads,
                c.head_dim,
            ))?,
            tokens: dev.alloc_zeros::<u32>(batch)?,
            position: dev.alloc_zeros::<u32>(1)?,
            inv_freq: dev.clone_htod(&inv_freq)?,
        })
    }
}

/// The device address of a contiguous tensor's first element.
fn tensor_pointer(t: &Tensor) -> Result<DevicePointer> {
    if !t.is_contiguous() {
        return Err(unsupported("a weight that is not contiguous"));
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(storage) = &*storage else {
        return Err(unsupported("a weight in host memory"));
    };
    slice_pointer(storage, layout.start_offset(), t.dtype())
}

/// The device address of element `offset` of a CUDA storage.
fn slice_pointer(
    storage: &candle_core::CudaStorage,
    offset: usize,
    dtype: DType,
) -> Result<DevicePointer> {
    let dev = &storage.device;
    let base = match dtype {
        DType::F32 => device_pointer(storage.as_cuda_slice::<f32>()?, dev),
        DType::F16 => device_pointer(storage.as_cuda_slice::<half::f16>()?, dev),
        DType::BF16 => device_pointer(storage.as_cuda_slice::<half::bf16>()?, dev),
        other => return Err(unsupported(&format!("a {other:?} tensor"))),
    };
    Ok(base + (offset * dtype.size_in_bytes()) as u64)
}

/// `GLM_RUN_FUSED_NORMS=1` or `0` overrides the default of [`CudaDecoder::set_fused_norms`].
fn fused_norms_from_env() -> Option<bool> {
    match std::env::var("GLM_RUN_FUSED_NORMS").ok()?.trim() {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

fn unsupported(why: &str) -> GlmError {
    GlmError::Unsupported(format!(
        "the fused CUDA decode step cannot run this model: {why}"
    ))
}

fn candle(error: candle_core::cuda_backend::cudarc::driver::DriverError) -> GlmError {
    GlmError::Candle(candle_core::Error::Cuda(Box::new(error)))
}
