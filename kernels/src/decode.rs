//! The kernels of one decode step that are not matmuls: RMSNorm fused with the residual add, q/k/v bias +
//! rotary + KV-cache write, silu·up, embedding lookup and greedy argmax (norm.cu, rotary.cu, activation.cu,
//! embedding.cu, argmax.cu), the decode-attention variant that reads the position from device memory
//! (attention.cu), and a dense GEMV that writes into a given buffer (gemv_dense.cu).
//!
//! They work on raw device pointers into buffers the caller keeps alive (model weights, the KV cache, the
//! decode step's preallocated scratch), so that a decode step allocates nothing and can be captured once as a
//! CUDA graph: every argument is fixed at capture, and what changes between steps (the token ids, the position)
//! is read by the kernels from device memory.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaStream, DevicePtr, LaunchConfig,
};
use candle_core::{CudaDevice, DType};

use crate::launch::KernelArgs;

use crate::tensor::dtype_suffix;
use crate::{
    KernelError, Module, ACTIVATION, ARGMAX, ATTENTION, EMBEDDING, GEMV_DENSE, NORM, ROTARY,
};

/// A device address (`CUdeviceptr`) of elements of the step's dtype (or of u32 for token ids and the position).
pub type DevicePointer = u64;

/// The device address of a CUDA slice or view. No event is recorded: the decode step runs on one stream.
pub fn device_pointer<T, S: DevicePtr<T>>(slice: &S, dev: &CudaDevice) -> DevicePointer {
    slice.device_ptr(&dev.cuda_stream()).0
}

/// Threads per block of the embedding lookup.
const ROW_THREADS: u32 = 256;
/// kernels/norm.cu: NORM_THREADS per row, each holding up to NORM_PER_THREAD elements.
const NORM_THREADS: u32 = 1024;
/// The widest row the norm kernels take.
pub const NORM_MAX_DIM: usize = 1024 * 8;
/// kernels/gemv_dense.cu: DENSE_WARPS warps per block, one output row each; DENSE_MAX_BATCH rows of x.
const DENSE_WARPS: u32 = 8;
pub const DENSE_MAX_ROWS: usize = 8;
/// kernels/argmax.cu: ARGMAX_THREADS per block, ARGMAX_BLOCKS blocks per row.
const ARGMAX_THREADS: u32 = 256;
const ARGMAX_BLOCKS: usize = 64;

/// Bytes of the zero-initialized scratch [`DecodeKernels::argmax_rows`] needs for up to `rows` rows: per row a
/// counter (which the kernel leaves at zero for the next call) and a value and an index per block.
pub const fn argmax_scratch_bytes(rows: usize) -> usize {
    rows * (8 + ARGMAX_BLOCKS * 8)
}
/// kernels/attention.cu's split decode attention: spans of the cache per kv head (the grid's y), at most
/// ATTENTION_MAX_WARPS warps (query heads) per block, head_dim up to 256 (ATTN_SPANS, ATTN_MAX_WARPS).
const ATTENTION_SPANS: usize = 64;
const ATTENTION_MAX_WARPS: usize = 16;
const ATTENTION_MAX_HEAD_DIM: usize = 256;

/// Bytes of the zero-initialized scratch [`DecodeKernels::attention_at`] needs for `heads_total` query heads of
/// `head_dim`: a counter per kv head (left at zero by every call), then each span's running max and sum and its
/// unnormalized output per query head.
pub const fn attention_scratch_bytes(heads_total: usize, head_dim: usize) -> usize {
    attention_counter_bytes(heads_total) + heads_total * ATTENTION_SPANS * (2 + head_dim) * 4
}

/// The counters at the start of the attention scratch, padded to 16 bytes.
const fn attention_counter_bytes(heads_total: usize) -> usize {
    (heads_total * 4).div_ceil(16) * 16
}

/// The rotary/KV-write launch's shapes and operands (see kernels/rotary.cu).
#[derive(Debug, Clone, Copy)]
pub struct RotaryKvWrite {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub capacity: usize,
    /// `[batch, heads * head_dim]`, `[batch, kv_heads * head_dim]` twice: the projections before bias.
    pub q_raw: DevicePointer,
    pub k_raw: DevicePointer,
    pub v_raw: DevicePointer,
    /// The biases, or None.
    pub biases: Option<[DevicePointer; 3]>,
    /// f32 `[rotary_dim / 2]`.
    pub inv_freq: DevicePointer,
    /// u32: the position of this step's token.
    pub pos: DevicePointer,
    /// `[batch, heads, head_dim]`, and the caches `[batch, kv_heads, capacity, head_dim]`.
    pub q_out: DevicePointer,
    pub k_cache: DevicePointer,
    pub v_cache: DevicePointer,
}

