//! Generates the server side of containerd's `Snapshots` gRPC service.
//!
//! The message types come from the containerd-client crate (generated from
//! containerd's API), which only generates clients. tonic's manual builder
//! makes the server trait and router over those same types, so the workspace
//! carries one copy of the API types, one tonic, and no vendored protos.

use tonic_build::manual::{Builder, Method, Service};

const PKG: &str = "containerd_client::services::v1::snapshots";

fn method(name: &str, route: &str, input: &str, output: &str, streaming: bool) -> Method {
    let output = if output == "()" {
        "crate::proto::Empty".to_string()
    } else {
        format!("{PKG}::{output}")
    };
    let m = Method::builder()
        .name(name)
        .route_name(route)
        .input_type(format!("{PKG}::{input}"))
        .output_type(output)
        .codec_path("tonic_prost::ProstCodec");
    if streaming {
        m.server_streaming().build()
    } else {
        m.build()
    }
}

fn main() {
    let service = Service::builder()
        .name("Snapshots")
        .package("containerd.services.snapshots.v1")
        .method(method(
            "prepare",
            "Prepare",
            "PrepareSnapshotRequest",
            "PrepareSnapshotResponse",
            false,
        ))
        .method(method(
            "view",
            "View",
            "ViewSnapshotRequest",
            "ViewSnapshotResponse",
            false,
        ))
        .method(method(
            "mounts",
            "Mounts",
            "MountsRequest",
            "MountsResponse",
            false,
        ))
        .method(method(
            "commit",
            "Commit",
            "CommitSnapshotRequest",
            "()",
            false,
        ))
        .method(method(
            "remove",
            "Remove",
            "RemoveSnapshotRequest",
            "()",
            false,
        ))
        .method(method(
            "stat",
            "Stat",
            "StatSnapshotRequest",
            "StatSnapshotResponse",
            false,
        ))
        .method(method(
            "update",
            "Update",
            "UpdateSnapshotRequest",
            "UpdateSnapshotResponse",
            false,
        ))
        .method(method(
            "list",
            "List",
            "ListSnapshotsRequest",
            "ListSnapshotsResponse",
            true,
        ))
        .method(method(
            "usage",
            "Usage",
            "UsageRequest",
            "UsageResponse",
            false,
        ))
        .method(method("cleanup", "Cleanup", "CleanupRequest", "()", false))
        .build();
    Builder::new()
        .build_client(false)
        .build_server(true)
        .compile(&[service]);
}
