//! The integration tests, one binary: each module is what was once its own test file, so
//! kube, octocrab and axum are linked once. Tests that install a global tracing
//! subscriber stay separate (`tests/tests/ingest_logs.rs`).

mod admin_endpoints;
mod dispatch_changed_files;
mod dispatch_flow;
mod dispatch_matching;
mod dispatch_recovery;
mod dispatch_shutdown;
mod end_to_end;
mod ingest_connections;
mod ingest_delivery;
mod ingest_fixtures;
mod ingest_lifecycle;
mod ingest_rejects;
mod ingest_schemes;
mod ingest_store_refusals;
mod nats_permissions;
mod recover_deliveries;
mod recover_gitlab;
mod repo_files;
mod repo_pipelines;
mod reporter;
mod runner_kubernetes;
mod runner_local;
mod runner_recovery;
mod runner_secret_masking;
mod runner_transports;
mod signature_vectors;
mod streams_owner;
