//! Generates the client stubs of the etcd KV subset (`etcd/`) with a
//! vendored protoc, as `tally-proto` does for Tally's own API, so a fresh
//! machine needs no system protobuf compiler.
use std::env;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["etcd/etcdserverpb/kv_subset.proto"], &["."])?;
    println!("cargo:rerun-if-changed=etcd");
    Ok(())
}
