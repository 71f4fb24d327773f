//! Every fixture payload, signed and posted through the real router to a real
//! nats-server, checked field by field in the stream.

use serde_json::Value;
use sluice_core::Event;
use sluice_tests::ingest::{jetstream, stored_events, Ingest};
use sluice_tests::nats::NatsServer;
use sluice_tests::{fixture, init_logs};

/// What a fixture must normalize to. `None` fields must be `null` in the envelope.
struct Expect {
    file: &'static str,
    header: &'static str,
    subject: &'static str,
    action: Option<&'static str>,
    repo: &'static str,
    git_ref: Option<&'static str>,
    sha: Option<&'static str>,
    base_ref: Option<&'static str>,
    pr: Option<u64>,
    actor: Option<&'static str>,
    changed_files: Option<&'static [&'static str]>,
    complete: bool,
}

const PR_SHA: &str = "ec26c3e57ca3a959ca5aad62de7213c562f8c821";

fn pr(file: &'static str, action: &'static str) -> Expect {
    Expect {
        file,
        header: "pull_request",
        subject: "sluice.events.github.pull_request",
        action: Some(action),
        repo: "Codertocat/Hello-World",
        git_ref: Some("refs/pull/2/head"),
        sha: Some(PR_SHA),
        base_ref: Some("refs/heads/master"),
        pr: Some(2),
        actor: Some("Codertocat"),
        changed_files: None,
        complete: false,
    }
}

fn github_cases() -> Vec<Expect> {
    let plain = |file, header, subject, action, git_ref| Expect {
        file,
        header,
        subject,
        action,
        repo: "Codertocat/Hello-World",
        git_ref,
        sha: None,
        base_ref: None,
        pr: None,
        actor: Some("Codertocat"),
        changed_files: None,
        complete: false,
    };
    vec![
        pr("github/pull_request.opened.json", "opened"),
        pr("github/pull_request.closed.json", "closed"),
        pr("github/pull_request.reopened.json", "reopened"),
        pr("github/pull_request.synchronize.json", "synchronize"),
        pr("github/pull_request.labeled.json", "labeled"),
        pr(
            "github/pull_request.converted_to_draft.json",
            "converted_to_draft",
        ),
        // A tag deletion: a `tag`, deleted, nothing to build.
        Expect {
            changed_files: Some(&[]),
            complete: true,
            ..plain(
                "github/push.json",
                "push",
                "sluice.events.github.tag",
                Some("deleted"),
                Some("refs/tags/simple-tag"),
            )
        },
        Expect {
            changed_files: Some(&[]),
            complete: true,
            ..plain(
                "github/push.with-organization.json",
                "push",
                "sluice.events.github.tag",
                Some("deleted"),
                Some("refs/tags/simple-tag"),
            )
        },
        // A new branch: its commit list is not a diff against anything.
        Expect {
            sha: Some("6113728f27ae82c7b1a177c8d03f9e96e0adf246"),
            changed_files: Some(&["README.md"]),
            complete: false,
            ..plain(
                "github/push.with-new-branch.json",
                "push",
                "sluice.events.github.push",
                Some("created"),
                Some("refs/heads/master"),
            )
        },
        plain(
            "github/create.json",
            "create",
            "sluice.events.github.create",
            None,
            Some("refs/tags/simple-tag"),
        ),
        plain(
            "github/delete.json",
            "delete",
            "sluice.events.github.delete",
            None,
            Some("refs/tags/simple-tag"),
        ),
        // A comment on an issue, not a pull request: a comment without a PR number.
        plain(
            "github/issue_comment.created.json",
            "issue_comment",
            "sluice.events.github.comment",
            Some("created"),
            None,
        ),
        Expect {
            repo: "Octocoders/Hello-World",
            ..plain(
                "github/ping.json",
                "ping",
                "sluice.events.github.ping",
                None,
                None,
            )
        },
    ]
}

