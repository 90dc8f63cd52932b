//! The kernels of one decode step that are not NF4 matmuls: RMSNorm fused with the residual add, q/k/v bias +
//! rotary + KV-cache write, silu·up, embedding lookup and greedy argmax (norm.cu, rotary.cu, activation.cu,
//! embedding.cu, argmax.cu), the decode-attention variant that reads the position from device memory
//! (attention.cu), and a dense GEMV that writes into a given buffer (gemv_dense.cu). The GEMVs can normalize their
//! own input ([`NormedInput`]), which takes the norm kernels out of the step.
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

use crate::launch::{allow_dynamic_shared, resident_blocks, KernelArgs};

use crate::matmul::GEMV_GROUP;
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

/// The input of a projection that normalizes it itself, or of the norm kernel: `x = RmsNorm(residual + added) ·
/// weight` per row, where `added` is `delta`, `RmsNorm(delta) · delta_weight` (GLM-4-0414's norm of the sublayer
/// output) or nothing (kernels/common.cuh `NormedInput`). Rows of `dim` elements of the kernels' dtype.
#[derive(Debug, Clone, Copy)]
pub struct NormedInput {
    /// `[rows, dim]`: the residual stream before this sublayer's output is added.
    pub residual: DevicePointer,
    /// `[rows, dim]`: the sublayer output added to it; None adds nothing.
    pub delta: Option<DevicePointer>,
    /// `[dim]`: the norm of `delta` before it is added (GLM-4-0414); ignored without a delta.
    pub delta_weight: Option<DevicePointer>,
    /// `[dim]`: the norm's weight.
    pub weight: DevicePointer,
    /// `[rows, dim]`: where the sum goes, or nowhere. A GEMV's blocks all read `residual`, so for a GEMV it must be
    /// another buffer; the norm kernel may write it in place.
    pub residual_out: Option<DevicePointer>,
    /// `[rows, dim]`: where x goes, or nowhere (a GEMV keeps x in shared memory; the norm kernel needs it).
    pub normed_out: Option<DevicePointer>,
    pub eps: f32,
}

impl NormedInput {
    /// Whether every buffer is 16-byte aligned, as the GEMVs' 16-byte loads and stores need (rows of a width
    /// that keeps them aligned are the caller's check).
    pub(crate) fn aligned(&self) -> bool {
        [self.residual, self.weight]
            .into_iter()
            .chain(self.delta)
            .chain(self.delta_weight)
            .chain(self.residual_out)
            .chain(self.normed_out)
            .all(|p| p.is_multiple_of(16))
    }

    /// The kernels' NORMED_INPUT_PARAMS, in order (null for None).
    pub(crate) fn push_args(&self, args: &mut KernelArgs) {
        args.arg(self.residual)
            .arg(self.delta.unwrap_or(0))
            .arg(self.delta_weight.unwrap_or(0))
            .arg(self.weight)
            .arg(self.residual_out.unwrap_or(0))
            .arg(self.normed_out.unwrap_or(0))
            .arg(self.eps);
    }
}

/// Where the rows of x of a GEMV come from.
#[derive(Debug, Clone, Copy)]
pub enum GemvInput {
    /// A buffer of `[rows, K]`.
    Rows(DevicePointer),
    /// Computed by the GEMV itself from a [`NormedInput`], in every block.
    Normed(NormedInput),
}

impl GemvInput {
    /// Whether x's first row and buffers are 16-byte aligned, as the GEMVs' 16-byte loads need (rows of a width
    /// that keeps every row as aligned as the first are the caller's check).
    pub(crate) fn aligned(&self) -> bool {
        match self {
            GemvInput::Rows(x) => x.is_multiple_of(16),
            GemvInput::Normed(normed) => normed.aligned(),
        }
    }
}

