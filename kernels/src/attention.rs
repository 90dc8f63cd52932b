//! Decode attention over a preallocated KV cache in one kernel (kernels/attention.cu), for the op-by-op decoder:
//! the same split kernel as the fused decode step.

use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, DType, Device, Tensor};
use half::{bf16, f16};

use crate::decode::{
    attention_scratch_bytes, device_pointer, launch_attention, AttentionAt, DevicePointer,
};
use crate::tensor::{cuda_view, dtype_suffix, wrap};
use crate::KernelError;

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
    let out = match dtype {
        DType::F32 => run::<f32>(dev, q, k_cache, v_cache, heads, rep, len, scale)?,
        DType::F16 => run::<f16>(dev, q, k_cache, v_cache, heads, rep, len, scale)?,
        _ => run::<bf16>(dev, q, k_cache, v_cache, heads, rep, len, scale)?,
    };
    Ok(out.reshape((b, kv_heads, rep, head_dim))?)
}

/// The decode step's split kernel on candle tensors: the length goes to the device as the position it reads,
/// with a zeroed scratch of its own (this path allocates per call anyway).
#[allow(clippy::too_many_arguments)]
fn run<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    rep: usize,
    len: usize,
    scale: f32,
) -> Result<Tensor, KernelError> {
    let (_, _, capacity, head_dim) = k.dims4()?;
    let suffix = dtype_suffix(q.dtype()).expect("checked by decode_attention");
    let func = crate::ATTENTION.function(dev, &format!("decode_attention_at_{suffix}"))?;
    let device = q.device();
    let pos = Tensor::new(&[len as u32 - 1], device)?;
    let scratch = Tensor::zeros(attention_scratch_bytes(heads, head_dim), DType::U8, device)?;
    let numel = heads * head_dim;
    // SAFETY: the kernel writes every element: the merge of each query head's spans.
    let out = unsafe { dev.alloc::<T>(numel)? };
    let pointer = |t: &Tensor| -> Result<DevicePointer, KernelError> {
        let (storage, layout) = t.storage_and_layout();
        match t.dtype() {
            DType::U8 => Ok(device_pointer(&cuda_view::<u8>(&storage, layout)?, dev)),
            DType::U32 => Ok(device_pointer(&cuda_view::<u32>(&storage, layout)?, dev)),
            _ => Ok(device_pointer(&cuda_view::<T>(&storage, layout)?, dev)),
        }
    };
    let operands = AttentionAt {
        q: pointer(q)?,
        out: device_pointer(&out, dev),
        k_cache: pointer(k)?,
        v_cache: pointer(v)?,
        heads_total: heads,
        rep,
        capacity,
        head_dim,
        pos: pointer(&pos)?,
        scale,
        scratch: pointer(&scratch)?,
    };
    // SAFETY: q, the caches and the output are contiguous with the shapes checked by decode_attention, len is
    // within the cache, the scratch is zeroed and sized for `heads`; every tensor outlives the queued launch
    // (their memory is freed in stream order after it). A plain launch: the kernel before is candle's.
    unsafe { launch_attention(&func, &dev.cuda_stream(), &operands, false) }?;
    Ok(wrap(out, dev, numel.into()))
}
