//! The low-rank path beside a base weight: `y = W x + Σ_a s_a · (alpha_a / r_a) · B_a (A_a x)`,
//! with `s_a` the scale of adapter `a` for each batch row, set per call. Nothing is merged into
//! `W`, so a scale change costs nothing and rows with different LoRAs share one call.

use std::cell::RefCell;
use std::sync::{Arc, RwLock};

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// One adapter's low-rank pair on one layer.
#[derive(Debug)]
pub(crate) struct Delta {
    /// Index of the adapter in the model's LoRA list.
    pub adapter: usize,
    /// `A`, `[r, in]`.
    pub down: Tensor,
    /// `B`, `[out, r]`.
    pub up: Tensor,
    /// `alpha / r`.
    pub factor: f64,
}

/// The scale each adapter has for the rows of the call now running.
#[derive(Clone, Debug)]
pub enum Scale {
    /// One scale for every row (a text-encoder call: one session's prompts).
    Uniform(f64),
    /// A scale per batch row, `[rows, 1, 1]`, in the compute dtype (a batched UNet call).
    Rows(Tensor),
}

/// The per-call adapter scales of one model, read by every adapted layer during a forward.
///
/// Why a shared cell rather than an argument: the scales change per call, while the layers sit
/// deep in networks whose forward signatures are diffusers'. A model's networks run on its
/// device's one thread, one call at a time, so setting the cell before a call and clearing it
/// after (see [`LoraScales::during`]) is race-free.
#[derive(Debug, Default)]
pub struct LoraScales {
    current: RwLock<Vec<Option<Scale>>>,
}

impl LoraScales {
    /// Runs `f` with `scales` (indexed by adapter; `None`: not used by any row) in effect.
    pub fn during<T>(&self, scales: Vec<Option<Scale>>, f: impl FnOnce() -> T) -> T {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = scales;
        // Cleared however `f` ends, so a failed call leaves no scales for the next one.
        struct Clear<'a>(&'a LoraScales);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                self.0
                    .current
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
            }
        }
        let _clear = Clear(self);
        f()
    }

    fn get(&self, adapter: usize) -> Option<Scale> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(adapter)
            .cloned()
            .flatten()
    }
}

/// One adaptable layer's place: its diffusers module name, widths and the adapters attached.
#[derive(Debug)]
pub struct LoraSlot {
    /// The module's diffusers name inside its component, e.g. `down_blocks.0.attentions.0.proj_in`.
    pub module: String,
    /// Input width.
    pub in_dim: usize,
    /// Output width.
    pub out_dim: usize,
    deltas: RwLock<Vec<Delta>>,
    scales: RwLock<Option<Arc<LoraScales>>>,
}

impl LoraSlot {
    fn new(module: String, in_dim: usize, out_dim: usize) -> Arc<Self> {
        let slot = Arc::new(Self {
            module,
            in_dim,
            out_dim,
            deltas: RwLock::new(Vec::new()),
            scales: RwLock::new(None),
        });
        COLLECTOR.with(|c| {
            if let Some(list) = c.borrow_mut().as_mut() {
                list.push(slot.clone());
            }
        });
        slot
    }

    /// Attaches an adapter's pair (shapes checked by the caller), reading scales from `scales`.
    pub(crate) fn attach(&self, delta: Delta, scales: &Arc<LoraScales>) {
        self.scales
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| scales.clone());
        self.deltas
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(delta);
    }

    /// Whether any adapter is attached.
    pub fn is_adapted(&self) -> bool {
        !self
            .deltas
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// `y` plus every attached adapter's contribution for input `x` (`[rows, tokens, in]` or
    /// `[rows, in]`; `y` has the same leading shape).
    pub(crate) fn add(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let deltas = self.deltas.read().unwrap_or_else(|e| e.into_inner());
        if deltas.is_empty() {
            return Ok(y);
        }
        let Some(scales) = self
            .scales
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return Ok(y);
        };
        let mut y = y;
        for d in deltas.iter() {
            let Some(scale) = scales.get(d.adapter) else {
                continue;
            };
            let low = rowwise_matmul(x, &d.down)?;
            let delta = rowwise_matmul(&low, &d.up)?;
            let delta = match scale {
                // PEFT's own formula: `B(A x) * (alpha / r * scale)`.
                Scale::Uniform(s) => delta.affine(d.factor * s, 0.0)?,
                // The same for every row whatever the batch holds, so a row's numbers do not
                // depend on its neighbours (a zero scale adds an exact zero).
                Scale::Rows(s) => {
                    let s = match delta.rank() {
                        2 => s.flatten_from(1)?,
                        _ => s.clone(),
                    };
                    delta.affine(d.factor, 0.0)?.broadcast_mul(&s)?
                }
            };
            y = (y + delta)?;
        }
        Ok(y)
    }
}

