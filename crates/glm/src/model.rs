//! The GLM decoder, one file: embedding, decoder layers, final norm, lm_head.
//!
//! One decoder serves the four layouts (config.rs); the loader maps each checkpoint's names onto it.
//! Per layer, with x the residual stream:
//!
//! ```text
//! Glm:      h = x + Attn(RMSNorm(x));                   out = h + MLP(RMSNorm(h))
//! Glm4(v):  h = x + RMSNorm(Attn(RMSNorm(x)));          out = h + RMSNorm(MLP(RMSNorm(h)))
//! ```
//!
//! Attention: q/k/v with bias, o without; grouped-query attention; scale head_dim^-0.5, scores and
//! softmax in f32; rotary embeddings on the first `rotary_dim` dimensions of each head with interleaved
//! pairs (GLM's `rotate_half` pairs x[2i] with x[2i+1]: candle's `rope_i`), tables built in f32. MLP:
//! fused `gate_up_proj` (first half gate), silu(gate) × up, then `down_proj`. RMSNorm in f32.
//!
//! On a CUDA device the KV cache is allocated once for the planned context and written in place, and a
//! long prompt is prefilled in chunks of [`PREFILL_CHUNK`] queries, so that no step needs more than the
//! memory plan counted; an allocation that fails anyway is reported as [`GlmError::OutOfMemory`].

use candle_core::{DType, Device, Tensor, D};
use candle_nn::ops::softmax_last_dim;
use candle_nn::rotary_emb::rope_i;

use std::path::Path;

use crate::config::Config;
use crate::error::{GlmError, Result};
use crate::gpu::{self, MeasuredMemory, MemoryTracker};
use crate::linear::Linear;
use crate::loader::{Checkpoint, LayerNorm, LayerProj, LoadOptions, WeightLoader};
use crate::plan::{human_bytes, PREFILL_CHUNK};

#[cfg(feature = "cuda")]
mod cuda_step;
#[cfg(feature = "cuda")]
pub use cuda_step::{CudaDecoder, StepLaunch};

/// RMSNorm as transformers computes it: normalize in f32, cast back, then scale by the weight.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        Ok(x.broadcast_mul(&inv_rms)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?)
    }
}

/// Rotary position embeddings: inverse frequencies kept in f32, cos/sin built per call.
#[derive(Debug, Clone)]
struct Rotary {
    inv_freq: Tensor,
    dim: usize,
}

impl Rotary {
    fn new(config: &Config, device: &Device) -> Result<Self> {
        let dim = config.rotary_dim();
        // transformers computes base ** (arange(0, rope_dim, 2) / rope_dim) in f32; so do we, to match its
        // tables (an odd rope_dim rotates one more dimension than it names).
        let theta = config.rope_theta as f32;
        let rope_dim = config.rope_dim as f32;
        let inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / rope_dim))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, dim / 2), device)?;
        Ok(Self { inv_freq, dim })
    }

    /// cos and sin of shape [seq, dim/2] for positions offset..offset+seq, in `dtype`.
    fn tables(&self, offset: usize, seq: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        let positions =
            Tensor::arange(offset as u32, (offset + seq) as u32, self.inv_freq.device())?
                .to_dtype(DType::F32)?
                .reshape((seq, 1))?;
        let freqs = positions.broadcast_mul(&self.inv_freq)?;
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }

    /// Rotates the first `dim` dimensions of x [batch, heads, seq, head_dim]; the rest pass through.
    fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let head_dim = x.dim(D::Minus1)?;
        if self.dim == head_dim {
            return Ok(rope_i(&x.contiguous()?, cos, sin)?);
        }
        let rotated = rope_i(&x.narrow(D::Minus1, 0, self.dim)?.contiguous()?, cos, sin)?;
        let pass = x.narrow(D::Minus1, self.dim, head_dim - self.dim)?;
        // cat along the last dim can return a strided view; the attention matmuls need rows.
        Ok(Tensor::cat(&[&rotated, &pass], D::Minus1)?.contiguous()?)
    }
}

