//! Generates the gRPC and message code with a vendored protoc, so builds need no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        // The rpc is called `Connect`; the generated `connect` constructor would clash with it.
        .build_transport(false)
        .compile_with_config(
            config,
            &[
                "sinew/mesh/v1/control.proto",
                "sinew/mesh/v1/admin.proto",
                "sinew/mesh/v1/transport.proto",
                "sinew/mesh/v1/outbox.proto",
                "grpc/health/v1/health.proto",
            ],
            &["."],
        )?;
    Ok(())
}
