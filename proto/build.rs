//! Generates the gRPC code from proto/ with a vendored protoc, so a fresh
//! machine needs no system protobuf compiler.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { env::set_var("PROTOC", protoc) };
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("tally_descriptor.bin"))
        .compile_protos(&["tally/v1/tally.proto", "tally/internal/v1/raft.proto"], &["."])?;
    println!("cargo:rerun-if-changed=tally");
    Ok(())
}
