//! What every target checks, and the fixed model cards, limits and loop states they run against.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use stepstream::engine::EngineError;
use stepstream::pipeline::{
    validate_control, CallbackTensors, StepControl, StepState, CFG_BATCHED,
};
use stepstream::proto;
use stepstream::server::validation::{validate, Limits};
use stepstream::tensor::{check_header, decode, TensorError};

/// Size limits the tensor targets pick from with one input byte.
pub const TENSOR_LIMITS: [usize; 6] = [0, 16, 4096, 1 << 20, 64 << 20, usize::MAX];

/// `decode` and `check_header` agree, and an accepted tensor is exactly what its header says,
/// within the limit. Panics (a finding) otherwise.
pub fn check_tensor(t: &proto::Tensor, limit: usize) -> Option<Tensor> {
    let header = check_header(t, limit);
    let decoded = decode(t, limit);
    match (&header, &decoded) {
        (Ok(dims), Ok(x)) => {
            assert_eq!(x.dims(), dims.as_slice());
            assert_eq!(x.dtype(), DType::F32);
            let elem = if t.dtype == proto::DType::DtypeF32 as i32 {
                4
            } else {
                2
            };
            let n: usize = dims.iter().product();
            assert_eq!(x.elem_count(), n);
            assert_eq!(n * elem, t.data.len());
            assert!(
                t.data.len() <= limit,
                "accepted {} bytes over a limit of {limit}",
                t.data.len()
            );
            let dims_sent: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
            assert_eq!(dims, &dims_sent);
        }
        (Ok(_), Err(e)) => assert!(
            matches!(e, TensorError::NonFinite(_)),
            "header passed but decode refused with `{e}`"
        ),
        (Err(h), Err(e)) => assert_eq!(h, e, "check_header and decode disagree"),
        (Err(h), Ok(_)) => panic!("decode accepted what check_header refused: {h}"),
    }
    if let Err(e) = &decoded {
        assert!(!e.to_string().is_empty());
        if let TensorError::TooLarge { bytes, limit: l } = e {
            assert!(*bytes > *l as u128 && *l == limit);
        }
    }
    decoded.ok()
}

pub const SD_INPUTS: [&str; 3] = ["latents", "prompt_embeds", "negative_prompt_embeds"];
pub const SDXL_INPUTS: [&str; 4] = [
    "latents",
    "prompt_embeds",
    "add_text_embeds",
    "add_time_ids",
];

