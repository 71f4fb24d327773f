//! The public contract in docs/ARCHITECTURE.md names every stream, bucket and durable
//! consumer `core` defines, and the current contract version.

use sluice_core::subjects;

#[test]
fn architecture_doc_lists_every_stream_bucket_and_consumer() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/ARCHITECTURE.md");
    let doc = std::fs::read_to_string(path).expect("docs/ARCHITECTURE.md");
    let mut names: Vec<String> = subjects::STREAMS
        .iter()
        .chain(subjects::BUCKETS.iter())
        .chain(subjects::OBJECT_STORES.iter())
        .map(|s| format!("`{s}`"))
        .collect();
    names.extend(
        [
            subjects::DISPATCHER_CONSUMER,
            subjects::DISPATCHER_STATUS_CONSUMER,
            subjects::DISPATCHER_CHILDREN_CONSUMER,
            subjects::REPORTER_CONSUMER,
        ]
        .map(|c| format!("`{c}`")),
    );
    names.push(format!("`{}`", subjects::runner_consumer("<cluster>")));
    for subject in [
        subjects::event("<provider>", "<kind>"),
        subjects::runs("<cluster>"),
        subjects::status("<cluster>", "<run_id>"),
        subjects::logs("<cluster>", "<run_id>"),
        subjects::cancel("<cluster>"),
        subjects::child_result("<cluster>", "<run_id>"),
        subjects::child_request("<cluster>", "<run_id>"),
        subjects::DEADLETTER_EVENTS.to_owned(),
        subjects::runner_key("<cluster>", "<runner id>"),
    ] {
        names.push(format!("`{subject}`"));
    }
    names.push(format!("contract version {}", subjects::CONTRACT_VERSION));
    let missing: Vec<&String> = names.iter().filter(|n| !doc.contains(n.as_str())).collect();
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md does not name {missing:?}"
    );
}