fn gitlab_cases() -> Vec<Expect> {
    let base = |file, header, subject| Expect {
        file,
        header,
        subject,
        action: None,
        repo: "gitlabhq/gitlab-test",
        git_ref: None,
        sha: None,
        base_ref: None,
        pr: None,
        actor: Some("root"),
        changed_files: None,
        complete: false,
    };
    vec![
        Expect {
            action: Some("opened"),
            git_ref: Some("refs/merge-requests/1/head"),
            sha: Some("da1560886d4f094c3e6c9ef40349f7d38b5d27d7"),
            base_ref: Some("refs/heads/master"),
            pr: Some(1),
            ..base(
                "gitlab/merge-request-event.json",
                "Merge Request Hook",
                "sluice.events.gitlab.pull_request",
            )
        },
        Expect {
            repo: "gitlab-org/gitlab-test",
            action: Some("created"),
            git_ref: Some("refs/merge-requests/1/head"),
            sha: Some("562e173be03b8ff2efb05345d12df18815438a4b"),
            base_ref: Some("refs/heads/markdown"),
            pr: Some(1),
            ..base(
                "gitlab/comment-merge-request-event.json",
                "Note Hook",
                "sluice.events.gitlab.comment",
            )
        },
        // A note on a commit is not a merge request comment: it keeps its own name.
        Expect {
            action: Some("created"),
            ..base(
                "gitlab/comment-commit-event.json",
                "Note Hook",
                "sluice.events.gitlab.note",
            )
        },
        // Four commits pushed, two listed: the list is known to be incomplete.
        Expect {
            repo: "mike/diaspora",
            git_ref: Some("refs/heads/master"),
            sha: Some("da1560886d4f094c3e6c9ef40349f7d38b5d27d7"),
            actor: None,
            changed_files: Some(&["CHANGELOG", "app/controller/application.rb"]),
            complete: false,
            ..base(
                "gitlab/push-event.json",
                "Push Hook",
                "sluice.events.gitlab.push",
            )
        },
        Expect {
            repo: "jsmith/example",
            git_ref: Some("refs/tags/v1.0.0"),
            sha: Some("82b3d5ae55f7080f1e6022629cdb57bfae7cccc7"),
            actor: None,
            changed_files: Some(&[]),
            complete: true,
            ..base(
                "gitlab/tag-event.json",
                "Tag Push Hook",
                "sluice.events.gitlab.tag",
            )
        },
    ]
}

fn check(subject: &str, e: &Event, want: &Expect, original: &[u8], provider: &str, delivery: &str) {
    let f = want.file;
    assert_eq!(subject, want.subject, "{f}: subject");
    assert_eq!(e.id, format!("{provider}:{delivery}"), "{f}: id");
    assert_eq!(e.provider.as_str(), provider, "{f}: provider");
    assert_eq!(e.action.as_deref(), want.action, "{f}: action");
    assert_eq!(e.repo.as_deref(), Some(want.repo), "{f}: repo");
    assert_eq!(e.git_ref.as_deref(), want.git_ref, "{f}: ref");
    assert_eq!(e.sha.as_deref(), want.sha, "{f}: sha");
    assert_eq!(e.base_ref.as_deref(), want.base_ref, "{f}: base_ref");
    assert_eq!(e.pr, want.pr, "{f}: pr");
    assert_eq!(e.actor.as_deref(), want.actor, "{f}: actor");
    let files: Option<Vec<&str>> = e
        .changed_files
        .as_ref()
        .map(|v| v.iter().map(String::as_str).collect());
    assert_eq!(files.as_deref(), want.changed_files, "{f}: changed_files");
    assert_eq!(
        e.changed_files_complete, want.complete,
        "{f}: changed_files_complete"
    );
    assert!(
        e.clone_url.as_deref().is_some_and(|u| u.ends_with(".git")),
        "{f}: clone_url"
    );
    assert!(e.payload_ref.is_none(), "{f}: small payloads are inline");
    // The original payload is carried unchanged.
    let stored: Value =
        serde_json::from_str(e.payload.as_ref().expect("payload").get()).expect("json");
    let posted: Value = serde_json::from_slice(original).expect("fixture json");
    assert_eq!(stored, posted, "{f}: original payload");
}

