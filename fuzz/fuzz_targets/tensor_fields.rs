//! Any dtype, shape and data (structured, without the protobuf layer) decode to a tensor or a
//! clear error, and the limit holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stepstream::proto;

mod common;

fuzz_target!(|input: (i32, Vec<i64>, Vec<u8>, u8)| {
    let (dtype, shape, data, pick) = input;
    let limit = common::TENSOR_LIMITS[pick as usize % common::TENSOR_LIMITS.len()];
    common::check_tensor(&proto::Tensor { dtype, shape, data }, limit);
});
