//! diffusers' dynamic-CFG callback (`callback_dynamic_cfg` from its "Pipeline callbacks" docs),
//! in Rust, against a running stepstream server:
//!
//! ```text
//! cargo run --release -- serve                                   # another terminal
//! cargo run --release --example dynamic_cfg -- [ADDR] [OUT.png] [STEPS]
//! ```
//!
//! The Python original, for comparison:
//!
//! ```python
//! def callback_dynamic_cfg(pipe, step_index, timestep, callback_kwargs):
//!     if step_index == int(pipe.num_timesteps * 0.4):
//!         prompt_embeds = callback_kwargs["prompt_embeds"]
//!         prompt_embeds = prompt_embeds.chunk(2)[-1]
//!         pipe._guidance_scale = 0.0
//!         callback_kwargs["prompt_embeds"] = prompt_embeds
//!     return callback_kwargs
//! ```

use stepstream::client::{cutoff_step, Client, StepChanges, StepState};
use stepstream::proto;

/// The seed callback: at `int(num_timesteps * 0.4)`, keep the conditional half of
/// `prompt_embeds` (`chunk(2)[-1]`) and turn guidance off.
fn callback_dynamic_cfg(step: &StepState) -> candle_core::Result<StepChanges> {
    if step.step_index == cutoff_step(step.num_timesteps, 0.4) {
        let prompt_embeds = &step.tensors["prompt_embeds"];
        let prompt_embeds = prompt_embeds.chunk(2, 0)?[1].clone();
        return Ok(StepChanges::none()
            .guidance(0.0)
            .tensor("prompt_embeds", prompt_embeds));
    }
    Ok(StepChanges::none())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:50051".into());
    let out = args.next().unwrap_or_else(|| "out_custom_cfg.png".into());
    let steps: u32 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(0);

    let mut client = Client::connect(&addr).await?;
    let request = proto::GenerateRequest {
        prompt: "a photo of an astronaut riding a horse on mars".into(),
        num_inference_steps: steps,
        seed: Some(0),
        // diffusers' callback_on_step_end_tensor_inputs=["prompt_embeds"]. Every step waits for
        // the closure, as in diffusers; `Client::generate_with_steps` with
        // `CfgCutoff::selection` would make only the cutoff step wait.
        callback: Some(proto::CallbackOptions {
            tensor_inputs: vec!["prompt_embeds".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let done = client.generate(request, callback_dynamic_cfg).await?;
    std::fs::write(&out, &done.images[0].data)?;
    println!("wrote {out} (seed {})", done.seed);
    Ok(())
}
