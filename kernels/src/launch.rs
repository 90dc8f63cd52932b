//! Launches of the decode-step kernels (and the fused GEMV) with programmatic dependent launch.
//!
//! A kernel launched with the programmatic-serialization attribute may start while the kernel before it in the
//! stream still runs; each of these kernels first issues what does not depend on that kernel (the GEMVs ask L2
//! for their first weights), then waits for it (`grid_dependency_wait` in kernels/common.cuh). In a CUDA graph the
//! attribute becomes a programmatic edge, so a decode step's ~400 kernels no longer pay a full launch gap each
//! and the weight reads of a GEMV start during the small kernel before it (benches/results/decode-overhead.md).
//! `GLM_RUN_PDL=0` launches them plainly (for comparison; the results are the same).
//!
//! The arguments are raw device pointers and scalars (no cudarc event tracking: the decode step runs on one
//! stream), copied into the launch so nothing has to outlive the call.

use std::ffi::c_void;
use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::sys::{
    self, CUdevice_attribute, CUfunction_attribute, CUlaunchAttribute, CUlaunchAttributeID,
    CUlaunchAttributeValue, CUlaunchConfig,
};
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream, LaunchConfig};
use candle_core::cuda_backend::WrapErr;

use crate::KernelError;

/// The most arguments any of our kernels takes.
const MAX_ARGS: usize = 40;

/// A kernel parameter: a device pointer or a scalar, passed by value as the kernel declares it.
pub(crate) trait KernelParam: Copy {
    /// The parameter's bytes, in the low bytes of a u64 (each kernel parameter is at most 8 bytes).
    fn to_slot(self) -> u64;
}

impl KernelParam for u64 {
    fn to_slot(self) -> u64 {
        self
    }
}

impl KernelParam for usize {
    fn to_slot(self) -> u64 {
        self as u64
    }
}

impl KernelParam for u32 {
    fn to_slot(self) -> u64 {
        u64::from(self)
    }
}

impl KernelParam for f32 {
    fn to_slot(self) -> u64 {
        u64::from(self.to_bits())
    }
}

/// The argument list of one launch, in the kernel's parameter order.
pub(crate) struct KernelArgs {
    slots: [u64; MAX_ARGS],
    len: usize,
}

impl KernelArgs {
    pub(crate) fn new() -> Self {
        Self {
            slots: [0; MAX_ARGS],
            len: 0,
        }
    }

    pub(crate) fn arg(&mut self, value: impl KernelParam) -> &mut Self {
        assert!(
            self.len < MAX_ARGS,
            "a kernel takes at most {MAX_ARGS} arguments"
        );
        // Little-endian: a 4-byte parameter reads the low half of its slot.
        self.slots[self.len] = value.to_slot();
        self.len += 1;
        self
    }

    /// Queues `func` on `stream`: with `overlap`, as a programmatic dependent launch (unless `GLM_RUN_PDL=0`),
    /// which only kernels that follow one of ours ask for; else plainly.
    ///
    /// # Safety
    /// The arguments match `func`'s parameter list in order and width, every pointer is valid for what the
    /// kernel does with it until the kernel has run, and `func` calls `grid_dependency_wait` before touching
    /// memory an earlier kernel writes or a later one reads.
    pub(crate) unsafe fn launch(
        &mut self,
        func: &CudaFunction,
        stream: &CudaStream,
        cfg: LaunchConfig,
        overlap: bool,
    ) -> Result<(), KernelError> {
        stream.context().bind_to_thread().w()?;
        let mut params: Vec<*mut c_void> = self.slots[..self.len]
            .iter_mut()
            .map(|slot| slot as *mut u64 as *mut c_void)
            .collect();
        // SAFETY: an all-zero attribute value is a valid (unset) union; the field set below is the one the id
        // names.
        let mut value: CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attribute = CUlaunchAttribute {
            id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let config = CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: stream.cu_stream(),
            attrs: &mut attribute,
            numAttrs: u32::from(overlap && programmatic_launch()),
        };
        // SAFETY: the config and attribute outlive the call; `params` points at `self.len` argument slots that
        // the caller vouches for; the driver copies them before returning.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                func.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .w()?;
        Ok(())
    }
}

/// Whether launches carry the programmatic-serialization attribute: yes unless `GLM_RUN_PDL=0`.
fn programmatic_launch() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("GLM_RUN_PDL").map_or(true, |v| v.trim() != "0"))
}

/// Whether `func` can launch with `bytes` of dynamic shared memory on `stream`'s device; if so, allows it (beyond
/// 48 KB a kernel must opt in: it is allowed all the device has per block, past its static shared memory).
pub(crate) fn allow_dynamic_shared(
    func: &CudaFunction,
    stream: &CudaStream,
    bytes: usize,
) -> Result<bool, KernelError> {
    stream.context().bind_to_thread().w()?;
    let per_block = stream
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .w()?;
    let available = per_block - func.shared_size_bytes().w()?;
    if bytes > available.max(0) as usize {
        return Ok(false);
    }
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        available,
    )
    .w()?;
    Ok(true)
}

/// How many blocks of `threads` with `shared` bytes of dynamic shared memory fit on `stream`'s device at once.
pub(crate) fn resident_blocks(
    func: &CudaFunction,
    stream: &CudaStream,
    threads: u32,
    shared: usize,
) -> Result<usize, KernelError> {
    let per_sm = func
        .occupancy_max_active_blocks_per_multiprocessor(threads, shared, None)
        .w()?
        .max(1) as usize;
    let sms = stream
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?
        .max(1) as usize;
    Ok(sms * per_sm)
}