/// Keys and values of every layer for the tokens seen so far, for a batch of equal-length sequences,
/// each `[batch, kv heads, tokens, head_dim]`.
///
/// Either grown by concatenation at each step, or, with a capacity, allocated once at the first step
/// for that many tokens and written in place (the decode loop then allocates nothing for it).
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Growing: the keys and values so far. With a capacity: the whole buffers.
    layers: Vec<Option<(Tensor, Tensor)>>,
    seq_len: usize,
    capacity: Option<usize>,
}

impl KvCache {
    fn new(num_layers: usize, capacity: Option<usize>) -> Self {
        Self {
            layers: vec![None; num_layers],
            seq_len: 0,
            capacity,
        }
    }

    /// Tokens cached so far: the position of the next token.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Tokens the cache was allocated for; None when it grows.
    pub fn capacity(&self) -> Option<usize> {
        self.capacity
    }

    /// Bytes held by the keys and values (for a cache with a capacity, all of it once allocated).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// Appends this step's keys/values for `layer` and returns everything cached for it.
    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let Some(capacity) = self.capacity else {
            let (k, v) = match self.layers[layer].take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k, v),
            };
            self.layers[layer] = Some((k.clone(), v.clone()));
            return Ok((k, v));
        };
        let (keys, values) = match &self.layers[layer] {
            Some(buffers) => buffers.clone(),
            None => {
                let (b, heads, _, head_dim) = k.dims4()?;
                let shape = (b, heads, capacity, head_dim);
                let buffers = (
                    Tensor::zeros(shape, k.dtype(), k.device())?,
                    Tensor::zeros(shape, v.dtype(), v.device())?,
                );
                self.layers[layer] = Some(buffers.clone());
                buffers
            }
        };
        keys.slice_set(&k, 2, self.seq_len)?;
        values.slice_set(&v, 2, self.seq_len)?;
        // Views of the filled positions: the attention matmuls read them through their strides.
        let t = self.seq_len + k.dim(2)?;
        Ok((keys.narrow(2, 0, t)?, values.narrow(2, 0, t)?))
    }

    /// With a capacity: the whole key and value buffers of `layer`, once allocated.
    #[cfg(feature = "cuda")]
    fn buffers(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.capacity.and(self.layers[layer].as_ref())
    }

    /// The batch size the cache holds, once it holds anything.
    fn batch(&self) -> Result<Option<usize>> {
        Ok(match self.layers.iter().flatten().next() {
            Some((k, _)) => Some(k.dim(0)?),
            None => None,
        })
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(w: &WeightLoader, layer: usize) -> Result<Self> {
        let c = w.config();
        let (q_proj, k_proj, v_proj) = w.qkv(layer)?;
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj: w.linear(layer, LayerProj::O)?,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        })
    }

    /// x [b, s, hidden] → [b, s, hidden]; `mask` is [s, t] (0 or -inf) or None for a single query.
    fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        tables: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((b, s, n, self.head_dim))?.transpose(1, 2)?)
        };
        let q = heads(self.q_proj.forward(x)?, self.num_heads)?;
        let k = heads(self.k_proj.forward(x)?, self.num_kv_heads)?;
        let v = heads(self.v_proj.forward(x)?, self.num_kv_heads)?.contiguous()?;
        let (cos, sin) = tables;
        let q = rotary.apply(&q, cos, sin)?;
        let k = rotary.apply(&k, cos, sin)?;
        let (k, v) = cache.append(layer, k, v)?;
        let t = k.dim(2)?;
        let scale = (self.head_dim as f64).powf(-0.5);

        // One decode token over a preallocated cache on the GPU: softmax(q·Kᵀ)·V in one kernel, with no
        // scores or probabilities tensors.
        #[cfg(feature = "cuda")]
        if s == 1 && mask.is_none() && q.device().is_cuda() {
            if let Some((keys, values)) = cache.buffers(layer) {
                let rep = self.num_heads / self.num_kv_heads;
                let q = q.reshape((b, self.num_kv_heads, rep, self.head_dim))?;
                let out = glm_kernels::decode_attention(&q, keys, values, t, scale as f32)
                    .map_err(crate::gpu::kernel_error)?;
                // [b, heads, 1, head_dim] and [b, 1, heads, head_dim] are the same order in memory.
                let out = out.reshape((b, 1, self.num_heads * self.head_dim))?;
                return self.o_proj.forward(&out);
            }
        }

        // Grouped-query attention without copying k/v: the `rep` query heads sharing a kv head are
        // stacked along the sequence axis, so one batched matmul per kv head covers them.
        let rep = self.num_heads / self.num_kv_heads;
        let q = q.reshape((b, self.num_kv_heads, rep * s, self.head_dim))?;
        // Scores in f32 from f16/bf16 q and k, as transformers' sdpa computes them: rounded to half they
        // lose the small differences between keys under a large common term (a large q/k bias).
        let scores = (q
            .to_dtype(DType::F32)?
            .matmul(&k.to_dtype(DType::F32)?.t()?)?
            * scale)?;
        let scores = match mask {
            Some(mask) => scores
                .reshape((b, self.num_kv_heads, rep, s, t))?
                .broadcast_add(mask)?
                .reshape((b, self.num_kv_heads, rep * s, t))?,
            None => scores,
        };
        let probs = softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs
            .matmul(&v)?
            .reshape((b, self.num_heads, s, self.head_dim))?
            .transpose(1, 2)?
            .reshape((b, s, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }
}

