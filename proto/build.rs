//! Compiles the .proto files with protox (pure Rust), so building needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/mtproto.proto",
        "proto/session.proto",
        "proto/gateway.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // The payloads on the message path are `Bytes`: decoding slices the
    // received buffer and encoding or cloning a request copies no payload.
    tonic_prost_build::configure()
        .bytes(".session.SessionClientData.payload")
        .bytes(".gateway.TL_gateway_sendDataToGateway.payload")
        .compile_fds(fds)?;
    Ok(())
}
