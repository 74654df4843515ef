//! The Rust client (`stepstream::client`) against a server on 127.0.0.1:0: the seed's dynamic-CFG
//! callback reproduces the golden `ddim-10-cfg-cutoff` case step by step, rejected replies surface
//! (and can be fixed by a retry), interrupt, observe-only streams, GenerateOnce, ListModels,
//! typed errors, and the `generate` CLI's three modes.

mod common;

use common::{rel_diff, wire, Case};
use stepstream::client::{
    self, CfgCutoff, Client, ClientError, Event, StepChanges, StepState, Stream,
};
use stepstream::proto;
use tokio_stream::StreamExt;

const TOL: f32 = 1e-5;

/// The case's request: prompt, size, steps, guidance, `latents=` its initial latents.
fn request(case: &Case, tensor_inputs: &[&str]) -> proto::GenerateRequest {
    let j = &case.json;
    proto::GenerateRequest {
        prompt: j["prompt"].as_str().unwrap().into(),
        negative_prompt: j["negative_prompt"].as_str().map(String::from),
        num_inference_steps: j["num_inference_steps"].as_u64().unwrap() as u32,
        guidance_scale: Some(j["guidance_scale"].as_f64().unwrap() as f32),
        width: Some(j["width"].as_u64().unwrap() as u32),
        height: Some(j["height"].as_u64().unwrap() as u32),
        latents: Some(wire(&case.tensor("init_latents"))),
        callback: Some(proto::CallbackOptions {
            tensor_inputs: tensor_inputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        output: Some(proto::OutputOptions {
            format: proto::ImageFormat::Png as i32,
            return_latents: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn png_max_diff(done: &proto::Completed, case: &Case) -> u8 {
    let png = image::load_from_memory(&done.images[0].data)
        .unwrap()
        .to_rgb8();
    let want = case
        .tensor("image_u8")
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    assert_eq!(png.as_raw().len(), want.len());
    png.as_raw()
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap()
}

fn check_final(done: &proto::Completed, case: &Case, label: &str) {
    let lat = common::unwire(done.latents.as_ref().expect("latents returned"));
    let d = rel_diff(&lat, &case.tensor("final.latents"));
    let png = png_max_diff(done, case);
    println!("{label}: final latents rel {d:.2e}, png max diff {png}");
    assert!(d <= TOL, "{label}: final latents rel diff {d}");
    assert!(png <= 1, "{label}: PNG max diff {png}");
}

/// diffusers' `callback_dynamic_cfg`, in Rust: at `int(num_timesteps * 0.4)` keep
/// `prompt_embeds.chunk(2)[-1]` and set guidance to 0.
fn dynamic_cfg(s: &StepState) -> Result<StepChanges, ClientError> {
    if s.step_index == client::cutoff_step(s.num_timesteps, 0.4) {
        let pe = s.tensor("prompt_embeds")?;
        let cond = pe
            .chunk(2, 0)
            .map_err(|e| ClientError::Protocol(e.to_string()))?[1]
            .clone();
        return Ok(StepChanges::none()
            .guidance(0.0)
            .tensor("prompt_embeds", cond));
    }
    Ok(StepChanges::none())
}

async fn client_for(server: &common::server::TestServer) -> Client {
    Client::connect(server.addr.to_string())
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_cfg_reproduces_the_golden_case_every_step() {
    let case = Case::load("tiny-sd15", "ddim-10-cfg-cutoff");
    let server = common::server::start(Default::default()).await;
    let mut client = client_for(&server).await;
    let mut seen = Vec::new();
    let done = client
        .generate(request(&case, &["latents", "prompt_embeds"]), |s| {
            seen.push(s.clone());
            dynamic_cfg(s)
        })
        .await
        .expect("completed");
    let mut worst = 0f32;
    for (k, s) in seen.iter().enumerate() {
        let st = case.step(k);
        assert_eq!(s.step_index as u64, st["step_index"].as_u64().unwrap());
        assert_eq!(s.timestep, st["timestep"].as_f64().unwrap());
        assert_eq!(s.num_timesteps, 10);
        assert_eq!(
            s.do_classifier_free_guidance,
            st["cfg_applied"].as_bool().unwrap()
        );
        let d = rel_diff(
            &s.tensors["latents"],
            &case.step_tensor(k, &["callback_in", "latents"]),
        );
        worst = worst.max(d);
        assert!(d <= TOL, "step {k}: latents rel diff {d}");
        let d = common::max_abs_diff(
            &s.tensors["prompt_embeds"],
            &case.step_tensor(k, &["callback_in", "prompt_embeds"]),
        );
        assert!(d <= TOL, "step {k}: prompt_embeds diff {d}");
    }
    assert_eq!(seen.len(), 10);
    println!("dynamic cfg (Rust client): worst per-step latents rel {worst:.2e}");
    check_final(&done, &case, "dynamic cfg (Rust client)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cfg_cutoff_chooses_its_step_from_accepted_blocks_once_and_matches() {
    let case = Case::load("tiny-sd15", "ddim-10-cfg-cutoff");
    let server = common::server::start(Default::default()).await;
    let mut client = client_for(&server).await;
    let cutoff = CfgCutoff::ratio(0.4);
    let mut req = request(&case, &[]);
    req.callback = Some(cutoff.subscription());
    let mut calls = Vec::new();
    let done = client
        .generate_with_steps(
            req,
            |a| cutoff.selection(a),
            |s| {
                calls.push(s.step_index);
                cutoff.apply(s)
            },
        )
        .await
        .unwrap();
    assert_eq!(calls, vec![4]);
    check_final(&done, &case, "CfgCutoff(0.4), one blocking step");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_shape_surfaces_the_rejection_and_a_retry_can_fix_it() {
    let case = Case::load("tiny-sd15", "ddim-10-cfg-cutoff");
    let server = common::server::start(Default::default()).await;
    let mut client = client_for(&server).await;
    let wrong = |s: &StepState| -> Result<StepChanges, ClientError> {
        if s.step_index == 4 {
            let pe = s.tensor("prompt_embeds")?;
            let bad = pe.narrow(1, 0, 76).unwrap();
            return Ok(StepChanges::none().tensor("prompt_embeds", bad));
        }
        Ok(StepChanges::none())
    };
    let err = client
        .generate(request(&case, &["prompt_embeds"]), wrong)
        .await
        .unwrap_err();
    match err {
        ClientError::ReplyRejected {
            step_index,
            field,
            reason,
        } => {
            assert_eq!(step_index, 4);
            assert_eq!(field, "tensors[prompt_embeds]");
            assert!(reason.contains("76"), "{reason}");
        }
        other => panic!("expected ReplyRejected, got {other:?}"),
    }

    // Guidance off without the conditional half: the reason says what to send.
    let err = client
        .generate(request(&case, &["prompt_embeds"]), |s| {
            Ok::<_, ClientError>(if s.step_index == 4 {
                StepChanges::none().guidance(0.0)
            } else {
                StepChanges::none()
            })
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::ReplyRejected { field, reason, .. }
            if field == "guidance_scale" && reason.contains("conditional half")),
        "{err}"
    );

    let mut client = client.reply_retries(1);
    let mut rejections = Vec::new();
    let done = client
        .generate(request(&case, &["prompt_embeds"]), |s| {
            if s.step_index != 4 {
                return Ok(StepChanges::none());
            }
            match &s.rejected {
                None => Ok(StepChanges::none().guidance(0.0)),
                Some(r) => {
                    rejections.push(r.field.clone());
                    dynamic_cfg(s)
                }
            }
        })
        .await
        .unwrap();
    assert_eq!(rejections, vec!["guidance_scale".to_string()]);
    check_final(&done, &case, "retried reply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_matches_the_golden_case() {
    let case = Case::load("tiny-sd15", "ddim-10-interrupt");
    let server = common::server::start(Default::default()).await;
    let mut client = client_for(&server).await;
    let mut seen = Vec::new();
    let done = client
        .generate(request(&case, &[]), |s| {
            seen.push(s.step_index);
            Ok::<_, ClientError>(if s.step_index == 5 {
                StepChanges::none().interrupt()
            } else {
                StepChanges::none()
            })
        })
        .await
        .unwrap();
    assert_eq!(seen, vec![0, 1, 2, 3, 4, 5]);
    assert!(done.interrupted);
    check_final(&done, &case, "interrupt at 5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_streams_every_step_without_blocking() {
    let case = Case::load("tiny-sd15", "ddim-10");
    let server = common::server::start(Default::default()).await;
    let mut client = client_for(&server).await;
    let mut events = client.observe(request(&case, &["latents"])).await.unwrap();
    let mut steps = Vec::new();
    let mut first_accepted = false;
    let mut done = None;
    while let Some(ev) = events.next().await {
        match ev.unwrap() {
            Event::Accepted(a) => {
                assert!(steps.is_empty());
                assert_eq!(a.timesteps.len(), 10);
                first_accepted = true;
            }
            Event::Step(s) => {
                assert!(!s.reply_required);
                let d = rel_diff(
                    &s.tensors["latents"],
                    &case.step_tensor(steps.len(), &["callback_in", "latents"]),
                );
                assert!(d <= TOL, "step {}: {d}", s.step_index);
                steps.push(s.step_index);
            }
            Event::Completed(c) => done = Some(c),
        }
    }
    assert!(first_accepted);
    assert_eq!(steps, (0..10).collect::<Vec<_>>());
    check_final(&done.expect("Completed"), &case, "observe-only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_once_and_list_models() {
    let case = Case::load("tiny-sd15", "ddim-10");
    let server = common::server::start(Default::default()).await;
    let mut client = client_for(&server)
        .await
        .with_token("ignored-for-now")
        .unwrap();
    let models = client.list_models().await.unwrap();
    assert_eq!(models.default_model, "tiny-sd15");
    assert!(models.models[0]
        .callback_tensor_inputs
        .contains(&"prompt_embeds".to_string()));
    let done = client.generate_once(request(&case, &[])).await.unwrap();
    check_final(&done, &case, "GenerateOnce");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_the_status_and_a_failing_callback_cancels() {
    let case = Case::load("tiny-sd15", "ddim-10");
    let server = common::server::start(Default::default()).await;
    let mut client = client_for(&server).await;
    let mut req = request(&case, &[]);
    req.model = "no-such-model".into();
    let err = client.generate_once(req).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    let mut req = request(&case, &[]);
    req.width = Some(65);
    let err = client
        .generate(req, |_| Ok::<_, ClientError>(StepChanges::none()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    assert!(err.to_string().contains("start.width"), "{err}");

    let err = client
        .generate(request(&case, &[]), |s| {
            if s.step_index == 2 {
                return Err(ClientError::Protocol("my callback gave up".into()));
            }
            Ok(StepChanges::none())
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Callback { step_index: 2, .. }),
        "{err}"
    );
    // The abandoned generation freed its slot: the next one runs.
    let done = client.generate_once(request(&case, &[])).await.unwrap();
    check_final(&done, &case, "after a failed callback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_observed_stream_cancels_it() {
    let case = Case::load("tiny-sd15", "ddim-10");
    let server = common::server::start(Default::default()).await;
    let mut client = client_for(&server).await;
    {
        let mut events = client.observe(request(&case, &[])).await.unwrap();
        assert!(matches!(events.next().await, Some(Ok(Event::Accepted(_)))));
    }
    let done = client.generate_once(request(&case, &[])).await.unwrap();
    check_final(&done, &case, "after a dropped observer");
    fn is_stream<S: Stream>(_: &S) {}
    is_stream(&client.observe(request(&case, &[])).await.unwrap());
}

/// The CLI's three modes: GenerateOnce (default), `--observe`, `--cfg-cutoff`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generate_cli_runs_each_mode() {
    let server = common::server::start(Default::default()).await;
    let addr = server.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    for (i, mode) in [vec![], vec!["--observe"], vec!["--cfg-cutoff", "0.4"]]
        .into_iter()
        .enumerate()
    {
        let out = dir.path().join(format!("out{i}.png"));
        let addr = addr.clone();
        let args = mode.clone();
        let out2 = out.clone();
        let o = tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_stepstream"))
                .args(["generate", "--addr", &addr, "--prompt", "a red fox"])
                .args(["--steps", "5", "--seed", "3"])
                .args(&args)
                .arg("--out")
                .arg(&out2)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{mode:?}: {stderr}");
        assert!(stderr.contains("seed 3"), "{mode:?}: {stderr}");
        let img = image::open(&out).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
    }
    // --observe and --cfg-cutoff exclude each other.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_stepstream"))
        .args(["generate", "--addr", &addr, "--prompt", "x", "--observe"])
        .args(["--cfg-cutoff", "0.4"])
        .output()
        .unwrap();
    assert!(!o.status.success());
}
