//! The fused CUDA kernels of `kernels/fused.cu` (compiled to PTX by build.rs) as candle custom ops,
//! with the conditions under which each applies. A kernel the start-up check found wrong is
//! switched off for the process ([`disable`]); callers then get `None` and use the reference.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys::CUfunction_attribute, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};

use super::FusedKernel;

/// PTX of `kernels/fused.cu`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
/// Name under which candle caches the loaded module.
const MODULE: &str = "stepstream_fused";

/// Widest head the attention kernel takes (its shared memory grows with the head width).
const MAX_HEAD_DIM: usize = 128;
/// Query rows per attention block and threads per block (`ATT_BR`, 4 warps in fused.cu).
const ATT_ROWS: usize = 64;
const ATT_THREADS: u32 = 128;
/// Threads per GroupNorm block (`GN_THREADS` in fused.cu).
const GN_THREADS: u32 = 256;

static ATTENTION_ON: AtomicBool = AtomicBool::new(true);
static GROUP_NORM_ON: AtomicBool = AtomicBool::new(true);

fn flag(kernel: FusedKernel) -> &'static AtomicBool {
    match kernel {
        FusedKernel::Attention => &ATTENTION_ON,
        FusedKernel::GroupNorm => &GROUP_NORM_ON,
    }
}

/// Switches `kernel` off (or back on) for the rest of the process.
pub(super) fn set_enabled(kernel: FusedKernel, on: bool) {
    flag(kernel).store(on, Ordering::Relaxed);
}

/// Whether `kernel` is in use.
pub(super) fn enabled(kernel: FusedKernel) -> bool {
    flag(kernel).load(Ordering::Relaxed)
}

/// Shared-memory bytes of the attention kernel for padded head width `dp` (`att_smem_bytes`).
fn attention_smem_bytes(dp: usize) -> usize {
    let ld = dp + 8;
    let qkv = 3 * ATT_ROWS * ld * 2;
    let scores = 4 * 16 * (64 + 4) * 4;
    let probs = 4 * 16 * (64 + 8) * 2;
    let acc = 4 * 16 * (dp + 4) * 4;
    qkv + scores + probs + acc
}

/// The fused attention for token-major `q: (b, n, heads·d)`, `k, v: (b, m, heads·d)` when it
/// applies (CUDA, f16 or bf16, `d` a multiple of 8 up to 128); `None` otherwise.
pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    if !enabled(FusedKernel::Attention) || !matches!(q.device(), Device::Cuda(_)) {
        return Ok(None);
    }
    if !matches!(q.dtype(), DType::F16 | DType::BF16)
        || k.dtype() != q.dtype()
        || v.dtype() != q.dtype()
    {
        return Ok(None);
    }
    let (b, n, width) = q.dims3()?;
    let (kb, m, kwidth) = k.dims3()?;
    if heads == 0 || width % heads != 0 || (kb, kwidth) != (b, width) || v.dims() != k.dims() {
        return Ok(None);
    }
    let d = width / heads;
    if d % 8 != 0 || d > MAX_HEAD_DIM || n == 0 || m == 0 || b * heads > 65_535 {
        return Ok(None);
    }
    if b * n.max(m) * width > i32::MAX as usize {
        return Ok(None);
    }
    // 16-byte loads need every row to start 16-byte aligned: copy views with odd offsets.
    let aligned = |t: &Tensor| -> Result<Tensor> {
        let t = t.contiguous()?;
        if t.layout().start_offset() % 8 == 0 {
            Ok(t)
        } else {
            t.copy()
        }
    };
    let op = FlashAttention {
        heads,
        scale: scale as f32,
    };
    Ok(Some(aligned(q)?.apply_op3_no_bwd(
        &aligned(k)?,
        &aligned(v)?,
        &op,
    )?))
}

/// Attention without a materialised score matrix.
struct FlashAttention {
    heads: usize,
    scale: f32,
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "stepstream-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused attention runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let storage = match q.dtype() {
            DType::F16 => self.launch::<half::f16>("ss_attention_f16", q, ql, k, kl, v, vl)?,
            DType::BF16 => self.launch::<half::bf16>("ss_attention_bf16", q, ql, k, kl, v, vl)?,
            other => candle_core::bail!("fused attention: unsupported dtype {other:?}"),
        };
        Ok((storage, ql.shape().clone()))
    }
}

impl FlashAttention {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        name: &str,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<CudaStorage> {
        let dev = q.device().clone();
        let (b, n, width) = ql.shape().dims3()?;
        let m = kl.shape().dims3()?.1;
        let (h, d) = (self.heads, width / self.heads);
        let qs = T::as_cuda_slice(q)?.slice(ql.start_offset()..);
        let ks = T::as_cuda_slice(k)?.slice(kl.start_offset()..);
        let vs = T::as_cuda_slice(v)?.slice(vl.start_offset()..);
        let out = unsafe { dev.alloc::<T>(b * n * width)? };
        let dp = d.next_multiple_of(16);
        let smem = attention_smem_bytes(dp);
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        // The opt-in limit for the widest head, so launches for any width fit under it.
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            attention_smem_bytes(MAX_HEAD_DIM) as i32,
        )
        .w()?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(ATT_ROWS) as u32, (b * h) as u32, 1),
            block_dim: (ATT_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (n, m, h, d, dp) = (n as i32, m as i32, h as i32, d as i32, dp as i32);
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let mut builder = func.builder();
        builder.arg(&qs).arg(&ks).arg(&vs).arg(&out);
        builder
            .arg(&n)
            .arg(&m)
            .arg(&h)
            .arg(&d)
            .arg(&dp)
            .arg(&scale_log2);
        // SAFETY: the argument list matches `ss_attention_*` in fused.cu; the slices hold
        // b*n*width and b*m*width elements from their offsets (contiguous layouts).
        unsafe { builder.launch(cfg) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev))
    }
}