#[derive(Debug)]
struct Mlp {
    gate_up_proj: Linear,
    down_proj: Linear,
    intermediate_size: usize,
}

impl Mlp {
    fn load(w: &WeightLoader, layer: usize) -> Result<Self> {
        Ok(Self {
            gate_up_proj: w.linear(layer, LayerProj::GateUp)?,
            down_proj: w.linear(layer, LayerProj::Down)?,
            intermediate_size: w.config().intermediate_size,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(x)?;
        let gate = gate_up.narrow(D::Minus1, 0, self.intermediate_size)?;
        let up = gate_up.narrow(D::Minus1, self.intermediate_size, self.intermediate_size)?;
        self.down_proj
            .forward(&(candle_nn::ops::silu(&gate)? * up)?)
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    /// Glm4 only: norms on the attention and MLP outputs before each residual add.
    post_sublayer_norms: Option<(RmsNorm, RmsNorm)>,
}

impl DecoderLayer {
    fn load(w: &WeightLoader, layer: usize) -> Result<Self> {
        let norm = |which| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: w.layer_norm(layer, which)?,
                eps: w.config().rms_norm_eps,
            })
        };
        let post_sublayer_norms = if w.config().architecture.has_post_sublayer_norms() {
            Some((norm(LayerNorm::PostSelfAttn)?, norm(LayerNorm::PostMlp)?))
        } else {
            None
        };
        Ok(Self {
            input_layernorm: norm(LayerNorm::Input)?,
            self_attn: Attention::load(w, layer)?,
            post_attention_layernorm: norm(LayerNorm::PostAttention)?,
            mlp: Mlp::load(w, layer)?,
            post_sublayer_norms,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        tables: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let mut attn = self.self_attn.forward(
            &self.input_layernorm.forward(x)?,
            rotary,
            tables,
            mask,
            cache,
            layer,
        )?;
        if let Some((post_attn, _)) = &self.post_sublayer_norms {
            attn = post_attn.forward(&attn)?;
        }
        let h = (x + attn)?;
        let mut mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h)?)?;
        if let Some((_, post_mlp)) = &self.post_sublayer_norms {
            mlp = post_mlp.forward(&mlp)?;
        }
        Ok((h + mlp)?)
    }
}

/// The language model: token ids in, logits out, with a [`KvCache`] carried between calls.
#[derive(Debug)]
pub struct Model {
    config: Config,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// None when the lm_head is tied to the embedding table.
    lm_head: Option<Linear>,
    rotary: Rotary,
    dtype: DType,
    device: Device,
    kv_capacity: Option<usize>,
    /// Device memory since the load began (CUDA only).
    memory: Option<MemoryTracker>,
    notes: Vec<String>,
}

impl Model {
    /// Loads a model directory: config.json (+ generation_config.json) and its safetensors checkpoint.
    pub fn load(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let config = Config::from_model_dir(dir)?;
        let checkpoint = Checkpoint::open(dir)?;
        Self::from_checkpoint(&config, &checkpoint, options)
    }

