//! The `accrete.v1` gRPC API: messages and tonic clients and servers, generated from
//! `proto/accrete/v1/accrete.proto`, plus the guest output contract both ends check.
//!
//! Proto types stop at the gRPC edge; each crate converts them by hand into its own types.

pub mod config_file;
pub mod output;
pub mod transport;

/// Version 1 of the API.
pub mod v1 {
    tonic::include_proto!("accrete.v1");
}

/// Largest gRPC message either side accepts by default (modules and study batches are big).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The encoded `FileDescriptorSet` of `accrete.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/accrete_descriptor.bin"));
