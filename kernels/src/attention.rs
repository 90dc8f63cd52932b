//! Decode attention over a preallocated KV cache in one kernel (kernels/attention.cu).

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use crate::tensor::{cuda_view, dtype_suffix, wrap};
use crate::KernelError;

/// kernels/attention.cu: ATTN_WARPS warps per block, head_dim ≤ 32 × ATTN_MAX_DIMS_PER_LANE.
const WARPS: u32 = 8;
const MAX_HEAD_DIM: usize = 256;

/// softmax(q·Kᵀ·scale)·V for one query token per sequence.
///
/// `q` is `[batch, kv_heads, rep, head_dim]` (the `rep` query heads sharing a kv head, consecutive);
/// `k_cache` and `v_cache` are the whole preallocated buffers `[batch, kv_heads, capacity, head_dim]`, of
/// which the first `len` tokens are attended to. All three contiguous, of one float dtype, on one CUDA
/// device. Returns `[batch, kv_heads, rep, head_dim]` in that dtype; the arithmetic is f32.
pub fn decode_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    len: usize,
    scale: f32,
) -> Result<Tensor, KernelError> {
    let bad = |problem: String| KernelError::Attention(problem);
    let (b, kv_heads, rep, head_dim) = q.dims4()?;
    let (cb, ckv, capacity, cd) = k_cache.dims4()?;
    if (cb, ckv, cd) != (b, kv_heads, head_dim) || v_cache.dims() != k_cache.dims() {
        return Err(bad(format!(
            "query {:?} does not match the cache {:?} / {:?}",
            q.dims(),
            k_cache.dims(),
            v_cache.dims()
        )));
    }
    if len == 0 || len > capacity {
        return Err(bad(format!(
            "{len} cached tokens for a cache of {capacity}"
        )));
    }
    if head_dim > MAX_HEAD_DIM {
        return Err(bad(format!(
            "head_dim {head_dim} is above the kernel's {MAX_HEAD_DIM}"
        )));
    }
    let dtype = q.dtype();
    if dtype_suffix(dtype).is_none() || k_cache.dtype() != dtype || v_cache.dtype() != dtype {
        return Err(bad(format!(
            "dtypes {dtype:?} / {:?} / {:?}: use one of f32, f16, bf16",
            k_cache.dtype(),
            v_cache.dtype()
        )));
    }
    let all_contiguous = [q, k_cache, v_cache].iter().all(|t| t.is_contiguous());
    let Device::Cuda(dev) = q.device() else {
        return Err(bad("the query is not on a CUDA device".into()));
    };
    if !all_contiguous
        || !k_cache.device().same_device(q.device())
        || !v_cache.device().same_device(q.device())
    {
        return Err(bad(
            "query and cache must be contiguous and on the same CUDA device".into(),
        ));
    }
    let heads = b * kv_heads * rep;
    let launch = Launch {
        dev,
        heads,
        rep: rep as u32,
        capacity: capacity as u32,
        len: len as u32,
        head_dim: head_dim as u32,
        scale,
    };
    let out = match dtype {
        DType::F32 => launch.run::<f32>(q, k_cache, v_cache)?,
        DType::F16 => launch.run::<f16>(q, k_cache, v_cache)?,
        _ => launch.run::<bf16>(q, k_cache, v_cache)?,
    };
    Ok(out.reshape((b, kv_heads, rep, head_dim))?)
}

struct Launch<'a> {
    dev: &'a candle_core::CudaDevice,
    heads: usize,
    rep: u32,
    capacity: u32,
    len: u32,
    head_dim: u32,
    scale: f32,
}

impl Launch<'_> {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let suffix = dtype_suffix(q.dtype()).expect("checked by decode_attention");
        let (q_storage, q_layout) = q.storage_and_layout();
        let (k_storage, k_layout) = k.storage_and_layout();
        let (v_storage, v_layout) = v.storage_and_layout();
        let q_view = cuda_view::<T>(&q_storage, q_layout)?;
        let k_view = cuda_view::<T>(&k_storage, k_layout)?;
        let v_view = cuda_view::<T>(&v_storage, v_layout)?;
        let numel = self.heads * self.head_dim as usize;
        // SAFETY: the kernel writes every element: each block its head's head_dim outputs.
        let mut out = unsafe { self.dev.alloc::<T>(numel)? };
        let func = crate::ATTENTION.function(self.dev, &format!("decode_attention_{suffix}"))?;
        let stream = self.dev.cuda_stream();
        let cfg = LaunchConfig {
            grid_dim: (self.heads as u32, 1, 1),
            block_dim: (32 * WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = stream.launch_builder(&func);
        args.arg(&q_view)
            .arg(&k_view)
            .arg(&v_view)
            .arg(&mut out)
            .arg(&self.rep)
            .arg(&self.capacity)
            .arg(&self.len)
            .arg(&self.head_dim)
            .arg(&self.scale);
        // SAFETY: argument types and order match kernels/attention.cu's decode_attention_*.
        unsafe { args.launch(cfg) }.w()?;
        Ok(wrap(out, self.dev, numel.into()))
    }
}