    /// Builds the model from an opened checkpoint with `config`.
    pub fn from_checkpoint(
        config: &Config,
        checkpoint: &Checkpoint,
        options: &LoadOptions,
    ) -> Result<Self> {
        let load = || -> Result<Self> {
            let loader = WeightLoader::new(checkpoint, config, options)?;
            let mut model = Self::from_loader(&loader)?;
            model.kv_capacity = options.kv_capacity;
            (model.memory, model.notes) = loader.finish()?;
            Ok(model)
        };
        let mut model = load().map_err(|e| {
            gpu::explain_out_of_memory(e, &options.device, || {
                format!("loading {}", checkpoint.dir().display())
            })
        })?;
        if options.quantize.is_some() && config.quantization.is_some() {
            model.notes.push(
                "the checkpoint is already quantized to 4 bits: its stored weights are used as they are"
                    .into(),
            );
        }
        Ok(model)
    }

    /// Things the load noticed and the user should hear once (ignored tensors, ...).
    pub fn load_notes(&self) -> &[String] {
        &self.notes
    }

    /// Builds every module from the loader's weights.
    fn from_loader(w: &WeightLoader) -> Result<Self> {
        let config = w.config().clone();
        let embed_tokens = w.embed_tokens()?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load(w, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm {
            weight: w.final_norm()?,
            eps: config.rms_norm_eps,
        };
        let lm_head = w.lm_head()?;
        let rotary = Rotary::new(&config, w.device())?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary,
            dtype: w.dtype(),
            device: w.device().clone(),
            config,
            kv_capacity: None,
            memory: None,
            notes: Vec::new(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The compute dtype of activations and dense weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for a new batch of sequences: allocated at the first step for the load's
    /// `kv_capacity` tokens, or growing without one.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len(), self.kv_capacity)
    }

    /// Device memory the model used, from the driver (CUDA only): after the load, the load's peak, and
    /// the peak since (KV cache and prefill included).
    pub fn measured_memory(&self) -> Option<MeasuredMemory> {
        self.memory.as_ref().map(MemoryTracker::measured)
    }

    /// Bytes of every weight held on the model's device (NF4 weights counted packed; an embedding table
    /// kept in host memory is not counted).
    pub fn weight_bytes(&self) -> usize {
        let tensor_bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let norms = [&l.input_layernorm, &l.post_attention_layernorm]
                    .into_iter()
                    .chain(l.post_sublayer_norms.iter().flat_map(|(a, b)| [a, b]))
                    .map(|n| tensor_bytes(&n.weight))
                    .sum::<usize>();
                let a = &l.self_attn;
                norms
                    + [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]
                        .iter()
                        .map(|p| p.weight_bytes())
                        .sum::<usize>()
                    + l.mlp.gate_up_proj.weight_bytes()
                    + l.mlp.down_proj.weight_bytes()
            })
            .sum();
        let embedding = if self.embed_tokens.device().same_device(&self.device) {
            tensor_bytes(&self.embed_tokens)
        } else {
            0
        };
        embedding
            + layers
            + tensor_bytes(&self.norm.weight)
            + self.lm_head.as_ref().map_or(0, Linear::weight_bytes)
    }

    /// Runs `input_ids` [batch, seq] (u32) after what `cache` holds and returns the f32 logits of the
    /// last position, [batch, vocab]. The first call with an empty cache is the prefill.
    pub fn forward(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.explained(input_ids, || {
            let hidden = self.hidden_states(input_ids, cache, false)?;
            // A batch's last rows are strided in `hidden`; the matmuls want them packed.
            let last = hidden
                .narrow(1, hidden.dim(1)? - 1, 1)?
                .squeeze(1)?
                .contiguous()?;
            self.logits(&last)
        })
    }

    /// As [`Model::forward`], but the logits of every position: [batch, seq, vocab].
    pub fn forward_all(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.explained(input_ids, || {
            let hidden = self.hidden_states(input_ids, cache, true)?;
            self.logits(&hidden)
        })
    }

