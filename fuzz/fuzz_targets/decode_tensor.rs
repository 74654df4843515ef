//! Any bytes, read as a protobuf `stepstream.v1.Tensor`, decode to a tensor or a clear error.
//! Byte 0 picks the size limit; the rest is the message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use stepstream::proto;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let limit = common::TENSOR_LIMITS[pick as usize % common::TENSOR_LIMITS.len()];
    if let Ok(t) = proto::Tensor::decode(rest) {
        common::check_tensor(&t, limit);
    }
});
