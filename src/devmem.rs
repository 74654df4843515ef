//! Device memory: peak figures for the bench, and the CUDA settings the server runs with.
//!
//! On CUDA, candle allocates from the device's default stream-ordered memory pool
//! (`cuMemAllocAsync`); the pool's used-memory high-water mark is the peak of live tensor memory,
//! the figure comparable with torch's `max_memory_allocated`. On the CPU the figure is the
//! process's peak resident set (`VmHWM`), which cannot be reset.

use candle_core::Device;

/// Where a peak-memory figure comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeakSource {
    /// The CUDA default memory pool's used-memory high-water mark (resettable).
    CudaPool,
    /// The process's peak resident set size (since the process started).
    ProcessRss,
}

/// Peak memory in bytes on `device` since the last [`reset_peak`] (CUDA) or since the process
/// started (CPU), with where it comes from; `None` where it cannot be read.
pub fn peak_bytes(device: &Device) -> Option<(u64, PeakSource)> {
    match device {
        Device::Cpu => process_peak_rss().map(|b| (b, PeakSource::ProcessRss)),
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => cuda::pool_attribute(dev, cuda::USED_HIGH, None)
            .ok()
            .map(|b| (b, PeakSource::CudaPool)),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Starts a new peak-memory window on `device` (a no-op on the CPU).
pub fn reset_peak(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        // Synchronise first so frees queued on the stream are counted before the reset.
        let _ = device.synchronize();
        let _ = cuda::pool_attribute(dev, cuda::USED_HIGH, Some(0));
    }
    let _ = device;
}

/// Prepares a freshly opened device for serving: on CUDA, no per-tensor event tracking and a
/// memory pool that keeps freed memory. Call before creating any tensor on it.
pub fn prepare(device: &Device) {
    disable_event_tracking(device);
    retain_pool_memory(device);
}

/// Turns off candle's per-tensor CUDA event tracking: every tensor of the server lives on the
/// device's one stream, so the events (two per allocation, a wait and a record per kernel argument)
/// order nothing and only cost launch time.
fn disable_event_tracking(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        // SAFETY: the engine's worker thread is the only user of the device and uses its single
        // stream for every allocation, kernel and copy, so stream order already orders them.
        unsafe { dev.disable_event_tracking() };
    }
    let _ = device;
}

/// Makes the CUDA memory pool keep freed memory for reuse instead of returning it to the driver
/// at every synchronisation (the pool's default release threshold is 0). Without this, each
/// generation re-maps its working set, gigabytes for a VAE decode; torch's caching allocator keeps
/// its memory the same way. A no-op on the CPU.
fn retain_pool_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        if let Err(e) = cuda::pool_attribute(dev, cuda::RELEASE_THRESHOLD, Some(u64::MAX)) {
            tracing::warn!(error = ?e, "cannot set the CUDA memory pool's release threshold");
        }
    }
    let _ = device;
}

/// The process's peak resident set size in bytes (Linux `VmHWM`).
fn process_peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::CudaDevice;

    pub(super) const USED_HIGH: sys::CUmemPool_attribute =
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    pub(super) const RELEASE_THRESHOLD: sys::CUmemPool_attribute =
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;

    /// Reads (or, with `set`, writes) a `u64` attribute of the device's default memory pool.
    pub(super) fn pool_attribute(
        dev: &CudaDevice,
        attr: sys::CUmemPool_attribute,
        set: Option<u64>,
    ) -> Result<u64, sys::CUresult> {
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().map_err(|e| e.0)?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: plain driver queries on a live context; `pool` and `value` outlive the calls.
        unsafe {
            let r = sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device());
            if r != sys::CUresult::CUDA_SUCCESS {
                return Err(r);
            }
            let mut value = set.unwrap_or(0);
            let ptr = &mut value as *mut u64 as *mut std::ffi::c_void;
            let r = match set {
                Some(_) => sys::cuMemPoolSetAttribute(pool, attr, ptr),
                None => sys::cuMemPoolGetAttribute(pool, attr, ptr),
            };
            if r != sys::CUresult::CUDA_SUCCESS {
                return Err(r);
            }
            Ok(value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_reports_the_process_peak_resident_set() {
        let (bytes, source) = peak_bytes(&Device::Cpu).expect("VmHWM readable on Linux");
        assert_eq!(source, PeakSource::ProcessRss);
        assert!(
            bytes > 1 << 20,
            "a running test process uses over 1 MiB: {bytes}"
        );
    }
}