    /// Runs a forward step, samples the device memory after a prefill, and reports a failed device
    /// allocation with numbers.
    fn explained(
        &self,
        input_ids: &Tensor,
        step: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let tokens = input_ids.elem_count();
        let result = step().and_then(|logits| {
            if let Some(memory) = self.memory.as_ref().filter(|_| tokens > 1) {
                memory.sample()?;
            }
            Ok(logits)
        });
        result.map_err(|e| {
            gpu::explain_out_of_memory(e, &self.device, || {
                format!(
                    "a forward step over {} token ids (model weights {})",
                    input_ids.elem_count(),
                    human_bytes(self.weight_bytes() as u64)
                )
            })
        })
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden)?,
            None => hidden.broadcast_matmul(&self.embed_tokens.t()?)?,
        };
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// Final hidden states of every position (`all`) or of the last chunk of at most [`PREFILL_CHUNK`]
    /// positions, whose last row is the last position.
    fn hidden_states(&self, input_ids: &Tensor, cache: &mut KvCache, all: bool) -> Result<Tensor> {
        let (b, s) = self.check_input(input_ids, cache)?;
        // A failure part-way through must not leave the cache half-extended.
        let saved = (cache.layers.clone(), cache.seq_len);
        let result = self.run_chunks(input_ids, b, s, cache, all);
        if result.is_err() {
            (cache.layers, cache.seq_len) = saved;
        }
        result
    }

    /// A long prompt in chunks of [`PREFILL_CHUNK`] queries, each attending to the cache and itself,
    /// so the attention scores stay within what the memory plan counted.
    fn run_chunks(
        &self,
        input_ids: &Tensor,
        b: usize,
        s: usize,
        cache: &mut KvCache,
        all: bool,
    ) -> Result<Tensor> {
        let mut kept = Vec::new();
        for start in (0..s).step_by(PREFILL_CHUNK) {
            let len = PREFILL_CHUNK.min(s - start);
            let ids = input_ids.narrow(1, start, len)?;
            let hidden = self.run_layers(&ids, b, len, cache)?;
            if all || start + len == s {
                kept.push(hidden);
            }
        }
        Ok(match kept.len() {
            1 => kept.remove(0),
            _ => Tensor::cat(&kept, 1)?,
        })
    }

    fn run_layers(
        &self,
        input_ids: &Tensor,
        b: usize,
        s: usize,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let offset = cache.seq_len;
        // The lookup runs where the table is (host memory or the device); the rows go to the device.
        let ids = input_ids
            .to_device(self.embed_tokens.device())?
            .flatten_all()?;
        let mut x = self
            .embed_tokens
            .index_select(&ids, 0)?
            .reshape((b, s, self.config.hidden_size))?
            .to_device(&self.device)?;
        let tables = self.rotary.tables(offset, s, self.dtype)?;
        let mask = if s > 1 {
            Some(causal_mask(s, offset, &self.device)?)
        } else {
            None
        };
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &self.rotary, &tables, mask.as_ref(), cache, i)?;
        }
        cache.seq_len += s;
        self.norm.forward(&x)
    }

    fn check_input(&self, input_ids: &Tensor, cache: &KvCache) -> Result<(usize, usize)> {
        if input_ids.dtype() != DType::U32 {
            return Err(GlmError::Input(format!(
                "token ids must be u32, got {:?}",
                input_ids.dtype()
            )));
        }
        let (b, s) = input_ids.dims2().map_err(|_| {
            GlmError::Input(format!(
                "token ids must have shape [batch, seq], got {:?}",
                input_ids.dims()
            ))
        })?;
        if b == 0 || s == 0 {
            return Err(GlmError::Input(format!(
                "empty input: token ids of shape [{b}, {s}]"
            )));
        }
        if cache.layers.len() != self.layers.len() {
            return Err(GlmError::Input(
                "the KV cache belongs to a different model".into(),
            ));
        }
        if let Some(held) = cache.batch()?.filter(|&held| held != b) {
            return Err(GlmError::Input(format!(
                "batch of {b} sequences, but the KV cache holds {held}"
            )));
        }
        if let Some(capacity) = cache.capacity.filter(|&c| cache.seq_len + s > c) {
            return Err(GlmError::Input(format!(
                "{} cached + {s} new tokens exceed the KV cache's capacity of {capacity} tokens: plan \
                 a longer context (--context)",
                cache.seq_len
            )));
        }
        let max = input_ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max as usize >= self.config.vocab_size {
            return Err(GlmError::Input(format!(
                "token id {max} is outside the vocabulary of {} tokens",
                self.config.vocab_size
            )));
        }
        Ok((b, s))
    }
}

