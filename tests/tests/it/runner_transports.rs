//! A runner reaching NATS the ways a locked-down cluster allows: `tls://` with a
//! private CA, and `wss://` (through proxies that only allow 443), authenticated with
//! an NKey; and with a `.creds` file (a user JWT) against a server in operator mode.
//! Clients without the credentials are refused.

use std::time::Duration;

use sluice_core::nats::{connect_once, NatsOptions};
use sluice_core::run::RunState;
use sluice_tests::dispatcher::provision;
use sluice_tests::nats::{OperatorNats, SecureNats};
use sluice_tests::runner::{
    final_state, git_repo, log_lines, publish_run, run_request, step, Runner,
};
use sluice_tests::{init_logs, wait_for};

#[tokio::test]
async fn runners_work_over_tls_and_secure_websocket_with_an_nkey() {
    init_logs();
    let nats = SecureNats::start().await;
    let client = connect_once(&nats.options(&nats.tls_url), Duration::from_secs(5))
        .await
        .expect("connect over TLS");
    let js = async_nats::jetstream::new(client);
    provision(&js).await;
    let (repo, sha) = git_repo();

    // Without the NKey the server refuses the connection.
    let anonymous = NatsOptions {
        ca_file: Some(nats.ca_file.clone()),
        ..NatsOptions::new(&nats.tls_url, "anonymous")
    };
    assert!(
        connect_once(&anonymous, Duration::from_secs(2))
            .await
            .is_err(),
        "a client without credentials must be refused"
    );

    for (cluster, url) in [("over-tls", &nats.tls_url), ("over-wss", &nats.wss_url)] {
        let options = nats.options(url);
        let runner = Runner::start_with("unused", cluster, cluster, |c| c.nats = options).await;
        let id = format!("{cluster}-1");
        publish_run(
            &js,
            &run_request(
                &id,
                cluster,
                repo.path(),
                &sha,
                vec![step("s", &["echo via $SLUICE_RUN_ID"])],
            ),
        )
        .await;
        let done = wait_for(&id, Duration::from_secs(30), || final_state(&js, &id)).await;
        assert_eq!(done.state, RunState::Succeeded, "{done:?}");
        assert_eq!(done.runner.as_deref(), Some(cluster));
        assert_eq!(log_lines(&js, &id, "s").await, [format!("via {id}")]);
        runner.stop().await;
    }
}

#[tokio::test]
async fn runners_work_with_a_creds_file_in_operator_mode() {
    init_logs();
    let nats = OperatorNats::start().await;
    let client = connect_once(&nats.options(), Duration::from_secs(5))
        .await
        .expect("connect with the creds file");
    let js = async_nats::jetstream::new(client);
    provision(&js).await;
    let anonymous = NatsOptions::new(nats.server.url(), "anonymous");
    assert!(
        connect_once(&anonymous, Duration::from_secs(2))
            .await
            .is_err(),
        "a client without credentials must be refused"
    );
    let (repo, sha) = git_repo();
    let options = nats.options();
    let runner = Runner::start_with("unused", "jwt", "jwt-runner", |c| c.nats = options).await;
    publish_run(
        &js,
        &run_request(
            "jwt-1",
            "jwt",
            repo.path(),
            &sha,
            vec![step("s", &["echo with creds"])],
        ),
    )
    .await;
    let done = wait_for("jwt-1", Duration::from_secs(30), || {
        final_state(&js, "jwt-1")
    })
    .await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");
    assert_eq!(log_lines(&js, "jwt-1", "s").await, ["with creds"]);
    runner.stop().await;
}
