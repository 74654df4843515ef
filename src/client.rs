//! A small client for the Diffusion service: the `generate` subcommand's session, with an
//! optional CFG cutoff applied remotely (diffusers' `SDCFGCutoffCallback`, batch-correct).

use std::collections::HashMap;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::proto::{self, client_message, server_message};

/// What to generate and how to steer it.
#[derive(Clone, Debug, Default)]
pub struct GenerateOptions {
    /// The request sent as `start` (its `callback` is filled in here).
    pub request: proto::GenerateRequest,
    /// Turn CFG off after this fraction of the steps (at step `int(num_timesteps * ratio)`).
    pub cfg_cutoff: Option<f64>,
}

/// Progress reported while a generation runs.
pub trait Progress {
    /// The server accepted the request.
    fn accepted(&mut self, accepted: &proto::Accepted);
    /// A step finished.
    fn step(&mut self, step: &proto::StepEnd);
    /// A reply was rejected (a client bug; reported, then the session ends).
    fn rejected(&mut self, rejected: &proto::ReplyRejected);
}

/// Errors of a client session.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a status.
    #[error("server: {0}")]
    Status(#[from] tonic::Status),
    /// The server broke the protocol or rejected our reply.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// The step at which a cutoff `ratio` applies: Python's `int(num_timesteps * ratio)`.
pub fn cutoff_step(num_timesteps: usize, ratio: f64) -> usize {
    (num_timesteps as f64 * ratio).floor() as usize
}

/// The conditional half of a `[negative; positive]` prompt_embeds tensor (any batch).
pub fn conditional_half(t: &proto::Tensor) -> Result<proto::Tensor, ClientError> {
    let b = *t
        .shape
        .first()
        .ok_or_else(|| ClientError::Protocol("empty shape".into()))?;
    if b % 2 != 0 || b == 0 {
        return Err(ClientError::Protocol(format!(
            "prompt_embeds batch {b} is not [negative; positive]"
        )));
    }
    let half_bytes = t.data.len() / 2;
    let mut shape = t.shape.clone();
    shape[0] = b / 2;
    Ok(proto::Tensor {
        dtype: t.dtype,
        shape,
        data: t.data[half_bytes..].to_vec(),
    })
}

/// Runs one generation over `Generate`, steering it as `opts` says, and returns `Completed`.
pub async fn generate(
    client: &mut proto::diffusion_client::DiffusionClient<tonic::transport::Channel>,
    opts: GenerateOptions,
    progress: &mut dyn Progress,
) -> Result<proto::Completed, ClientError> {
    let mut request = opts.request.clone();
    request.callback = Some(match opts.cfg_cutoff {
        // Block at every step (so progress is exact) but only send tensors when needed.
        Some(_) => proto::CallbackOptions {
            tensor_inputs: vec!["prompt_embeds".into()],
            ..Default::default()
        },
        None => proto::CallbackOptions {
            observe_only: true,
            ..Default::default()
        },
    });
    let (tx, rx) = mpsc::channel(4);
    tx.send(proto::ClientMessage {
        kind: Some(client_message::Kind::Start(request)),
    })
    .await
    .map_err(|_| ClientError::Protocol("request stream closed".into()))?;
    let mut inbound = client.generate(ReceiverStream::new(rx)).await?.into_inner();
    let mut cutoff = None;
    while let Some(msg) = inbound.message().await? {
        match msg.kind {
            Some(server_message::Kind::Accepted(a)) => {
                cutoff = opts.cfg_cutoff.map(|r| cutoff_step(a.timesteps.len(), r));
                progress.accepted(&a);
            }
            Some(server_message::Kind::StepEnd(s)) => {
                progress.step(&s);
                if !s.reply_required {
                    continue;
                }
                let mut reply = proto::StepReply {
                    step_index: s.step_index,
                    ..Default::default()
                };
                if Some(s.step_index as usize) == cutoff && s.do_classifier_free_guidance {
                    let pe = s.tensors.get("prompt_embeds").ok_or_else(|| {
                        ClientError::Protocol("StepEnd lacks prompt_embeds".into())
                    })?;
                    reply.guidance_scale = Some(0.0);
                    reply.tensors =
                        HashMap::from([("prompt_embeds".to_string(), conditional_half(pe)?)]);
                }
                tx.send(proto::ClientMessage {
                    kind: Some(client_message::Kind::Reply(reply)),
                })
                .await
                .map_err(|_| ClientError::Protocol("request stream closed".into()))?;
            }
            Some(server_message::Kind::ReplyRejected(r)) => {
                progress.rejected(&r);
                return Err(ClientError::Protocol(format!(
                    "reply to step {} rejected: {}: {}",
                    r.step_index, r.field, r.reason
                )));
            }
            Some(server_message::Kind::Completed(c)) => return Ok(c),
            Some(server_message::Kind::Queued(_)) | None => {}
        }
    }
    Err(ClientError::Protocol(
        "the stream ended without Completed".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoff_step_is_pythons_int_of_the_product() {
        assert_eq!(cutoff_step(10, 0.4), 4);
        assert_eq!(cutoff_step(100, 0.29), 28); // 100 * 0.29 = 28.999999999999996
        assert_eq!(cutoff_step(11, 0.4), 4);
        assert_eq!(cutoff_step(10, 0.0), 0);
    }

    #[test]
    fn conditional_half_keeps_the_positive_rows_at_any_batch() {
        let t = proto::Tensor {
            dtype: proto::DType::DtypeF32 as i32,
            shape: vec![4, 1, 2],
            data: (0u8..32).collect(),
        };
        let h = conditional_half(&t).unwrap();
        assert_eq!(h.shape, vec![2, 1, 2]);
        assert_eq!(h.data, (16u8..32).collect::<Vec<_>>());
        let odd = proto::Tensor {
            shape: vec![3, 1, 1],
            data: vec![0; 12],
            ..t
        };
        assert!(conditional_half(&odd).is_err());
    }
}
