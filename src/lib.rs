//! stepstream: a gRPC server that runs Stable Diffusion and lets remote clients watch and steer
//! the denoising loop step by step (the remote form of diffusers' `callback_on_step_end`).
#![warn(missing_docs)]

pub mod bench;
pub mod client;
pub mod devmem;
pub mod engine;
pub mod kernels;
pub mod metrics;
pub mod models;
pub mod pipeline;
pub mod proto;
pub mod rng;
pub mod schedulers;
pub mod server;
pub mod tensor;
