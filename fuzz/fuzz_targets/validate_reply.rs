//! Any bytes, read as a protobuf `StepReply`, go through what the server does with a reply
//! (subscription check, tensor decoding, validate_control) against a fixed loop state; it is
//! applied only if it leaves the loop consistent, else rejected with a field and a reason.
//! Byte 0 picks the state: bit 0 SDXL, bit 1 CFG on, bits 2..6 which tensors are subscribed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use stepstream::proto;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let l = common::fixture(pick & 1 != 0, pick & 2 != 0);
    let allowed: Vec<String> = l
        .inputs
        .iter()
        .enumerate()
        .filter(|(i, _)| pick & (4 << i) != 0)
        .map(|(_, n)| n.to_string())
        .collect();
    if let Ok(reply) = proto::StepReply::decode(rest) {
        common::check_reply(&reply, &l, &allowed, 1 << 20);
    }
});
