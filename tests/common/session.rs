//! A thin driver for one `Generate` stream: send `start`, read events, send replies.

use stepstream::proto::diffusion_client::DiffusionClient;
use stepstream::proto::{self, client_message, server_message::Kind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// One open session.
pub struct Session {
    tx: Option<mpsc::Sender<proto::ClientMessage>>,
    rx: Streaming<proto::ServerMessage>,
}

impl Session {
    /// Opens the stream and sends `start`.
    pub async fn start(
        client: &mut DiffusionClient<Channel>,
        req: proto::GenerateRequest,
    ) -> Result<Session, Status> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(proto::ClientMessage {
            kind: Some(client_message::Kind::Start(req)),
        })
        .await
        .unwrap();
        let rx = client.generate(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Session { tx: Some(tx), rx })
    }

    /// The next event, `Ok(None)` at a clean end, `Err` with the status that ended the stream.
    pub async fn next(&mut self) -> Result<Option<Kind>, Status> {
        Ok(self.rx.message().await?.and_then(|m| m.kind))
    }

    /// The next event, which must exist.
    pub async fn expect(&mut self) -> Kind {
        self.next().await.expect("stream ok").expect("an event")
    }

    /// Sends a reply.
    pub async fn reply(&self, reply: proto::StepReply) {
        self.tx
            .as_ref()
            .expect("still open")
            .send(proto::ClientMessage {
                kind: Some(client_message::Kind::Reply(reply)),
            })
            .await
            .expect("send reply");
    }

    /// Sends a reply if the stream is still open; `false` if it has ended (its status is then
    /// what [`Session::next`] returns).
    pub async fn try_reply(&self, reply: proto::StepReply) -> bool {
        match &self.tx {
            Some(tx) => tx
                .send(proto::ClientMessage {
                    kind: Some(client_message::Kind::Reply(reply)),
                })
                .await
                .is_ok(),
            None => false,
        }
    }

    /// Sends an arbitrary client message.
    pub async fn send(&self, msg: proto::ClientMessage) {
        self.tx.as_ref().unwrap().send(msg).await.unwrap();
    }

    /// Half-closes the client side of the stream.
    pub fn half_close(&mut self) {
        self.tx = None;
    }

    /// Reads until Completed (answering nothing); panics on anything but StepEnd/Completed.
    pub async fn until_completed(&mut self) -> proto::Completed {
        loop {
            match self.expect().await {
                Kind::Completed(c) => return c,
                Kind::StepEnd(_) | Kind::Accepted(_) | Kind::Queued(_) => {}
                other => panic!("unexpected event {other:?}"),
            }
        }
    }
}

/// Runs `req` on a Generate stream, answering each event that waits with `answer`: every
/// event, in order, and Completed (or the status that ended the stream).
pub async fn run(
    client: &mut DiffusionClient<Channel>,
    req: proto::GenerateRequest,
    mut answer: impl FnMut(&proto::StepEnd) -> proto::StepReply,
) -> Result<(Vec<proto::StepEnd>, proto::Completed), Status> {
    let mut s = Session::start(client, req).await?;
    let mut events = Vec::new();
    loop {
        match s.next().await?.expect("an event") {
            Kind::StepEnd(step) => {
                if step.reply_required {
                    s.reply(answer(&step)).await;
                }
                events.push(step);
            }
            Kind::Completed(c) => return Ok((events, c)),
            Kind::Accepted(_) | Kind::Queued(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A reply to `step` at its phase that changes nothing.
pub fn reply_to(step: &proto::StepEnd) -> proto::StepReply {
    proto::StepReply {
        phase: step.phase,
        ..ok_reply(step.step_index)
    }
}

/// An empty reply to `step`.
pub fn ok_reply(step: u32) -> proto::StepReply {
    proto::StepReply {
        step_index: step,
        ..Default::default()
    }
}