/// [s, offset + s] additive mask: query i (at position offset + i) sees keys 0..=offset + i.
fn causal_mask(s: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let t = offset + s;
    let mask: Vec<f32> = (0..s)
        .flat_map(|i| {
            (0..t).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (s, t), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_model(kv_capacity: Option<usize>) -> Model {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/models/glm4"
        );
        let options = LoadOptions {
            kv_capacity,
            ..LoadOptions::default()
        };
        Model::load(dir, &options).unwrap()
    }

    fn ids(tokens: &[u32]) -> Tensor {
        Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Token ids spread over the fixture's vocabulary of 320.
    fn prompt(len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| (i * 37 + 11) % 320).collect()
    }

    #[test]
    fn preallocated_cache_gives_the_growing_caches_logits() {
        let growing = fixture_model(None);
        let preallocated = fixture_model(Some(16));
        let (mut a, mut b) = (growing.new_cache(), preallocated.new_cache());
        let tokens = prompt(12);
        let first = growing.forward(&ids(&tokens[..7]), &mut a).unwrap();
        let second = preallocated.forward(&ids(&tokens[..7]), &mut b).unwrap();
        assert!(max_diff(&first, &second) < 1e-5);
        for &t in &tokens[7..] {
            let first = growing.forward(&ids(&[t]), &mut a).unwrap();
            let second = preallocated.forward(&ids(&[t]), &mut b).unwrap();
            assert!(max_diff(&first, &second) < 1e-5);
        }
        // Allocated once, for the whole capacity: 2 layers × (k, v) × 2 kv heads × 16 × 48 × f32.
        assert_eq!(b.capacity(), Some(16));
        assert_eq!(b.bytes(), 2 * 2 * 2 * 16 * 48 * 4);
        assert_eq!(b.seq_len(), 12);

        // Past the capacity: an error that names it, and the cache as it was.
        let err = preallocated.forward(&ids(&prompt(5)), &mut b).unwrap_err();
        assert!(err.to_string().contains("capacity of 16"), "{err}");
        assert_eq!(b.seq_len(), 12);
        preallocated.forward(&ids(&prompt(4)), &mut b).unwrap();
        assert_eq!(b.seq_len(), 16);
    }

    #[test]
    fn long_prompts_are_prefilled_in_chunks_with_the_same_result() {
        let model = fixture_model(Some(PREFILL_CHUNK + 100));
        let tokens = prompt(PREFILL_CHUNK + 88);
        // In chunks of PREFILL_CHUNK inside one call, and split elsewhere over two calls.
        let mut cache = model.new_cache();
        let all = model.forward_all(&ids(&tokens), &mut cache).unwrap();
        assert_eq!(all.dims(), [1, tokens.len(), 320]);
        assert_eq!(cache.seq_len(), tokens.len());
        let mut split = model.new_cache();
        let half = tokens.len() / 2;
        let head = model
            .forward_all(&ids(&tokens[..half]), &mut split)
            .unwrap();
        let tail = model
            .forward_all(&ids(&tokens[half..]), &mut split)
            .unwrap();
        let joined = Tensor::cat(&[head, tail], 1).unwrap();
        let scale = all
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = max_diff(&all, &joined);
        assert!(diff <= 1e-5 * scale, "{diff} vs scale {scale}");
        // `forward` returns the last position's logits of the same run.
        let last = model
            .forward(&ids(&tokens), &mut model.new_cache())
            .unwrap();
        let want = all.get(0).unwrap().get(tokens.len() - 1).unwrap();
        assert!(max_diff(&last.squeeze(0).unwrap(), &want) <= 1e-5 * scale);
    }
}
