//! The generated wire contract (`proto/stepstream/v1/stepstream.proto`, package `stepstream.v1`).
#![allow(missing_docs)]
#![allow(clippy::all)]

tonic::include_proto!("stepstream.v1");

/// The encoded descriptor set of the contract, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/stepstream_descriptor.bin"));
