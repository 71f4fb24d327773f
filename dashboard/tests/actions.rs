//! Cancel and rerun from the dashboard, over a real socket, against a real nats-server
//! started from `sluice nats init`'s files, the dashboard and a dispatcher each on its
//! own role's seed: who may act (token, trusted proxy header, nobody else), cross-site
//! posts refused, what each action stores, and a rerun with no dispatcher to answer.

use std::time::Duration;

use sluice_core::roles::Role;
use sluice_core::run::{
    run_id, CancelRequest, RerunAnswer, RerunRequest, RunRequest, RunState, StatusUpdate,
};
use sluice_core::{bus, subjects, Event, Provider};
use sluice_tests::auth::AuthNats;
use sluice_tests::dispatcher::{self, Dispatcher};
use sluice_tests::wait_for;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "0123456789abcdef-actions";

async fn dashboard(server: &AuthNats, actions: Option<sluice_dashboard::Actions>) -> String {
    // The role that goes with the setting: only the acting dashboard's seed may ask.
    let role = if actions.is_some() {
        Role::DashboardActions
    } else {
        Role::Dashboard
    };
    let client = sluice_core::nats::connect(&server.options(&role))
        .await
        .expect("the dashboard's seed connects");
    let started = sluice_dashboard::start(
        client,
        "127.0.0.1:0".parse().expect("addr"),
        actions,
        CancellationToken::new(),
    )
    .await
    .expect("dashboard");
    format!("http://{}", started.addr)
}

/// The state a runner would store for `run`, running on cluster a.
fn running(run: &str, event: &str) -> StatusUpdate {
    StatusUpdate {
        run_id: run.into(),
        pipeline: "ci".into(),
        state: RunState::Running,
        step: None,
        at: OffsetDateTime::now_utc(),
        cluster: Some("a".into()),
        event_id: Some(event.into()),
        concurrency_group: None,
        exit_code: None,
        message: None,
        runner: Some("runner-1".into()),
        repo: Some("acme/app".into()),
        sha: None,
        parent: None,
    }
}