/// The fused GroupNorm(+SiLU) for `x: (b, c, ...)` when it applies (CUDA, f32/f16/bf16, weights in
/// `x`'s dtype, fewer than 2^31 − 2^20 elements per group); `None` otherwise.
pub(super) fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    if !enabled(FusedKernel::GroupNorm) || !matches!(x.device(), Device::Cuda(_)) {
        return Ok(None);
    }
    if !matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        || weight.dtype() != x.dtype()
        || bias.dtype() != x.dtype()
        || x.rank() < 3
    {
        return Ok(None);
    }
    let (b, c) = (x.dim(0)?, x.dim(1)?);
    if weight.dims() != [c] || bias.dims() != [c] || groups == 0 || c % groups != 0 {
        return Ok(None);
    }
    let len = x.elem_count() / (b * groups).max(1);
    // The kernels index a group with i32 and step past its end by up to a grid stride (2^18).
    if len == 0 || len > (i32::MAX as usize) - (1 << 20) || b * groups > 65_535 {
        return Ok(None);
    }
    let op = FusedGroupNorm {
        groups,
        eps: eps as f32,
        silu,
    };
    Ok(Some(x.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &op,
    )?))
}

/// GroupNorm with an optional SiLU, in two launches.
struct FusedGroupNorm {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl CustomOp3 for FusedGroupNorm {
    fn name(&self) -> &'static str {
        "stepstream-group-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused GroupNorm runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let storage = match x.dtype() {
            DType::F32 => self.launch::<f32>("f32", x, xl, w, wl, b, bl)?,
            DType::F16 => self.launch::<half::f16>("f16", x, xl, w, wl, b, bl)?,
            DType::BF16 => self.launch::<half::bf16>("bf16", x, xl, w, wl, b, bl)?,
            other => candle_core::bail!("fused GroupNorm: unsupported dtype {other:?}"),
        };
        Ok((storage, xl.shape().clone()))
    }
}

impl FusedGroupNorm {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        suffix: &str,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let dims = xl.shape().dims();
        let (batch, channels) = (dims[0], dims[1]);
        let total = xl.shape().elem_count();
        let groups_total = batch * self.groups;
        let len = total / groups_total;
        let spatial = total / (batch * channels);
        let cpg = channels / self.groups;
        // Enough blocks to fill the card whatever the group count: ~8K elements per stats block,
        // ~16K per apply block.
        let chunks = len.div_ceil(8192).clamp(1, 256);
        let apply_blocks = len.div_ceil(16_384).clamp(1, 1024);

        let xs = T::as_cuda_slice(x)?.slice(xl.start_offset()..);
        let ws = T::as_cuda_slice(w)?.slice(wl.start_offset()..);
        let bs = T::as_cuda_slice(b)?.slice(bl.start_offset()..);
        let partials = unsafe { dev.alloc::<f32>(groups_total * chunks * 3)? };
        let out = unsafe { dev.alloc::<T>(total)? };
        let (len_i, chunks_i) = (len as i32, chunks as i32);

        let stats = dev.get_or_load_custom_func(&format!("ss_gn_stats_{suffix}"), MODULE, PTX)?;
        let mut builder = stats.builder();
        builder.arg(&xs).arg(&partials).arg(&len_i).arg(&chunks_i);
        let cfg = LaunchConfig {
            grid_dim: (chunks as u32, groups_total as u32, 1),
            block_dim: (GN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `ss_gn_stats_*`; `partials` holds groups_total*chunks*3 floats.
        unsafe { builder.launch(cfg) }.w()?;

        let apply = dev.get_or_load_custom_func(&format!("ss_gn_apply_{suffix}"), MODULE, PTX)?;
        let (groups_i, cpg_i, spatial_i) = (self.groups as i32, cpg as i32, spatial as i32);
        let silu = self.silu as i32;
        let mut builder = apply.builder();
        builder.arg(&xs).arg(&partials).arg(&ws).arg(&bs).arg(&out);
        builder
            .arg(&len_i)
            .arg(&chunks_i)
            .arg(&groups_i)
            .arg(&cpg_i);
        builder.arg(&spatial_i).arg(&self.eps).arg(&silu);
        let cfg = LaunchConfig {
            grid_dim: (apply_blocks as u32, groups_total as u32, 1),
            block_dim: (GN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `ss_gn_apply_*`; every slice covers the elements the kernel indexes.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(T::wrap_cuda_slice(out, dev))
    }
}