#[tokio::test]
async fn every_fixture_is_stored_normalized() {
    init_logs();
    let nats = NatsServer::start().await;
    let ingest = Ingest::start(&nats.url()).await;
    let js = jetstream(&nats.url()).await;

    let mut expected = Vec::new();
    for (i, case) in github_cases().into_iter().enumerate() {
        let body = fixture(case.file);
        let delivery = format!("gh-{i}");
        let r = ingest.post_github(case.header, &delivery, &body).await;
        let want_status = if case.header == "ping" { 200 } else { 202 };
        assert_eq!(r.status().as_u16(), want_status, "{}", case.file);
        let answer: Value = r.json().await.expect("json answer");
        assert_eq!(answer["event_id"], format!("github:{delivery}"));
        assert_eq!(answer["duplicate"], false);
        expected.push(("github", delivery, case, body));
    }
    for (i, case) in gitlab_cases().into_iter().enumerate() {
        let body = fixture(case.file);
        let delivery = format!("gl-{i}");
        let r = ingest.post_gitlab(case.header, &delivery, &body).await;
        assert_eq!(r.status().as_u16(), 202, "{}", case.file);
        expected.push(("gitlab", delivery, case, body));
    }

    let stored = stored_events(&js).await;
    assert_eq!(
        stored.len(),
        expected.len(),
        "one stored event per delivery"
    );
    for ((subject, event), (provider, delivery, case, body)) in stored.iter().zip(&expected) {
        check(subject, event, case, body, provider, delivery);
    }
    // Spot checks of what the table does not cover.
    let opened = &stored[0].1;
    assert_eq!(opened.pr_draft, Some(false));
    assert_eq!(opened.actor_association.as_deref(), Some("OWNER"));
    assert_eq!(
        stored[5].1.pr_draft,
        Some(true),
        "converted_to_draft is a draft"
    );
    let comment = &stored[11].1;
    assert_eq!(
        comment.comment.as_deref(),
        Some("You are totally right! I'll get this fixed right away.")
    );
    assert_eq!(comment.actor_association.as_deref(), Some("OWNER"));
    let gl_note = stored
        .iter()
        .find(|(s, _)| s == "sluice.events.gitlab.comment")
        .expect("note");
    assert_eq!(gl_note.1.comment.as_deref(), Some("This MR needs work."));
}

#[tokio::test]
async fn form_encoded_github_deliveries_are_verified_over_the_raw_body() {
    init_logs();
    let nats = NatsServer::start().await;
    let ingest = Ingest::start(&nats.url()).await;
    let js = jetstream(&nats.url()).await;
    let json = fixture("github/push.with-new-branch.json");
    let form: String = form_urlencoded_body(&json);
    let r = ingest
        .http
        .post(ingest.url("/webhooks/github"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-github-event", "push")
        .header("x-github-delivery", "form-1")
        .header(
            "x-hub-signature-256",
            sluice_tests::sign::github_sha256(sluice_tests::ingest::GITHUB_SECRET, form.as_bytes()),
        )
        .body(form)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status().as_u16(), 202);
    let stored = stored_events(&js).await;
    assert_eq!(stored.len(), 1);
    let stored_payload: Value =
        serde_json::from_str(stored[0].1.payload.as_ref().expect("payload").get()).expect("json");
    assert_eq!(
        stored_payload,
        serde_json::from_slice::<Value>(&json).expect("json")
    );
    assert_eq!(
        stored[0].1.sha.as_deref(),
        Some("6113728f27ae82c7b1a177c8d03f9e96e0adf246")
    );
}

fn form_urlencoded_body(json: &[u8]) -> String {
    let mut out = String::from("payload=");
    for b in json {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                out.push(*b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[tokio::test]
async fn standard_webhooks_are_stored_with_their_data() {
    init_logs();
    let nats = NatsServer::start().await;
    let ingest = Ingest::start(&nats.url()).await;
    let js = jetstream(&nats.url()).await;
    let body = br#"{"type":"push","timestamp":"2026-11-27T10:00:00Z","data":{"repo":"acme/app","ref":"refs/heads/main","sha":"abc123","clone_url":"https://git.example/acme/app.git","changed_files":["src/main.rs"]}}"#;
    let r = ingest.post_generic("msg_1", body).await;
    assert_eq!(r.status().as_u16(), 202);
    let stored = stored_events(&js).await;
    assert_eq!(stored.len(), 1);
    let (subject, e) = &stored[0];
    assert_eq!(subject, "sluice.events.generic.push");
    assert_eq!(e.id, "generic:msg_1");
    assert_eq!(e.repo.as_deref(), Some("acme/app"));
    assert_eq!(e.sha.as_deref(), Some("abc123"));
    assert_eq!(
        e.changed_files.as_deref(),
        Some(&["src/main.rs".to_owned()][..])
    );
    assert!(e.changed_files_complete);
}

#[tokio::test]
async fn default_branches_are_carried() {
    init_logs();
    let nats = NatsServer::start().await;
    let ingest = Ingest::start(&nats.url()).await;
    let js = jetstream(&nats.url()).await;
    let r = ingest
        .post_github("push", "db-1", &fixture("github/push.with-new-branch.json"))
        .await;
    assert_eq!(r.status().as_u16(), 202);
    let r = ingest
        .post_gitlab("Push Hook", "db-2", &fixture("gitlab/push-event.json"))
        .await;
    assert_eq!(r.status().as_u16(), 202);
    let stored = stored_events(&js).await;
    assert_eq!(stored[0].1.default_branch.as_deref(), Some("master"));
    assert_eq!(stored[1].1.default_branch.as_deref(), Some("master"));
}
