//! Properties of everything a client can send: wire tensors, `GenerateRequest`s and step replies.
//!
//! Whatever arrives is either accepted within the server's limits or refused with a clear error
//! that names the field; nothing panics, and nothing allocates in proportion to a size the client
//! merely *claims* (a shape of 2^62 elements costs nothing to refuse).
//!
//! Each property runs a bounded number of cases (see `config`) so the suite stays fast;
//! `PROPTEST_CASES=100000 cargo test --release --test properties` searches deeper. The cargo-fuzz
//! targets in `fuzz/` drive the same functions from raw bytes without a case limit.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use proptest::test_runner::Config;
use prost::Message;
use stepstream::engine::EngineError;
use stepstream::pipeline::{
    validate_control, CallbackTensors, StepControl, StepState, CFG_BATCHED,
};
use stepstream::proto;
use stepstream::server::validation::{validate, Limits};
use stepstream::tensor::{check_header, decode, encode, TensorError, MAX_RANK};

// ---------------------------------------------------------------------------------------------
// Measuring allocations: the largest single allocation a closure makes on this thread.

/// The system allocator, noting the largest request made on each thread.
struct PeakAlloc;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size)
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`; `note` neither allocates nor panics.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: PeakAlloc = PeakAlloc;

/// Runs `f` and returns its result with the size of the largest single allocation it made.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    let r = f();
    (r, LARGEST.with(|l| l.get()))
}

/// The probe behind the allocation properties sees allocations (so their bounds mean something).
#[test]
fn the_allocation_probe_sees_each_allocation() {
    let (v, largest) = largest_allocation(|| vec![1u8; 1 << 20]);
    assert!(largest >= 1 << 20 && v.len() == 1 << 20);
    let ((), largest) = largest_allocation(|| ());
    assert_eq!(largest, 0);
}

// ---------------------------------------------------------------------------------------------
// Shared configuration and strategies.

/// Bounded case counts (`PROPTEST_CASES` overrides); no regression files are written.
fn config(default_cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

fn wire(dtype: i32, shape: Vec<i64>, data: Vec<u8>) -> proto::Tensor {
    proto::Tensor { dtype, shape, data }
}

/// Known dtypes most of the time, sometimes unset or any i32.
fn any_dtype() -> impl Strategy<Value = i32> {
    prop_oneof![6 => 1..=3i32, 1 => Just(0), 1 => any::<i32>()]
}

fn elem_size(dtype: i32) -> usize {
    if dtype == proto::DType::DtypeF32 as i32 {
        4
    } else {
        2
    }
}

/// Dimensions a hostile client might send: small, zero, negative, powers of two, i64 extremes.
fn any_dim() -> impl Strategy<Value = i64> {
    prop_oneof![
        8 => 1..=5i64,
        1 => Just(0i64),
        1 => i64::MIN..0,
        1 => (1u32..63).prop_map(|s| 1i64 << s),
        1 => Just(i64::MAX),
        1 => any::<i64>(),
    ]
}

fn any_shape() -> impl Strategy<Value = Vec<i64>> {
    prop::collection::vec(any_dim(), 0..=MAX_RANK + 2)
}

/// A well-formed header whose data has exactly the bytes it needs (random bits: some NaN/inf).
fn exact_tensor() -> impl Strategy<Value = proto::Tensor> {
    (1..=3i32, prop::collection::vec(1..=4i64, 1..=4)).prop_flat_map(|(dtype, shape)| {
        let n = shape.iter().product::<i64>() as usize * elem_size(dtype);
        prop::collection::vec(any::<u8>(), n).prop_map(move |data| wire(dtype, shape.clone(), data))
    })
}

/// Any wire tensor: well-formed, one byte off, or an arbitrary header with arbitrary bytes.
fn any_tensor() -> impl Strategy<Value = proto::Tensor> {
    prop_oneof![
        3 => exact_tensor(),
        1 => (exact_tensor(), -2i64..=2).prop_map(|(mut t, d)| {
            let len = (t.data.len() as i64 + d).max(0) as usize;
            t.data.resize(len, 0x3f);
            t
        }),
        3 => (any_dtype(), any_shape(), prop::collection::vec(any::<u8>(), 0..96))
            .prop_map(|(d, s, data)| wire(d, s, data)),
    ]
}

/// Limits from none at all to no limit.
fn any_limit() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        0..512usize,
        Just(64 << 20),
        Just(usize::MAX),
        any::<usize>()
    ]
}

// ---------------------------------------------------------------------------------------------
// An independent statement of the decoding rules, in the order the server applies them.

#[derive(Debug, PartialEq)]
enum Rule {
    DType,
    Shape,
    TooLarge,
    ByteLength,
    NonFinite(usize),
}

fn rule_of(e: &TensorError) -> Option<Rule> {
    Some(match e {
        TensorError::DType(_) => Rule::DType,
        TensorError::Shape { .. } => Rule::Shape,
        TensorError::TooLarge { .. } => Rule::TooLarge,
        TensorError::ByteLength { .. } => Rule::ByteLength,
        TensorError::NonFinite(i) => Rule::NonFinite(*i),
        TensorError::Candle(_) => return None,
    })
}

/// The values the bytes spell in the tensor's dtype, little-endian.
fn wire_values(t: &proto::Tensor) -> Vec<f32> {
    match t.dtype {
        1 => t
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        2 => t
            .data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => t
            .data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

/// The header rule `t` breaks under `limit`, if any (the data's values are not looked at).
fn broken_header_rule(t: &proto::Tensor, limit: usize) -> Option<Rule> {
    if !(1..=3).contains(&t.dtype) {
        return Some(Rule::DType);
    }
    if t.shape.is_empty() || t.shape.len() > MAX_RANK || t.shape.iter().any(|&d| d <= 0) {
        return Some(Rule::Shape);
    }
    let bytes = t
        .shape
        .iter()
        .try_fold(elem_size(t.dtype) as u128, |n, &d| n.checked_mul(d as u128));
    match bytes {
        None => Some(Rule::TooLarge),
        Some(b) if b > limit as u128 => Some(Rule::TooLarge),
        Some(b) if b != t.data.len() as u128 => Some(Rule::ByteLength),
        Some(_) => None,
    }
}

/// The first rule `t` breaks under `limit`, if any.
fn broken_rule(t: &proto::Tensor, limit: usize) -> Option<Rule> {
    broken_header_rule(t, limit).or_else(|| {
        wire_values(t)
            .iter()
            .position(|v| !v.is_finite())
            .map(Rule::NonFinite)
    })
}

/// Checks one `decode` outcome against the rules; returns a failure message.
fn check_decoded(
    t: &proto::Tensor,
    limit: usize,
    got: &Result<Tensor, TensorError>,
) -> Result<(), String> {
    match (got, broken_rule(t, limit)) {
        (Ok(x), None) => {
            let dims: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
            if x.dims() != dims.as_slice() || x.dtype() != DType::F32 {
                return Err(format!(
                    "decoded {:?} {:?} for shape {:?}",
                    x.dtype(),
                    x.dims(),
                    t.shape
                ));
            }
            let got: Vec<u32> = x
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let want: Vec<u32> = wire_values(t).iter().map(|v| v.to_bits()).collect();
            if got != want {
                return Err("decoded values differ from the little-endian bytes".into());
            }
            Ok(())
        }
        (Ok(_), Some(rule)) => Err(format!("accepted a tensor that breaks {rule:?}")),
        (Err(e), want) => {
            if e.to_string().is_empty() {
                return Err("an error with an empty message".into());
            }
            if let TensorError::TooLarge { bytes, limit: l } = e {
                if *bytes <= *l as u128 || *l != limit {
                    return Err(format!("TooLarge reports {bytes} bytes against limit {l}"));
                }
            }
            if rule_of(e) != want {
                return Err(format!(
                    "refused with `{e}` but the first broken rule is {want:?}"
                ));
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Wire tensors.

proptest! {
    #![proptest_config(config(4096))]

    /// Any dtype/shape/bytes: a tensor of exactly product(shape) elements holding the bytes'
    /// values, or the error of the first rule broken (dtype, rank, dims, limit, length, finiteness).
    #[test]
    fn decode_gives_product_of_shape_elements_or_the_first_broken_rule(t in any_tensor(), limit in any_limit()) {
        let got = decode(&t, limit);
        if let Err(msg) = check_decoded(&t, limit, &got) {
            prop_assert!(false, "{} (tensor dtype {} shape {:?}, {} bytes, limit {})", msg, t.dtype, t.shape, t.data.len(), limit);
        }
    }

    /// Decoding allocates in proportion to what was sent, and never beyond the limit: its largest
    /// allocation is the f32 copy of at most `min(bytes sent, limit)` bytes (twice that for
    /// f16/bf16), never anything the shape merely claims.
    #[test]
    fn decode_never_allocates_beyond_the_limit_or_the_bytes_sent(t in any_tensor(), limit in any_limit()) {
        let (got, largest) = largest_allocation(|| decode(&t, limit));
        let bound = 2 * t.data.len().min(limit) + 8 * t.shape.len() + 256;
        prop_assert!(largest <= bound, "largest allocation {} > {} ({:?})", largest, bound, got.err());
    }

    /// A refused header costs nothing: no allocation grows with the data or the claimed size.
    #[test]
    fn refused_headers_allocate_only_a_copy_of_the_shape(
        dtype in any_dtype(), shape in any_shape(), data_len in 0usize..1 << 16, limit in any_limit()
    ) {
        let t = wire(dtype, shape, vec![0; data_len]);
        prop_assume!(broken_header_rule(&t, limit).is_some());
        let (got, largest) = largest_allocation(|| decode(&t, limit));
        prop_assert!(got.is_err());
        prop_assert!(largest <= 8 * t.shape.len() + 64, "refusing {:?} allocated {} bytes", t.shape, largest);
    }

    /// `check_header` never accepts a tensor whose byte size exceeds the limit, and accepts every
    /// well-formed one within it.
    #[test]
    fn check_header_accepts_exactly_the_tensors_within_the_limit(
        t in any_tensor(), delta in -3i64..=3, any_limit in any_limit(), near in any::<bool>()
    ) {
        let limit = if near { (t.data.len() as i64 + delta).max(0) as usize } else { any_limit };
        match check_header(&t, limit) {
            Ok(dims) => {
                let bytes = dims.iter().try_fold(elem_size(t.dtype) as u128, |n, &d| n.checked_mul(d as u128));
                prop_assert_eq!(bytes, Some(t.data.len() as u128));
                prop_assert!(t.data.len() <= limit, "{} bytes accepted under a limit of {}", t.data.len(), limit);
                prop_assert_eq!(broken_header_rule(&t, limit), None);
            }
            Err(e) => prop_assert_eq!(rule_of(&e), broken_header_rule(&t, limit)),
        }
    }

    /// Any bytes at all, read as a protobuf `Tensor` and decoded: a tensor or an error, by the rules.
    #[test]
    fn any_protobuf_bytes_decode_to_a_tensor_or_a_clear_error(
        bytes in prop_oneof![
            1 => prop::collection::vec(any::<u8>(), 0..256),
            // A real encoding, intact or with one byte changed, cut short or padded with garbage.
            4 => (any_tensor(), 0..4u8, any::<prop::sample::Index>(), any::<u8>(), prop::collection::vec(any::<u8>(), 0..8))
                .prop_map(|(t, how, at, b, pad)| {
                    let mut v = t.encode_to_vec();
                    let i = at.index(v.len() + 1);
                    match how {
                        0 => {}
                        1 if i < v.len() => v[i] = b,
                        2 => v.truncate(i),
                        _ => v.extend(pad),
                    }
                    v
                }),
        ],
        limit in any_limit(),
    ) {
        if let Ok(t) = proto::Tensor::decode(bytes.as_slice()) {
            let got = decode(&t, limit);
            if let Err(msg) = check_decoded(&t, limit, &got) {
                prop_assert!(false, "{}", msg);
            }
        }
    }
}

/// f32 values with every exponent, from their bits (finite ones only).
fn finite_f32() -> impl Strategy<Value = f32> + Clone {
    any::<u32>().prop_map(|b| {
        let x = f32::from_bits(b);
        if x.is_finite() {
            x
        } else {
            f32::from_bits(b & 0x807f_ffff)
        }
    })
}

/// Finite f32s whose exponent lies in `0..=max_exponent` (biased), clamped to `±max`.
fn f32_up_to(max_exponent: u32, max: f32) -> impl Strategy<Value = f32> + Clone {
    any::<u32>().prop_map(move |b| {
        let e = ((b >> 23) & 0xff) % (max_exponent + 1);
        f32::from_bits((b & 0x807f_ffff) | (e << 23)).clamp(-max, max)
    })
}

/// A shape of up to four small dims and that many values.
fn shaped<S: Strategy<Value = f32> + Clone>(
    values: S,
) -> impl Strategy<Value = (Vec<usize>, Vec<f32>)> {
    prop::collection::vec(1..=4usize, 1..=4).prop_flat_map(move |shape| {
        let n: usize = shape.iter().product();
        (Just(shape), prop::collection::vec(values.clone(), n))
    })
}

fn round_trip(shape: &[usize], values: &[f32], dtype: proto::DType) -> Vec<f32> {
    let t = Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap();
    let w = encode(&t, dtype).unwrap();
    assert_eq!(w.shape, shape.iter().map(|&d| d as i64).collect::<Vec<_>>());
    let back = decode(&w, w.data.len()).unwrap();
    assert_eq!(back.dims(), shape);
    back.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

proptest! {
    #![proptest_config(config(1024))]

    /// encode→decode in f32 (or unspecified) gives back every finite value bit for bit.
    #[test]
    fn f32_round_trip_is_exact((shape, values) in shaped(finite_f32()), unspecified in any::<bool>()) {
        let dtype = if unspecified { proto::DType::DtypeUnspecified } else { proto::DType::DtypeF32 };
        let back = round_trip(&shape, &values, dtype);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&back), bits(&values));
    }

    /// encode→decode in f16 gives the nearest f16 of each value in f16's range: within half an
    /// ulp (relative 2^-11, absolute 2^-25 among subnormals).
    #[test]
    fn f16_round_trip_is_within_f16_precision((shape, values) in shaped(f32_up_to(142, half::f16::MAX.to_f32()))) {
        let back = round_trip(&shape, &values, proto::DType::DtypeF16);
        for (x, y) in values.iter().zip(&back) {
            prop_assert_eq!(y.to_bits(), half::f16::from_f32(*x).to_f32().to_bits());
            let err = (*x as f64 - *y as f64).abs();
            prop_assert!(err <= (*x as f64).abs() * 2f64.powi(-11) + 2f64.powi(-25), "{} came back as {}", x, y);
        }
    }

    /// encode→decode in bf16 gives the nearest bf16 of each value in bf16's range: within half an
    /// ulp (relative 2^-8, absolute 2^-134 among subnormals).
    #[test]
    fn bf16_round_trip_is_within_bf16_precision((shape, values) in shaped(f32_up_to(254, half::bf16::MAX.to_f32()))) {
        let back = round_trip(&shape, &values, proto::DType::DtypeBf16);
        for (x, y) in values.iter().zip(&back) {
            prop_assert_eq!(y.to_bits(), half::bf16::from_f32(*x).to_f32().to_bits());
            let err = (*x as f64 - *y as f64).abs();
            prop_assert!(err <= (*x as f64).abs() * 2f64.powi(-8) + 2f64.powi(-134), "{} came back as {}", x, y);
        }
    }

    /// A NaN or infinity anywhere, in any dtype, is refused with the flat index of the first one.
    #[test]
    fn non_finite_values_are_refused_at_their_first_index(
        dtype in 1..=3i32,
        (shape, values) in shaped(f32_up_to(142, half::f16::MAX.to_f32())),
        bad in prop::collection::vec((any::<prop::sample::Index>(), prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY])), 1..3),
    ) {
        let mut values = values;
        for (i, v) in &bad {
            let i = i.index(values.len());
            values[i] = *v;
        }
        let first = values.iter().position(|v| !v.is_finite()).unwrap();
        let data: Vec<u8> = match dtype {
            1 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            2 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
            _ => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        };
        let t = wire(dtype, shape.iter().map(|&d| d as i64).collect(), data);
        prop_assert_eq!(decode(&t, usize::MAX).unwrap_err(), TensorError::NonFinite(first));
    }
}

// ---------------------------------------------------------------------------------------------
// GenerateRequest validation.

fn sd_card() -> proto::ModelInfo {
    proto::ModelInfo {
        id: "tiny-sd15".into(),
        family: "sd1".into(),
        default_width: 64,
        default_height: 64,
        default_steps: 50,
        default_guidance_scale: 7.5,
        default_scheduler: "ddim".into(),
        schedulers: vec!["ddim".into(), "euler".into()],
        callback_tensor_inputs: SD_INPUTS.map(String::from).to_vec(),
        loras: ["a", "b"]
            .map(|n| proto::LoraInfo {
                name: n.into(),
                format: "kohya".into(),
                rank: 4,
                modules: vec![],
            })
            .to_vec(),
        preview_decoders: vec!["linear".into(), "taesd".into()],
        ..Default::default()
    }
}

fn sdxl_turbo_card() -> proto::ModelInfo {
    proto::ModelInfo {
        id: "sdxl-turbo".into(),
        family: "sdxl".into(),
        default_width: 512,
        default_height: 512,
        default_steps: 4,
        default_guidance_scale: 0.0,
        default_scheduler: "euler".into(),
        schedulers: vec!["ddim".into(), "euler".into(), "euler_a".into()],
        callback_tensor_inputs: SDXL_INPUTS.map(String::from).to_vec(),
        ..Default::default()
    }
}

const SD_INPUTS: [&str; 3] = ["latents", "prompt_embeds", "negative_prompt_embeds"];
const SDXL_INPUTS: [&str; 4] = [
    "latents",
    "prompt_embeds",
    "add_text_embeds",
    "add_time_ids",
];

/// Limits a small deployment might set, so that every limit is reachable by the strategies.
fn tight_limits() -> Limits {
    Limits {
        max_steps: 8,
        max_side: 128,
        max_pixels: 96 * 96,
        max_images: 2,
        max_prompt_bytes: 16,
        max_tensor_bytes: 256,
        default_reply_timeout: Duration::from_millis(100),
        max_reply_timeout: Duration::from_secs(2),
    }
}

/// The fields `validate` may name.
const REQUEST_FIELDS: &[&str] = &[
    "start.prompt",
    "start.negative_prompt",
    "start.latents",
    "start.prompt_embeds",
    "start.negative_prompt_embeds",
    "start.num_inference_steps",
    "start.guidance_scale",
    "start.guidance_rescale",
    "start.eta",
    "start.width",
    "start.height",
    "start.num_images_per_prompt",
    "start.scheduler",
    "start.output.format",
    "start.callback.tensor_inputs",
    "start.callback.reply_timeout_ms",
    "start.callback.on_timeout",
    "start.callback.wire_dtype",
    "start.callback.reply_step_indices",
    "start.callback.step_indices",
    "start.callback.every",
    "start.callback.preview",
    "start.callback.preview.source",
    "start.callback.preview.items",
    "start.callback.preview.max_side",
    "start.callback.preview.format",
    "start.callback.preview.decoder",
    "start.callback.preview.jpeg_quality",
];

/// Whether `field` is one a request's LoRAs are refused by: `start.loras[i].name`, `.scale`,
/// `.schedule` or `.schedule[k]`.
fn is_lora_field(field: &str) -> bool {
    let Some(rest) = field.strip_prefix("start.loras[") else {
        return false;
    };
    let Some((i, rest)) = rest.split_once("].") else {
        return false;
    };
    let index = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    index(i)
        && (matches!(rest, "name" | "scale" | "schedule")
            || rest
                .strip_prefix("schedule[")
                .and_then(|k| k.strip_suffix(']'))
                .is_some_and(index))
}

/// A LoRA request: a served name most of the time, scales edgy now and then.
fn any_lora() -> impl Strategy<Value = proto::LoraRequest> {
    (
        prop::sample::select(vec!["a", "b", "a", "c", ""]).prop_map(String::from),
        prop::option::of(mostly(-2.0f32..2.0, edgy_f32())),
        prop::option::weighted(
            0.3,
            prop::collection::vec(mostly(0.0f32..1.0, edgy_f32()), 0..12),
        ),
    )
        .prop_map(|(name, scale, schedule)| proto::LoraRequest {
            name,
            scale,
            schedule: schedule.unwrap_or_default(),
        })
}

/// A server-side guidance plan, sometimes out of bounds.
fn any_guidance_plan() -> impl Strategy<Value = proto::GuidancePlan> {
    use proto::guidance_plan::CfgCutoff;
    (
        prop::option::of(prop_oneof![
            mostly(0.0f32..=1.0, edgy_f32()).prop_map(CfgCutoff::CutoffStepRatio),
            mostly(0..12u32, edgy_u32()).prop_map(CfgCutoff::CutoffStepIndex),
        ]),
        prop::collection::vec(mostly(0.0f32..10.0, edgy_f32()), 0..12),
    )
        .prop_map(|(cfg_cutoff, schedule)| proto::GuidancePlan {
            cfg_cutoff,
            schedule,
            ..Default::default()
        })
}

/// u32s around every limit (both the default and the tight ones), and any u32.
fn edgy_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => prop::sample::select(vec![
            0, 1, 2, 3, 7, 8, 9, 16, 17, 63, 64, 120, 128, 129, 136, 1000, 1001, 2040, 2048,
            2049, 2056, 2000, 2001, 100_000, 600_000, 600_001, u32::MAX - 7, u32::MAX,
        ]),
        1 => any::<u32>(),
    ]
}

/// A value that passes most of the time (`usual`), else one from `edgy`.
fn mostly<T: std::fmt::Debug>(
    usual: impl Strategy<Value = T> + 'static,
    edgy: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<T> {
    prop_oneof![5 => usual, 1 => edgy].boxed()
}

fn edgy_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        2 => prop::sample::select(vec![
            f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1.0, 1.0 + f32::EPSILON,
            1.0 - f32::EPSILON, -f32::MIN_POSITIVE, -1.0, 7.5, f32::MAX, f32::MIN,
        ]),
        1 => any::<u32>().prop_map(f32::from_bits),
    ]
}

/// Prompts: plain words, any printable text, and strings around both prompt limits (16 and
/// 16 KiB bytes) in 1- and 2-byte characters.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[a-z ]{0,14}",
        1 => "\\PC{0,24}",
        1 => (14usize..=18).prop_map(|n| "x".repeat(n)),
        1 => (7usize..=9).prop_map(|n| "é".repeat(n)),
        1 => (16 * 1024 - 2..=16 * 1024 + 2usize).prop_map(|n| "x".repeat(n)),
    ]
}

fn any_name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec![
            "latents", "prompt_embeds", "negative_prompt_embeds", "add_text_embeds", "add_time_ids",
            "noise_pred", "pred_original_sample",
        ]).prop_map(String::from),
        1 => "\\PC{0,12}",
    ]
}

/// A protobuf enum's value: a defined one (`0..=max`) most of the time, else any i32.
fn any_enum_value(max: i32) -> BoxedStrategy<i32> {
    mostly(0..=max, prop_oneof![Just(-1), Just(max + 1), any::<i32>()])
}

/// Preview options: items past the batch, sides past the limits, qualities out of range.
fn any_preview() -> impl Strategy<Value = proto::PreviewOptions> {
    (
        any_enum_value(2),
        prop::collection::vec(mostly(0..3u32, edgy_u32()), 0..3),
        mostly(0..=512u32, edgy_u32()),
        any_enum_value(2),
        mostly(0..4u32, edgy_u32()),
        any_enum_value(2),
        mostly(0..=100u32, edgy_u32()),
    )
        .prop_map(
            |(source, items, max_side, format, every, decoder, jpeg_quality)| {
                proto::PreviewOptions {
                    source,
                    items,
                    max_side,
                    format,
                    every,
                    decoder,
                    jpeg_quality,
                }
            },
        )
}

fn any_callback() -> impl Strategy<Value = proto::CallbackOptions> {
    (
        prop::collection::vec(any_name(), 0..4),
        prop::collection::vec(mostly(0..20u32, edgy_u32()), 0..6),
        mostly(0..4u32, edgy_u32()),
        any::<bool>(),
        mostly(0..=2000u32, edgy_u32()),
        any_enum_value(2),
        any_enum_value(3),
        prop::collection::vec(mostly(0..20u32, edgy_u32()), 0..3),
        any::<bool>(),
        prop::collection::vec(any_enum_value(3), 0..3),
        prop::option::of(any_preview()),
    )
        .prop_map(
            |(
                tensor_inputs,
                step_indices,
                every,
                observe_only,
                reply_timeout_ms,
                on_timeout,
                wire_dtype,
                reply_step_indices,
                await_steps,
                phases,
                preview,
            )| {
                proto::CallbackOptions {
                    tensor_inputs,
                    step_indices,
                    every,
                    observe_only,
                    reply_timeout_ms,
                    on_timeout,
                    wire_dtype,
                    reply_step_indices,
                    await_steps,
                    phases,
                    preview,
                }
            },
        )
}

/// A request whose every field is valid most of the time and edgy or hostile otherwise.
fn any_request() -> impl Strategy<Value = proto::GenerateRequest> {
    let text = (
        "\\PC{0,8}",
        prop_oneof![1 => Just(String::new()), 2 => any_text()],
        prop::option::of(any_text()),
        mostly(
            prop::sample::select(vec!["", "ddim", "euler"]).prop_map(String::from),
            prop_oneof![
                prop::sample::select(vec!["euler_a", "DDIM", "pndm", "ddim "])
                    .prop_map(String::from),
                "\\PC{0,12}",
            ],
        ),
    );
    let unit = || mostly(0.0f32..=1.0, edgy_f32());
    let side = || prop::option::of(mostly((1..=16u32).prop_map(|k| 8 * k), edgy_u32()));
    let numbers = (
        mostly(0..=8u32, edgy_u32()),
        prop::option::of(mostly(-1.0f32..10.0, edgy_f32())),
        side(),
        side(),
        prop::option::of(any::<u64>()),
        mostly(0..=2u32, edgy_u32()),
        prop::option::weighted(0.3, unit()),
        prop::option::weighted(0.3, unit()),
    );
    let parts = (
        prop::option::weighted(0.15, any_tensor()),
        prop::option::weighted(0.15, any_tensor()),
        prop::option::weighted(0.1, any_tensor()),
        prop::option::weighted(0.5, any_callback()),
        prop::option::weighted(0.4, (any_enum_value(2), any::<bool>(), any::<bool>())),
    );
    let loras = (
        prop::collection::vec(any_lora(), 0..3),
        prop::option::weighted(0.3, any_guidance_plan()),
    );
    (text, numbers, parts, loras).prop_map(
        |(
            (model, prompt, negative_prompt, scheduler),
            (steps, guidance_scale, width, height, seed, images, eta, guidance_rescale),
            (latents, prompt_embeds, negative_prompt_embeds, callback, output),
            (loras, guidance_plan),
        )| proto::GenerateRequest {
            model,
            prompt,
            negative_prompt,
            num_inference_steps: steps,
            guidance_scale,
            width,
            height,
            seed,
            scheduler,
            num_images_per_prompt: images,
            latents,
            prompt_embeds,
            negative_prompt_embeds,
            callback,
            output: output.map(
                |(format, return_latents, return_replay)| proto::OutputOptions {
                    format,
                    return_latents,
                    return_replay,
                },
            ),
            eta,
            guidance_rescale,
            loras,
            guidance_plan,
            replay: None,
        },
    )
}

/// Whether `v` is what an accepted request may run with; returns what is wrong.
fn check_accepted(
    req: &proto::GenerateRequest,
    card: &proto::ModelInfo,
    limits: &Limits,
    v: &stepstream::server::validation::Validated,
) -> Result<(), String> {
    let p = &v.params;
    let mut wrong = Vec::new();
    let mut expect = |ok: bool, what: &str| {
        if !ok {
            wrong.push(what.to_string())
        }
    };
    expect(
        req.prompt.len() <= limits.max_prompt_bytes,
        "prompt over the limit",
    );
    expect(
        req.negative_prompt
            .as_ref()
            .is_none_or(|n| n.len() <= limits.max_prompt_bytes),
        "negative_prompt over the limit",
    );
    for t in [
        &req.latents,
        &req.prompt_embeds,
        &req.negative_prompt_embeds,
    ]
    .into_iter()
    .flatten()
    {
        expect(
            broken_header_rule(t, limits.max_tensor_bytes).is_none(),
            "a tensor header breaks a rule",
        );
    }
    expect(
        req.prompt_embeds.is_none() || req.prompt.is_empty(),
        "both prompt and prompt_embeds",
    );
    expect(
        !(req.negative_prompt_embeds.is_some()
            && (req.negative_prompt.is_some() || req.prompt_embeds.is_none())),
        "negative_prompt_embeds without prompt_embeds or with negative_prompt",
    );
    expect(
        (1..=limits.max_steps as usize).contains(&p.num_inference_steps),
        "steps outside 1..=max_steps",
    );
    expect(p.guidance_scale.is_finite(), "guidance not finite");
    // LoRAs: served names, each once, bounded scales, one schedule value per step.
    let mut seen = Vec::new();
    for l in &p.loras {
        expect(
            l.adapter < card.loras.len(),
            "a LoRA the model does not serve",
        );
        expect(!seen.contains(&l.adapter), "a LoRA listed twice");
        seen.push(l.adapter);
        let ok = |s: f64| s.is_finite() && s.abs() <= 100.0;
        expect(ok(l.scale), "a LoRA scale out of bounds");
        if let Some(sched) = &l.schedule {
            // (Its length is checked against the timestep count once the scheduler is known.)
            expect(
                sched.iter().all(|&s| ok(s)),
                "a schedule value out of bounds",
            );
        }
    }
    expect(p.loras.len() == req.loras.len(), "a LoRA dropped");
    // The guidance plan: a cutoff ratio in [0, 1], finite guidance values.
    if let Some(stepstream::pipeline::sd::Cutoff::Ratio(r)) = p.guidance_plan.cfg_cutoff {
        expect((0.0..=1.0).contains(&r), "a cutoff ratio outside [0, 1]");
    }
    if let Some(s) = &p.guidance_plan.schedule {
        expect(
            s.iter().all(|g| g.is_finite()),
            "a guidance value not finite",
        );
    }
    expect(
        (0.0..=1.0).contains(&p.guidance_rescale),
        "guidance_rescale outside [0, 1]",
    );
    expect(
        p.eta.is_finite() && p.eta >= 0.0,
        "eta negative or not finite",
    );
    for side in [p.width, p.height] {
        expect(
            side > 0 && side % 8 == 0 && side <= limits.max_side as usize,
            "a side not a multiple of 8 within the limit",
        );
    }
    expect(
        (1..=limits.max_images as usize).contains(&p.num_images_per_prompt),
        "images outside 1..=max_images",
    );
    expect(
        p.scheduler.is_empty() || card.schedulers.contains(&p.scheduler),
        "an unknown scheduler",
    );
    if let Some(s) = &v.subscription {
        let after_guidance = s.hooks.contains(&stepstream::engine::Hook::Guidance);
        expect(
            s.tensor_inputs.iter().all(|n| {
                card.callback_tensor_inputs.contains(n)
                    || (after_guidance
                        && stepstream::engine::GUIDANCE_TENSORS.contains(&n.as_str()))
            }),
            "a tensor input the model does not have at its phases",
        );
        expect(!s.hooks.is_empty(), "no phase");
        expect(
            !s.await_steps || (s.step_indices.is_empty() && s.reply_steps.is_empty()),
            "steps given with await_steps",
        );
        let mut names = s.tensor_inputs.clone();
        names.sort();
        names.dedup();
        expect(names.len() == s.tensor_inputs.len(), "a tensor input twice");
        expect(
            s.step_indices.windows(2).all(|w| w[0] < w[1]),
            "step indices not sorted and unique",
        );
        expect(
            s.reply_timeout <= limits.max_reply_timeout,
            "reply timeout over the maximum",
        );
        expect(
            s.wire_dtype != proto::DType::DtypeUnspecified,
            "an unresolved wire dtype",
        );
        if let Some(preview) = &s.preview {
            expect(
                preview.items.iter().all(|&i| i < p.num_images_per_prompt),
                "a preview item outside the batch",
            );
            expect(
                preview.max_side <= limits.max_side,
                "a preview over the max side",
            );
            expect(
                s.hooks.contains(&stepstream::engine::Hook::End),
                "previews without STEP_END",
            );
            expect(
                preview.decoder != stepstream::pipeline::preview::Decoder::Tiny
                    || card.preview_decoders.iter().any(|d| d == "taesd"),
                "TAESD previews on a model without it",
            );
        }
    }
    let want_record = req.output.as_ref().is_some_and(|o| o.return_replay);
    expect(v.record.is_some() == want_record, "a record not as asked");
    if let Some(r) = &v.record {
        expect(r.seed == Some(p.seed), "a record without the seed used");
        expect(
            r.num_inference_steps as usize == p.num_inference_steps
                && r.width == Some(p.width as u32)
                && r.height == Some(p.height as u32),
            "a record without the resolved size and steps",
        );
        expect(
            r.callback.is_none() && r.output.is_none(),
            "a record with a callback or output",
        );
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; "))
    }
}

proptest! {
    #![proptest_config(config(4096))]

    /// Any GenerateRequest is accepted with parameters inside every limit, or refused as
    /// InvalidRequest naming a `start.` field with a reason; nothing else, never a panic.
    #[test]
    fn validate_accepts_within_the_limits_or_names_a_start_field(
        req in any_request(), sdxl in any::<bool>(), tight in any::<bool>()
    ) {
        let card = if sdxl { sdxl_turbo_card() } else { sd_card() };
        let limits = if tight { tight_limits() } else { Limits::default() };
        match validate(&req, &card, &limits) {
            Ok(v) => {
                if let Err(msg) = check_accepted(&req, &card, &limits, &v) {
                    prop_assert!(false, "accepted with {}: {:?}", msg, req);
                }
            }
            Err(EngineError::InvalidRequest { field, reason }) => {
                prop_assert!(
                    REQUEST_FIELDS.contains(&field.as_str())
                        || is_lora_field(&field)
                        || field == "start.guidance_plan.cutoff_step_ratio"
                        || field.starts_with("start.callback.phases[")
                        || field.starts_with("start.guidance_plan.interval_sigma_")
                        || field.starts_with("start.guidance_plan.schedule["),
                    "unexpected field `{}`", field
                );
                prop_assert!(!reason.is_empty(), "`{}` refused without a reason", field);
            }
            Err(other) => prop_assert!(false, "not an InvalidRequest: {:?}", other),
        }
    }

    /// A replay request is unwrapped into the record's request and its edits, or refused as
    /// InvalidRequest naming a `start.replay` field; never a panic.
    #[test]
    fn replays_unwrap_or_name_a_replay_field(
        inner in any_request(),
        edits in prop::collection::vec((mostly(0..12u32, edgy_u32()), any_enum_value(3)), 0..5),
        version in mostly(1..=1u32, edgy_u32()),
        extra in any::<bool>(),
    ) {
        let record = proto::ReplayRecord {
            version,
            request: Some(Box::new(inner)),
            edits: edits
                .iter()
                .map(|&(step_index, phase)| proto::StepReply { step_index, phase, ..Default::default() })
                .collect(),
            ..Default::default()
        };
        let req = proto::GenerateRequest {
            prompt: if extra { "x".into() } else { String::new() },
            replay: Some(Box::new(record.clone())),
            ..Default::default()
        };
        match stepstream::server::validation::unwrap_replay(req) {
            Ok((unwrapped, Some(got))) => {
                prop_assert!(!extra && version == 1);
                prop_assert_eq!(got, record.edits);
                prop_assert!(unwrapped.callback.is_none() && unwrapped.replay.is_none());
            }
            Ok((_, None)) => prop_assert!(false, "a replay unwrapped to no replay"),
            Err(EngineError::InvalidRequest { field, reason }) => {
                prop_assert!(field.starts_with("start.replay"), "unexpected field `{}`", field);
                prop_assert!(!reason.is_empty());
            }
            Err(other) => prop_assert!(false, "not an InvalidRequest: {:?}", other),
        }
    }

    /// Validation allocates in proportion to the encoded request, never to sizes it claims.
    #[test]
    fn validate_allocates_no_more_than_the_request_holds(
        req in any_request(), sdxl in any::<bool>(), tight in any::<bool>()
    ) {
        let card = if sdxl { sdxl_turbo_card() } else { sd_card() };
        let limits = if tight { tight_limits() } else { Limits::default() };
        let sent = req.encoded_len();
        let (got, largest) = largest_allocation(|| validate(&req, &card, &limits).map(|_| ()));
        prop_assert!(largest <= 8 * sent + 16 * 1024, "{} bytes for a {}-byte request ({:?})", largest, sent, got);
    }
}

// ---------------------------------------------------------------------------------------------
// Step reply validation.

/// A loop state after a step, as the pipelines hold it.
struct Loop {
    tensors: CallbackTensors,
    guidance: f64,
    batch: usize,
    inputs: &'static [&'static str],
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

/// SD 1.x at batch 2 (prompt_embeds [4, 7, 16] while CFG runs), or SDXL at batch 1 (with the
/// pooled text embeds and time ids), CFG on or off.
fn fixture(sdxl: bool, cfg: bool) -> Loop {
    let mut tensors = BTreeMap::new();
    let (batch, inputs): (usize, &'static [&'static str]) = if sdxl {
        (1, &SDXL_INPUTS)
    } else {
        (2, &SD_INPUTS)
    };
    let cond = if cfg { 2 * batch } else { batch };
    tensors.insert("latents".to_string(), zeros(&[batch, 4, 8, 8]));
    if sdxl {
        tensors.insert("prompt_embeds".to_string(), zeros(&[cond, 7, 32]));
        tensors.insert("add_text_embeds".to_string(), zeros(&[cond, 12]));
        tensors.insert("add_time_ids".to_string(), zeros(&[cond, 6]));
    } else {
        tensors.insert("prompt_embeds".to_string(), zeros(&[cond, 7, 16]));
        tensors.insert("negative_prompt_embeds".to_string(), zeros(&[batch, 7, 16]));
    }
    Loop {
        tensors,
        guidance: if cfg { 7.5 } else { 0.0 },
        batch,
        inputs,
    }
}

/// How a reply tensor's shape is made from the loop's tensors.
#[derive(Debug, Clone)]
enum ShapeOf {
    /// The loop tensor `of`'s shape (or a rank-3 [1, 1, 1] if the loop has none) with dim 0 = `batch`.
    Like { of: String, batch: usize },
    /// Anything, rank 0 to 4.
    Any(Vec<usize>),
}

fn any_shape_of() -> impl Strategy<Value = ShapeOf> {
    prop_oneof![
        4 => (any_name(), prop::sample::select(vec![0usize, 1, 2, 3, 4, 8]))
            .prop_map(|(of, batch)| ShapeOf::Like { of, batch }),
        1 => prop::collection::vec(0..=5usize, 0..=4).prop_map(ShapeOf::Any),
    ]
}

fn make(shape: &ShapeOf, l: &Loop) -> Tensor {
    match shape {
        ShapeOf::Like { of, batch } => {
            let mut dims = l
                .tensors
                .get(of)
                .map_or(vec![1, 1, 1], |t| t.dims().to_vec());
            dims[0] = *batch;
            zeros(&dims)
        }
        ShapeOf::Any(dims) => zeros(dims),
    }
}

fn edgy_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => prop::sample::select(vec![
            f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, -0.0, 1.0, 1.0 + f64::EPSILON,
            1.0 - f64::EPSILON, -3.0, 7.5, f64::MAX,
        ]),
        1 => -2.0f64..10.0,
    ]
}

proptest! {
    #![proptest_config(config(4096))]

    /// Any reply against a fixed loop state is accepted only if applying it leaves the loop
    /// consistent (allowed names once each, latents' shape kept, every CFG-batched tensor at the
    /// batch the new guidance implies), else rejected with a field and a reason; never a panic.
    #[test]
    fn validate_control_accepts_only_consistent_replies_or_rejects_with_a_field(
        sdxl in any::<bool>(),
        cfg in any::<bool>(),
        subscribed in prop::collection::vec(any::<bool>(), 4),
        guidance in prop::option::of(edgy_f64()),
        replaced in prop::collection::vec((any_name(), any_shape_of()), 0..4),
        interrupt in any::<bool>(),
    ) {
        let l = fixture(sdxl, cfg);
        let allowed: Vec<String> = l.inputs.iter().zip(&subscribed).filter(|(_, s)| **s).map(|(n, _)| n.to_string()).collect();
        let state = StepState {
            step_index: 3,
            timestep: 501.0,
            num_timesteps: 10,
            guidance_scale: l.guidance,
            do_classifier_free_guidance: cfg,
            tensors: &l.tensors,
            step_ms: 1.0,
            batch: l.batch,
        };
        let control = StepControl {
            guidance_scale: guidance,
            tensors: replaced.iter().map(|(n, s)| (n.clone(), make(s, &l))).collect(),
            interrupt,
            lora_scales: Vec::new(),
        };
        match validate_control(&state, &allowed, &control) {
            Ok(()) => {
                let g = guidance.unwrap_or(l.guidance);
                prop_assert!(g.is_finite());
                let want_batch = if g > 1.0 { 2 * l.batch } else { l.batch };
                let mut after: BTreeMap<&str, Vec<usize>> = l.tensors.iter().map(|(n, t)| (n.as_str(), t.dims().to_vec())).collect();
                for (i, (n, t)) in control.tensors.iter().enumerate() {
                    prop_assert!(allowed.contains(n), "accepted unsubscribed `{}`", n);
                    prop_assert!(control.tensors[..i].iter().all(|(m, _)| m != n), "accepted `{}` twice", n);
                    let before = l.tensors.get(n).map(|t| t.dims().to_vec());
                    prop_assert!(before.is_some(), "accepted `{}`, which the loop does not hold", n);
                    let before = before.unwrap();
                    prop_assert_eq!(t.dims().len(), before.len(), "rank of `{}` changed", n);
                    prop_assert_eq!(&t.dims()[1..], &before[1..], "shape of `{}` changed beyond the batch", n);
                    after.insert(n.as_str(), t.dims().to_vec());
                }
                prop_assert_eq!(&after["latents"], l.tensors["latents"].dims());
                for name in CFG_BATCHED {
                    if let Some(d) = after.get(name) {
                        prop_assert_eq!(d[0], want_batch, "`{}` at batch {} with guidance {}", name, d[0], g);
                    }
                }
                if let Some(d) = after.get("negative_prompt_embeds") {
                    prop_assert_eq!(d[0], l.batch);
                }
            }
            Err(r) => {
                prop_assert!(!r.reason.is_empty(), "`{}` rejected without a reason", r.field);
                let names_a_replaced_tensor = control.tensors.iter().any(|(n, _)| r.field == format!("tensors[{n}]"));
                prop_assert!(
                    r.field == "guidance_scale" || r.field.starts_with("guidance_scale (subscribe to ") || names_a_replaced_tensor,
                    "rejection names `{}`", r.field
                );
            }
        }
    }
}
