//! The `stepstream` binary.
fn main() {}