#[tokio::test]
async fn cancel_and_rerun_on_the_dashboards_own_seed() {
    let (server, js) = AuthNats::provisioned(&["a"]).await;
    dispatcher::apply(
        &js,
        "name: ci\nruntime: { cluster: a }\ntriggers:\n  - kinds: [push]\nsteps:\n  - name: build\n    image: alpine\n    commands: [make]\n",
    )
    .await;
    let mut config = Dispatcher::config(&server.url());
    config.nats = server.options(&Role::Dispatcher);
    config.default_cluster = "a".into();
    let dispatching = Dispatcher::start_with(config).await;

    let mut event = Event::new(Provider::Manual, "act-1", "push");
    event.repo = Some("acme/app".into());
    event.git_ref = Some("refs/heads/main".into());
    event.sha = Some("0123456789abcdef0123456789abcdef01234567".into());
    dispatcher::publish_event(&js, &event).await;
    // Dispatched: the dispatcher joins the rerun queue group before it consumes.
    wait_for("the event's decision", Duration::from_secs(20), || {
        dispatcher::decision(&js, &event.id)
    })
    .await;
    let first = run_id(&event.id, "ci", 0);
    let status = running(&first, &event.id);
    bus::publish_json(&js, status.subject(), &status.message_id(), &status)
        .await
        .expect("state");

    let actions =
        sluice_dashboard::Actions::new(Some(format!("{TOKEN}\n")), Some("X-Forwarded-User"))
            .expect("actions");
    let base = dashboard(&server, Some(actions)).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let post = |path: String| http.post(format!("{base}{path}"));
    let cancel = format!("/runs/{first}/cancel");

    // The run page offers both; with a proxy to name the user, its forms do not ask
    // for the token.
    let page = wait_for("the run page", Duration::from_secs(10), || async {
        let res = http.get(format!("{base}/runs/{first}")).send().await.ok()?;
        let body = res.text().await.ok()?;
        body.contains("Cancel run").then_some(body)
    })
    .await;
    assert!(
        page.contains(&format!("action=\"/runs/{first}/rerun\"")),
        "{page}"
    );
    assert!(!page.contains("name=\"token\""), "{page}");

    // Nobody, a wrong token, a token of the wrong scheme: 401, and nothing stored.
    for req in [
        post(cancel.clone()),
        post(cancel.clone()).bearer_auth("wrong"),
        post(cancel.clone()).basic_auth("x", Some(TOKEN)),
        post(cancel.clone())
            .header("content-type", "application/x-www-form-urlencoded")
            .body("token=nope"),
    ] {
        let res = req.send().await.expect("POST");
        assert_eq!(res.status(), 401);
    }
    // The right token from another site: 403 before anything else.
    let res = post(cancel.clone())
        .bearer_auth(TOKEN)
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .expect("POST");
    assert_eq!(res.status(), 403);
    let control = || dispatcher::all_messages(&js, subjects::CONTROL_STREAM);
    assert!(
        control().await.is_empty(),
        "refused requests stored nothing"
    );

    // A user the proxy names cancels: the request goes to the run's cluster, says who.
    let res = post(cancel.clone())
        .header("x-forwarded-user", "ada")
        .header("origin", base.clone())
        .send()
        .await
        .expect("POST");
    assert_eq!(res.status(), 303);
    assert_eq!(res.headers()["location"], format!("/runs/{first}"));
    let stored = control().await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].0, subjects::cancel("a"));
    let request: CancelRequest = serde_json::from_slice(&stored[0].1).expect("cancel");
    assert_eq!(request.run_id, first);
    assert!(request.reason.contains("ada"), "{}", request.reason);

    // The token (from the form, as the page would send it) reruns: a dispatcher stores
    // the rerun's event and plans its run.
    let res = post(format!("/runs/{first}/rerun"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={TOKEN}"))
        .send()
        .await
        .expect("POST");
    assert_eq!(res.status(), 303);
    let location = res.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let second = location
        .strip_prefix("/runs/")
        .expect("a run page")
        .to_owned();
    assert_ne!(second, first);
    wait_for(
        "the rerun's run request",
        Duration::from_secs(20),
        || async {
            dispatcher::run_requests(&js)
                .await
                .iter()
                .any(|(_, r)| r.run_id == second && r.pipeline == "ci")
                .then_some(())
        },
    )
    .await;

    // The dashboard's credential cannot aim the dispatcher's answer anywhere but an
    // inbox (its credential may publish almost anywhere): these go unanswered and
    // undone, and a request after them is answered (one dispatcher, in order).
    let asker = sluice_core::nats::connect(&server.options(&Role::DashboardActions))
        .await
        .expect("the dashboard's seed connects");
    let forged = RerunRequest {
        run_id: first.clone(),
        by: "token".into(),
    };
    let body = serde_json::to_vec(&forged).expect("json");
    for reply in [
        format!("$KV.{}.evil", subjects::PIPELINES_BUCKET),
        subjects::runs("a"),
    ] {
        asker
            .publish_with_reply(subjects::RERUN, reply, body.clone().into())
            .await
            .expect("publish");
    }
    asker.flush().await.expect("flush");
    let third = bus::request_rerun(&asker, &forged, Duration::from_secs(10))
        .await
        .expect("an answer");
    assert!(matches!(third, RerunAnswer::Started { .. }), "{third:?}");
    let pipelines = js
        .get_key_value(subjects::PIPELINES_BUCKET)
        .await
        .expect("bucket");
    assert!(pipelines.get("evil").await.expect("get").is_none());
    let requests = dispatcher::all_messages(&js, subjects::RUNS_STREAM).await;
    for (subject, body) in &requests {
        serde_json::from_slice::<RunRequest>(body)
            .unwrap_or_else(|e| panic!("{subject}: not a run request: {e}"));
    }
    // The first run, the form's rerun and this one: the forged two started nothing.
    wait_for("the third run request", Duration::from_secs(20), || async {
        (dispatcher::all_messages(&js, subjects::RUNS_STREAM)
            .await
            .len()
            == 3)
            .then_some(())
    })
    .await;
    // A run that does not exist is refused.
    let none = RerunRequest {
        run_id: "nosuchrun".into(),
        by: "token".into(),
    };
    let refused = bus::request_rerun(&asker, &none, Duration::from_secs(10))
        .await
        .expect("an answer");
    assert!(
        matches!(refused, RerunAnswer::Refused { .. }),
        "{refused:?}"
    );

    // With no dispatcher to ask, the rerun says so.
    dispatching.stop().await;
    let res = post(format!("/runs/{first}/rerun"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("POST");
    assert_eq!(res.status(), 503);
    assert!(res
        .text()
        .await
        .expect("body")
        .contains("no dispatcher answered"));

    let log = server.log();
    assert!(
        !log.contains("Permissions Violation"),
        "every action within the roles' permissions:\n{log}"
    );
}

#[tokio::test]
async fn without_allow_actions_there_is_nothing_to_post() {
    let (server, js) = AuthNats::provisioned(&["a"]).await;
    let status = running("run-1", "manual:x");
    bus::publish_json(&js, status.subject(), &status.message_id(), &status)
        .await
        .expect("state");
    let base = dashboard(&server, None).await;
    let http = reqwest::Client::new();
    let page = wait_for("the run page", Duration::from_secs(10), || async {
        let res = http.get(format!("{base}/runs/run-1")).send().await.ok()?;
        res.status().is_success().then_some(res.text().await.ok()?)
    })
    .await;
    assert!(
        !page.contains("Cancel run") && !page.contains("Rerun"),
        "{page}"
    );
    let res = http
        .post(format!("{base}/runs/run-1/cancel"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("POST");
    assert!(res.status().is_client_error(), "{}", res.status());
    assert!(dispatcher::all_messages(&js, subjects::CONTROL_STREAM)
        .await
        .is_empty());
}