/// The decode-step kernels for one dtype on one device, loaded once (a graph capture must not load modules).
pub struct DecodeKernels {
    dtype: DType,
    stream: Arc<CudaStream>,
    rms_norm: CudaFunction,
    residual_rms_norm: CudaFunction,
    rotary_kv_write: CudaFunction,
    attention: CudaFunction,
    silu_mul: CudaFunction,
    embed_rows: CudaFunction,
    argmax_rows: CudaFunction,
    gemv_dense: CudaFunction,
}

impl DecodeKernels {
    /// Loads the kernels for activations of `dtype` (f32, f16 or bf16).
    pub fn new(dev: &CudaDevice, dtype: DType) -> Result<Self, KernelError> {
        let Some(suffix) = dtype_suffix(dtype) else {
            return Err(KernelError::UnsupportedDtype {
                name: "decode step".into(),
                dtype,
            });
        };
        let load = |name: &str, module: &Module| module.function(dev, &format!("{name}_{suffix}"));
        Ok(Self {
            dtype,
            stream: dev.cuda_stream(),
            rms_norm: load("rms_norm", &NORM)?,
            residual_rms_norm: load("residual_rms_norm", &NORM)?,
            rotary_kv_write: load("rotary_kv_write", &ROTARY)?,
            attention: load("decode_attention_at", &ATTENTION)?,
            silu_mul: load("silu_mul", &ACTIVATION)?,
            embed_rows: load("embed_rows", &EMBEDDING)?,
            argmax_rows: load("argmax_rows", &ARGMAX)?,
            gemv_dense: load("gemv_dense", &GEMV_DENSE)?,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Launches `func` on the step's stream; `overlap` as [`KernelArgs::launch`].
    ///
    /// # Safety
    /// As [`KernelArgs::launch`].
    unsafe fn launch(
        &self,
        func: &CudaFunction,
        args: &mut KernelArgs,
        cfg: LaunchConfig,
        overlap: bool,
    ) -> Result<(), KernelError> {
        unsafe { args.launch(func, &self.stream, cfg, overlap) }
    }

    /// `out = RmsNorm(x) · weight` for `rows` rows of `dim`.
    ///
    /// # Safety
    /// `x`, `out` hold `rows * dim` and `weight` `dim` elements of the kernels' dtype on this device.
    pub unsafe fn rms_norm(
        &self,
        x: DevicePointer,
        weight: DevicePointer,
        out: DevicePointer,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), KernelError> {
        check_norm_dim(dim)?;
        let dim = dim as u32;
        let mut args = KernelArgs::new();
        args.arg(x).arg(weight).arg(out).arg(dim).arg(eps);
        unsafe {
            self.launch(
                &self.rms_norm,
                &mut args,
                rows_config(rows, NORM_THREADS),
                false,
            )
        }?;
        Ok(())
    }

    /// `residual += delta` (or `+= RmsNorm(delta) · delta_weight`), then `out = RmsNorm(residual) · weight`.
    ///
    /// # Safety
    /// `residual`, `delta`, `out` hold `rows * dim` elements, the weights `dim`, all of the kernels' dtype.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn residual_rms_norm(
        &self,
        residual: DevicePointer,
        delta: DevicePointer,
        delta_weight: Option<DevicePointer>,
        weight: DevicePointer,
        out: DevicePointer,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), KernelError> {
        check_norm_dim(dim)?;
        let (dim, delta_weight) = (dim as u32, delta_weight.unwrap_or(0));
        let mut args = KernelArgs::new();
        args.arg(residual)
            .arg(delta)
            .arg(delta_weight)
            .arg(weight)
            .arg(out)
            .arg(dim)
            .arg(eps);
        unsafe {
            self.launch(
                &self.residual_rms_norm,
                &mut args,
                rows_config(rows, NORM_THREADS),
                true,
            )
        }?;
        Ok(())
    }

    /// q/k/v bias, rotary embedding of q and k, and k/v written into the cache at the position `r.pos` holds.
    ///
    /// # Safety
    /// Every pointer of `r` holds what its field's documentation says, on this device; `*pos < capacity`.
    pub unsafe fn rotary_kv_write(&self, r: &RotaryKvWrite) -> Result<(), KernelError> {
        let [q_bias, k_bias, v_bias] = r.biases.unwrap_or([0; 3]);
        let (heads, kv_heads, head_dim, rotary_dim, capacity) = (
            r.heads as u32,
            r.kv_heads as u32,
            r.head_dim as u32,
            r.rotary_dim as u32,
            r.capacity as u32,
        );
        let mut args = KernelArgs::new();
        args.arg(r.q_raw)
            .arg(r.k_raw)
            .arg(r.v_raw)
            .arg(q_bias)
            .arg(k_bias)
            .arg(v_bias)
            .arg(r.inv_freq)
            .arg(r.pos)
            .arg(r.q_out)
            .arg(r.k_cache)
            .arg(r.v_cache)
            .arg(heads)
            .arg(kv_heads)
            .arg(head_dim)
            .arg(rotary_dim)
            .arg(capacity);
        let cfg = LaunchConfig {
            grid_dim: ((r.heads + 2 * r.kv_heads) as u32, r.batch as u32, 1),
            block_dim: ((r.head_dim / 2).clamp(32, 128) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { self.launch(&self.rotary_kv_write, &mut args, cfg, true) }?;
        Ok(())
    }

    /// softmax(q·Kᵀ·scale)·V over the first `*pos + 1` cached tokens; shapes as [`crate::decode_attention`]
    /// with `heads_total = batch * heads`. Spans of the cache run in parallel and are merged at the end
    /// (kernels/attention.cu), through `scratch`.
    ///
    /// # Safety
    /// `q`, `out` hold `heads_total * head_dim` elements, the caches `batch * kv_heads * capacity * head_dim`;
    /// `*pos < capacity`; `scratch` holds [`attention_scratch_bytes`]`(heads_total, head_dim)` bytes, zeroed
    /// before the first call (every call leaves it so) and used by one launch at a time.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attention_at(
        &self,
        q: DevicePointer,
        k_cache: DevicePointer,
        v_cache: DevicePointer,
        out: DevicePointer,
        heads_total: usize,
        rep: usize,
        capacity: usize,
        pos: DevicePointer,
        head_dim: usize,
        scale: f32,
        scratch: DevicePointer,
    ) -> Result<(), KernelError> {
        if rep == 0
            || !heads_total.is_multiple_of(rep)
            || head_dim == 0
            || head_dim > ATTENTION_MAX_HEAD_DIM
        {
            return Err(KernelError::Attention(format!(
                "{heads_total} query heads in groups of {rep} with head_dim {head_dim}: the decode step takes \
                 whole groups and head_dim 1 to {ATTENTION_MAX_HEAD_DIM}"
            )));
        }
        let groups = heads_total / rep;
        let warps = rep.min(ATTENTION_MAX_WARPS) as u32;
        let counters = scratch;
        let partial_ml = scratch + attention_counter_bytes(heads_total) as u64;
        let partial_acc = partial_ml + (heads_total * ATTENTION_SPANS * 8) as u64;
        let (rep, capacity, head_dim) = (rep as u32, capacity as u32, head_dim as u32);
        let mut args = KernelArgs::new();
        args.arg(q)
            .arg(k_cache)
            .arg(v_cache)
            .arg(out)
            .arg(rep)
            .arg(capacity)
            .arg(pos)
            .arg(head_dim)
            .arg(scale)
            .arg(counters)
            .arg(partial_ml)
            .arg(partial_acc);
        let cfg = LaunchConfig {
            grid_dim: (groups as u32, ATTENTION_SPANS as u32, 1),
            block_dim: (32 * warps, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { self.launch(&self.attention, &mut args, cfg, true) }?;
        Ok(())
    }

    /// `out [rows, inter] = silu(gate) · up` of `gate_up [rows, 2 * inter]`.
    ///
    /// # Safety
    /// The pointers hold those many elements of the kernels' dtype.
    pub unsafe fn silu_mul(
        &self,
        gate_up: DevicePointer,
        out: DevicePointer,
        rows: usize,
        inter: usize,
    ) -> Result<(), KernelError> {
        let (total, inter32) = (rows * inter, inter as u32);
        let mut args = KernelArgs::new();
        args.arg(gate_up).arg(out).arg(inter32).arg(total);
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(256).min(65535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { self.launch(&self.silu_mul, &mut args, cfg, true) }?;
        Ok(())
    }

    /// `out [rows, hidden]` = rows `tokens[0..rows]` of `table`.
    ///
    /// # Safety
    /// `tokens` holds `rows` u32 ids below the table's row count; `out` `rows * hidden` elements.
    pub unsafe fn embed_rows(
        &self,
        table: DevicePointer,
        tokens: DevicePointer,
        out: DevicePointer,
        rows: usize,
        hidden: usize,
    ) -> Result<(), KernelError> {
        let hidden = hidden as u32;
        let mut args = KernelArgs::new();
        args.arg(table).arg(tokens).arg(out).arg(hidden);
        unsafe {
            self.launch(
                &self.embed_rows,
                &mut args,
                rows_config(rows, ROW_THREADS),
                false,
            )
        }?;
        Ok(())
    }

    /// `tokens[r]` = the first index of the maximum of row r of `logits [rows, vocab]` (0xffffffff for a row
    /// holding NaN), then `*pos += 1`.
    ///
    /// # Safety
    /// `logits` holds `rows * vocab` elements, `tokens` `rows` u32, `pos` one u32, `scratch`
    /// [`argmax_scratch_bytes`]`(rows)` bytes, zeroed before the first call (every call leaves it so).
    pub unsafe fn argmax_rows(
        &self,
        logits: DevicePointer,
        vocab: usize,
        tokens: DevicePointer,
        pos: DevicePointer,
        rows: usize,
        scratch: DevicePointer,
    ) -> Result<(), KernelError> {
        let vocab = vocab as u32;
        let mut args = KernelArgs::new();
        args.arg(logits)
            .arg(vocab)
            .arg(tokens)
            .arg(pos)
            .arg(scratch);
        let cfg = LaunchConfig {
            grid_dim: (ARGMAX_BLOCKS as u32, rows as u32, 1),
            block_dim: (ARGMAX_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { self.launch(&self.argmax_rows, &mut args, cfg, true) }?;
        Ok(())
    }

    /// `y [rows, n] = x [rows, k] · wᵀ` for a dense `w [n, k]`, rows ≤ [`DENSE_MAX_ROWS`].
    ///
    /// # Safety
    /// The pointers hold those many elements of the kernels' dtype.
    pub unsafe fn gemv_dense(
        &self,
        w: DevicePointer,
        x: DevicePointer,
        y: DevicePointer,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<(), KernelError> {
        unsafe { self.launch_gemv_dense([(w, y), (w, y)], 1, x, rows, n, k) }
    }

    /// [`Self::gemv_dense`] for two weights of one shape (GLM's k and v) in one launch, so the two small
    /// GEMVs overlap.
    ///
    /// # Safety
    /// As [`Self::gemv_dense`], for both weights and outputs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemv_dense_pair(
        &self,
        weights: [(DevicePointer, DevicePointer); 2],
        x: DevicePointer,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<(), KernelError> {
        unsafe { self.launch_gemv_dense(weights, 2, x, rows, n, k) }
    }

    /// The first `count` of `weights` (weight, output) times x.
    unsafe fn launch_gemv_dense(
        &self,
        weights: [(DevicePointer, DevicePointer); 2],
        count: u32,
        x: DevicePointer,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<(), KernelError> {
        if rows == 0 || rows > DENSE_MAX_ROWS {
            return Err(KernelError::BadInput {
                name: "dense GEMV".into(),
                problem: format!("{rows} rows of x: the kernel takes 1 to {DENSE_MAX_ROWS}"),
            });
        }
        let elem = self.dtype.size_in_bytes() as u64;
        let [(w0, y0), (w1, y1)] = weights;
        // 16-byte loads need 16-byte aligned rows of w and x.
        let vectorized = u32::from(
            (k as u64 * elem).is_multiple_of(16)
                && [w0, w1, x].iter().all(|p| p.is_multiple_of(16)),
        );
        let (n32, k32, rows32) = (n as u32, k as u32, rows as u32);
        let mut args = KernelArgs::new();
        args.arg(w0)
            .arg(y0)
            .arg(w1)
            .arg(y1)
            .arg(x)
            .arg(n32)
            .arg(k32)
            .arg(rows32)
            .arg(vectorized);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(DENSE_WARPS as usize) as u32, count, 1),
            block_dim: (32 * DENSE_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { self.launch(&self.gemv_dense, &mut args, cfg, true) }?;
        Ok(())
    }
}

fn check_norm_dim(dim: usize) -> Result<(), KernelError> {
    if dim == 0 || dim > NORM_MAX_DIM {
        return Err(KernelError::BadInput {
            name: "RMSNorm".into(),
            problem: format!("rows of {dim} elements: the kernel takes 1 to {NORM_MAX_DIM}"),
        });
    }
    Ok(())
}

/// One block of `threads` per row.
fn rows_config(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}
