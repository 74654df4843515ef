//! The generated wire contract (`proto/stepstream/v1/stepstream.proto`, package `stepstream.v1`),
//! and the xDS ORCA load-report service (`proto/xds/`).
#![allow(missing_docs)]
#![allow(clippy::all)]

tonic::include_proto!("stepstream.v1");

/// The xDS ORCA messages and service (`proto/xds/`): load reports for balancers.
pub mod xds {
    /// Data messages.
    pub mod data {
        /// ORCA.
        pub mod orca {
            /// Version 3.
            pub mod v3 {
                tonic::include_proto!("xds.data.orca.v3");
            }
        }
    }
    /// Services.
    pub mod service {
        /// ORCA.
        pub mod orca {
            /// Version 3.
            pub mod v3 {
                tonic::include_proto!("xds.service.orca.v3");
            }
        }
    }
}

/// The encoded descriptor set of the contract, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/stepstream_descriptor.bin"));