/// An SD 1.x card (`sdxl` false) or an SDXL Turbo-like one.
pub fn card(sdxl: bool) -> proto::ModelInfo {
    let (inputs, steps, guidance, side): (&[&str], _, _, _) = if sdxl {
        (&SDXL_INPUTS, 4, 0.0, 512)
    } else {
        (&SD_INPUTS, 50, 7.5, 64)
    };
    proto::ModelInfo {
        id: if sdxl { "sdxl-turbo" } else { "tiny-sd15" }.into(),
        family: if sdxl { "sdxl" } else { "sd1" }.into(),
        default_width: side,
        default_height: side,
        default_steps: steps,
        default_guidance_scale: guidance,
        default_scheduler: "ddim".into(),
        schedulers: vec!["ddim".into(), "euler".into()],
        callback_tensor_inputs: inputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// The server's defaults, or tight limits a small deployment might set.
pub fn limits(tight: bool) -> Limits {
    if tight {
        Limits {
            max_steps: 8,
            max_side: 128,
            max_images: 2,
            max_prompt_bytes: 16,
            max_tensor_bytes: 256,
            default_reply_timeout: Duration::from_millis(100),
            max_reply_timeout: Duration::from_secs(2),
        }
    } else {
        Limits::default()
    }
}

/// `validate` accepts within every limit or names a `start.` field; nothing else.
pub fn check_request(req: &proto::GenerateRequest, sdxl: bool, tight: bool) {
    let (card, limits) = (card(sdxl), limits(tight));
    match validate(req, &card, &limits) {
        Ok(v) => {
            let p = &v.params;
            assert!(req.prompt.len() <= limits.max_prompt_bytes);
            assert!((1..=limits.max_steps as usize).contains(&p.num_inference_steps));
            assert!(p.guidance_scale.is_finite() && p.eta.is_finite() && p.eta >= 0.0);
            assert!((0.0..=1.0).contains(&p.guidance_rescale));
            for side in [p.width, p.height] {
                assert!(side > 0 && side % 8 == 0 && side <= limits.max_side as usize);
            }
            assert!((1..=limits.max_images as usize).contains(&p.num_images_per_prompt));
            for t in [
                &req.latents,
                &req.prompt_embeds,
                &req.negative_prompt_embeds,
            ]
            .into_iter()
            .flatten()
            {
                assert!(check_header(t, limits.max_tensor_bytes).is_ok());
            }
            if let Some(s) = &v.subscription {
                assert!(s.reply_timeout <= limits.max_reply_timeout);
                assert!(s
                    .tensor_inputs
                    .iter()
                    .all(|n| card.callback_tensor_inputs.contains(n)));
                assert!(s.step_indices.windows(2).all(|w| w[0] < w[1]));
            }
        }
        Err(EngineError::InvalidRequest { field, reason }) => {
            assert!(
                field.starts_with("start.") && field.len() > 6,
                "field `{field}`"
            );
            assert!(!reason.is_empty());
        }
        Err(other) => panic!("not an InvalidRequest: {other:?}"),
    }
}

/// A loop state after a step: SD 1.x at batch 2 or SDXL at batch 1, CFG on or off.
pub struct Loop {
    pub tensors: CallbackTensors,
    pub guidance: f64,
    pub batch: usize,
    pub inputs: &'static [&'static str],
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

pub fn fixture(sdxl: bool, cfg: bool) -> Loop {
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

/// Does what the server does with a reply (names subscribed, tensors decoded, control validated)
/// and checks that an accepted control leaves the loop consistent.
pub fn check_reply(reply: &proto::StepReply, l: &Loop, allowed: &[String], limit: usize) {
    let mut names: Vec<&String> = reply.tensors.keys().collect();
    names.sort();
    let mut tensors = Vec::new();
    for name in names {
        if !allowed.contains(name) {
            return; // rejected as `tensors[name]`: not subscribed
        }
        match check_tensor(&reply.tensors[name], limit) {
            Some(t) => tensors.push((name.clone(), t)),
            None => return, // rejected as `tensors[name]` with the decode error
        }
    }
    let state = StepState {
        step_index: 3,
        timestep: 501.0,
        num_timesteps: 10,
        guidance_scale: l.guidance,
        do_classifier_free_guidance: l.guidance > 1.0,
        tensors: &l.tensors,
        step_ms: 1.0,
        batch: l.batch,
    };
    let control = StepControl {
        guidance_scale: reply.guidance_scale.map(f64::from),
        tensors,
        interrupt: reply.interrupt,
    };
    match validate_control(&state, allowed, &control) {
        Ok(()) => {
            let g = control.guidance_scale.unwrap_or(l.guidance);
            assert!(g.is_finite());
            let want = if g > 1.0 { 2 * l.batch } else { l.batch };
            let mut after: BTreeMap<&str, &[usize]> = l
                .tensors
                .iter()
                .map(|(n, t)| (n.as_str(), t.dims()))
                .collect();
            for (n, t) in &control.tensors {
                let before = l.tensors[n].dims();
                assert_eq!(t.dims().len(), before.len());
                assert_eq!(&t.dims()[1..], &before[1..]);
                after.insert(n.as_str(), t.dims());
            }
            assert_eq!(after["latents"], l.tensors["latents"].dims());
            for name in CFG_BATCHED {
                if let Some(d) = after.get(name) {
                    assert_eq!(d[0], want, "{name} at the wrong batch for guidance {g}");
                }
            }
        }
        Err(r) => assert!(!r.field.is_empty() && !r.reason.is_empty()),
    }
}