/// A dense weight `[n, k]` of a [`DecodeKernels::gemv_dense`] launch and its output `[rows, n]`.
#[derive(Debug, Clone, Copy)]
pub struct DenseGemv {
    pub weight: DevicePointer,
    pub y: DevicePointer,
    pub n: usize,
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

/// The split decode attention's operands (kernels/attention.cu `decode_attention_at_*`).
#[derive(Debug, Clone, Copy)]
pub struct AttentionAt {
    /// `[heads_total, head_dim]`, the `rep` query heads of a kv head consecutive; the output likewise.
    pub q: DevicePointer,
    pub out: DevicePointer,
    /// `[heads_total / rep, capacity, head_dim]` each.
    pub k_cache: DevicePointer,
    pub v_cache: DevicePointer,
    pub heads_total: usize,
    pub rep: usize,
    pub capacity: usize,
    pub head_dim: usize,
    /// u32: the cache holds `*pos + 1` tokens.
    pub pos: DevicePointer,
    pub scale: f32,
    /// [`attention_scratch_bytes`]`(heads_total, head_dim)` bytes, zeroed before the first launch (every launch
    /// leaves it so), used by one launch at a time.
    pub scratch: DevicePointer,
}

/// Launches `func` (decode_attention_at_<dtype>) for `a` on `stream`; `overlap` as [`KernelArgs::launch`].
///
/// # Safety
/// Every pointer of `a` holds what its field's documentation says, in `func`'s dtype, on `stream`'s device;
/// `*pos < capacity`.
pub(crate) unsafe fn launch_attention(
    func: &CudaFunction,
    stream: &CudaStream,
    a: &AttentionAt,
    overlap: bool,
) -> Result<(), KernelError> {
    let (heads_total, rep, head_dim) = (a.heads_total, a.rep, a.head_dim);
    if rep == 0
        || heads_total == 0
        || !heads_total.is_multiple_of(rep)
        || head_dim == 0
        || head_dim > ATTENTION_MAX_HEAD_DIM
    {
        return Err(KernelError::Attention(format!(
            "{heads_total} query heads in groups of {rep} with head_dim {head_dim}: the kernel takes whole \
             groups and head_dim 1 to {ATTENTION_MAX_HEAD_DIM}"
        )));
    }
    let groups = heads_total / rep;
    let warps = rep.min(ATTENTION_MAX_WARPS) as u32;
    let partial_ml = a.scratch + attention_counter_bytes(heads_total) as u64;
    let partial_acc = partial_ml + (heads_total * ATTENTION_SPANS * 8) as u64;
    let mut args = KernelArgs::new();
    args.arg(a.q)
        .arg(a.k_cache)
        .arg(a.v_cache)
        .arg(a.out)
        .arg(rep as u32)
        .arg(a.capacity as u32)
        .arg(a.pos)
        .arg(head_dim as u32)
        .arg(a.scale)
        .arg(a.scratch)
        .arg(partial_ml)
        .arg(partial_acc);
    let cfg = LaunchConfig {
        grid_dim: (groups as u32, ATTENTION_SPANS as u32, 1),
        block_dim: (32 * warps, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the argument list matches decode_attention_at_* in kernels/attention.cu; the caller vouches for
    // the pointers.
    unsafe { args.launch(func, stream, cfg, overlap) }
}

/// The decode-step kernels for one dtype on one device, loaded once (a graph capture must not load modules).
pub struct DecodeKernels {
    dtype: DType,
    stream: Arc<CudaStream>,
    residual_rms_norm: CudaFunction,
    rotary_kv_write: CudaFunction,
    attention: CudaFunction,
    silu_mul: CudaFunction,
    embed_rows: CudaFunction,
    argmax_rows: CudaFunction,
    gemv_dense: CudaFunction,
    gemv_dense_normed: CudaFunction,
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
            residual_rms_norm: load("residual_rms_norm", &NORM)?,
            rotary_kv_write: load("rotary_kv_write", &ROTARY)?,
            attention: load("decode_attention_at", &ATTENTION)?,
            silu_mul: load("silu_mul", &ACTIVATION)?,
            embed_rows: load("embed_rows", &EMBEDDING)?,
            argmax_rows: load("argmax_rows", &ARGMAX)?,
            gemv_dense: load("gemv_dense", &GEMV_DENSE)?,
            gemv_dense_normed: load("gemv_dense_normed", &GEMV_DENSE)?,
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

    /// The rows of x `input` describes, one block a row: the sum into `input.residual_out` (which may here be
    /// `input.residual`), x into `input.normed_out` (required).
    ///
    /// # Safety
    /// The pointers of `input` hold `rows * dim` elements (the weights `dim`) of the kernels' dtype on this device.
    pub unsafe fn residual_rms_norm(
        &self,
        input: &NormedInput,
        rows: usize,
        dim: usize,
    ) -> Result<(), KernelError> {
        check_norm_dim(dim)?;
        if input.normed_out.is_none() {
            return Err(KernelError::BadInput {
                name: "RMSNorm".into(),
                problem: "the norm kernel needs somewhere to write x (normed_out)".into(),
            });
        }
        let mut args = KernelArgs::new();
        input.push_args(&mut args);
        args.arg(dim as u32);
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
    /// (kernels/attention.cu), through `a.scratch`.
    ///
    /// # Safety
    /// As [`launch_attention`].
    pub unsafe fn attention_at(&self, a: &AttentionAt) -> Result<(), KernelError> {
        unsafe { launch_attention(&self.attention, &self.stream, a, true) }
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

    /// `y_i [rows, n_i] = x [rows, k] · w_iᵀ` for 1 to [`GEMV_GROUP`] dense weights `w_i [n_i, k]` in one launch
    /// (GLM's q, k and v), rows ≤ [`DENSE_MAX_ROWS`]. x is a buffer of rows, or the rows a [`NormedInput`] describes,
    /// which every block then computes into its shared memory (no norm kernel before the GEMV). Returns false,
    /// launching nothing, where a normalized x cannot be: rows of `k` elements not 16-byte aligned, or x larger than
    /// a block's shared memory; the caller then normalizes with [`Self::residual_rms_norm`] and multiplies the
    /// buffer. x from a buffer always launches.
    ///
    /// # Safety
    /// The pointers hold those many elements of the kernels' dtype; the pointers of a [`NormedInput`] as
    /// [`Self::residual_rms_norm`], with `residual_out` not `residual`.
    pub unsafe fn gemv_dense(
        &self,
        weights: &[DenseGemv],
        input: GemvInput,
        rows: usize,
        k: usize,
    ) -> Result<bool, KernelError> {
        check_dense_rows(rows)?;
        if weights.is_empty() || weights.len() > GEMV_GROUP {
            return Err(KernelError::BadInput {
                name: "dense GEMV".into(),
                problem: format!(
                    "{} weights: one launch takes 1 to {GEMV_GROUP}",
                    weights.len()
                ),
            });
        }
        let elem = self.dtype.size_in_bytes();
        // 16-byte loads need 16-byte aligned rows of w and x.
        let aligned = (k * elem).is_multiple_of(16)
            && weights.iter().all(|w| w.weight.is_multiple_of(16))
            && input.aligned();
        let n: usize = weights.iter().map(|w| w.n).sum();
        let threads = 32 * DENSE_WARPS;
        let mut args = KernelArgs::new();
        for slot in 0..GEMV_GROUP {
            let w = weights.get(slot).copied().unwrap_or(DenseGemv {
                weight: 0,
                y: 0,
                n: 0,
            });
            args.arg(w.weight).arg(w.y).arg(w.n as u32);
        }
        let (func, grid, shared) = match input {
            GemvInput::Rows(x) => {
                args.arg(x)
                    .arg(k as u32)
                    .arg(rows as u32)
                    .arg(u32::from(aligned));
                (&self.gemv_dense, n.div_ceil(DENSE_WARPS as usize), 0)
            }
            GemvInput::Normed(normed) => {
                let shared = rows * k * elem;
                let func = &self.gemv_dense_normed;
                if !aligned || !allow_dynamic_shared(func, &self.stream, shared)? {
                    return Ok(false);
                }
                normed.push_args(&mut args);
                args.arg(k as u32).arg(rows as u32);
                // Every block normalizes x, so the grid is what fits on the device at once, its warps looping over
                // rows.
                let resident = resident_blocks(func, &self.stream, threads, shared)?;
                (func, n.div_ceil(DENSE_WARPS as usize).min(resident), shared)
            }
        };
        let cfg = LaunchConfig {
            grid_dim: (grid as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        // SAFETY: the argument list matches gemv_dense[_normed]_<suffix> in kernels/gemv_dense.cu (three weight
        // slots, then x or the normed input); the caller vouches for the pointers.
        unsafe { self.launch(func, &mut args, cfg, true) }?;
        Ok(true)
    }
}

fn check_dense_rows(rows: usize) -> Result<(), KernelError> {
    if rows == 0 || rows > DENSE_MAX_ROWS {
        return Err(KernelError::BadInput {
            name: "dense GEMV".into(),
            problem: format!("{rows} rows of x: the kernel takes 1 to {DENSE_MAX_ROWS}"),
        });
    }
    Ok(())
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
