//! Any bytes, read as a protobuf `GenerateRequest`, are accepted within the limits or refused
//! as InvalidRequest naming a `start.` field, against an SD 1.x and an SDXL card, with the
//! default and with tight limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use stepstream::proto;

mod common;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = proto::GenerateRequest::decode(data) {
        for sdxl in [false, true] {
            for tight in [false, true] {
                common::check_request(&req, sdxl, tight);
            }
        }
    }
});