/// `x · wᵀ` over the last dimension, computed the same way whatever the row count (see
/// `unet::layers::rowwise_linear`: gemm sums small products in another order, and a LoRA's rank
/// makes its products small).
fn rowwise_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    const SMALL_OUTPUTS: usize = 16 * 16;
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / k.max(1);
    let outputs = w.dim(0)?;
    let x2 = x.reshape((rows, k))?;
    let min_rows = (SMALL_OUTPUTS / outputs.max(1) + 1).max(2);
    let out = if rows >= min_rows {
        x2.matmul(&w.t()?)?
    } else {
        let pad = Tensor::zeros((min_rows - rows, k), x.dtype(), x.device())?;
        Tensor::cat(&[&x2, &pad], 0)?
            .matmul(&w.t()?)?
            .narrow(0, 0, rows)?
    };
    let mut shape = dims;
    if let Some(last) = shape.last_mut() {
        *last = outputs;
    }
    out.reshape(shape)
}

/// A Linear with a LoRA slot (a clone shares the slot).
#[derive(Clone, Debug)]
pub(crate) struct LoraLinear {
    base: crate::kernels::Linear,
    slot: Arc<LoraSlot>,
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.slot.add(x, self.base.forward(x)?)
    }
}

/// `candle_nn::linear` with a LoRA slot named by `vb`'s path.
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<LoraLinear> {
    let slot = LoraSlot::new(vb.prefix(), in_dim, out_dim);
    Ok(LoraLinear {
        base: crate::kernels::Linear::load(vb, in_dim, out_dim, true)?,
        slot,
    })
}

/// `candle_nn::linear_no_bias` with a LoRA slot named by `vb`'s path.
pub(crate) fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<LoraLinear> {
    let slot = LoraSlot::new(vb.prefix(), in_dim, out_dim);
    Ok(LoraLinear {
        base: crate::kernels::Linear::load(vb, in_dim, out_dim, false)?,
        slot,
    })
}

/// A LoRA slot for a layer that is not a Linear (a 1×1 convolution used as one): the caller adds
/// [`LoraSlot::add`] on token-major activations.
pub(crate) fn slot(vb: &VarBuilder, in_dim: usize, out_dim: usize) -> Arc<LoraSlot> {
    LoraSlot::new(vb.prefix(), in_dim, out_dim)
}

thread_local! {
    /// The slots made while [`collect_slots`] runs on this thread.
    static COLLECTOR: RefCell<Option<Vec<Arc<LoraSlot>>>> = const { RefCell::new(None) };
}

/// Runs a network's constructor and returns the LoRA slots it made, by module name.
///
/// Why a thread-local: constructors take diffusers' shapes and a `VarBuilder`, like every other
/// layer; collecting here keeps LoRA out of all their signatures. Construction is synchronous
/// and on one thread, so the slots made are exactly this constructor's.
pub(crate) fn collect_slots<T>(build: impl FnOnce() -> T) -> (T, Vec<Arc<LoraSlot>>) {
    let outer = COLLECTOR.with(|c| c.borrow_mut().replace(Vec::new()));
    let built = build();
    let slots = COLLECTOR.with(|c| std::mem::replace(&mut *c.borrow_mut(), outer));
    (built, slots.unwrap_or_default())
}
