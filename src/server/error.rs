//! The one place where errors become gRPC statuses.

use tonic::{Code, Status};

use crate::engine::EngineError;

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        let code = match &e {
            EngineError::InvalidRequest { .. } => Code::InvalidArgument,
            EngineError::UnknownModel { .. } => Code::NotFound,
            EngineError::QueueFull { .. } => Code::ResourceExhausted,
            EngineError::ReplyTimeout { .. } => Code::DeadlineExceeded,
            EngineError::ClientStalled { .. } => Code::DeadlineExceeded,
            EngineError::StartTimeout { .. } => Code::DeadlineExceeded,
            EngineError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            EngineError::Unauthenticated(_) => Code::Unauthenticated,
            EngineError::Cancelled => Code::Cancelled,
            EngineError::Protocol(_) => Code::InvalidArgument,
            EngineError::Unavailable(_) => Code::Unavailable,
            EngineError::Internal(_) => Code::Internal,
        };
        let mut status = Status::new(code, e.to_string());
        if code == Code::ResourceExhausted {
            // A retry hint (gRPC's retry pushback), in milliseconds.
            status.metadata_mut().insert(
                "grpc-retry-pushback-ms",
                tonic::metadata::MetadataValue::from(1000u32),
            );
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_engine_error_has_its_code() {
        let cases = [
            (
                EngineError::InvalidRequest {
                    field: "start.width".into(),
                    reason: "x".into(),
                },
                Code::InvalidArgument,
            ),
            (
                EngineError::UnknownModel {
                    name: "m".into(),
                    available: vec!["a".into()],
                },
                Code::NotFound,
            ),
            (
                EngineError::QueueFull { capacity: 2 },
                Code::ResourceExhausted,
            ),
            (
                EngineError::ReplyTimeout {
                    step_index: 1,
                    timeout_ms: 5,
                },
                Code::DeadlineExceeded,
            ),
            (
                EngineError::ClientStalled { timeout_ms: 5 },
                Code::DeadlineExceeded,
            ),
            (
                EngineError::StartTimeout { timeout_ms: 5 },
                Code::DeadlineExceeded,
            ),
            (
                EngineError::DeadlineExceeded { timeout_ms: 5 },
                Code::DeadlineExceeded,
            ),
            (
                EngineError::Unauthenticated("x".into()),
                Code::Unauthenticated,
            ),
            (EngineError::Cancelled, Code::Cancelled),
            (EngineError::Protocol("p".into()), Code::InvalidArgument),
            (EngineError::Unavailable("u".into()), Code::Unavailable),
            (EngineError::Internal("i".into()), Code::Internal),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let s = Status::from(e);
            assert_eq!(s.code(), code, "{msg}");
            assert_eq!(s.message(), msg);
        }
    }

    #[test]
    fn messages_name_the_field_and_the_choices() {
        let s = Status::from(EngineError::UnknownModel {
            name: "nope".into(),
            available: vec!["tiny-sd15".into(), "other".into()],
        });
        assert!(s.message().contains("nope") && s.message().contains("tiny-sd15, other"));
        let s = Status::from(EngineError::InvalidRequest {
            field: "start.height".into(),
            reason: "must be a multiple of 8".into(),
        });
        assert!(s.message().contains("start.height"));
    }
}
