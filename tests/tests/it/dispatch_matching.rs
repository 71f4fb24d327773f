//! Table tests of trigger matching over every fixture, normalized by the real ingest
//! normalizers, and variations built from them.

use std::sync::Arc;

use sluice_core::pipeline::parse_documents;
use sluice_core::Event;
use sluice_dispatcher::matcher::{evaluate, CelEvent};
use sluice_dispatcher::registry::Index;
use sluice_ingest::normalize;
use sluice_tests::fixture;

fn github(file: &str, event: &str) -> Event {
    let p = serde_json::from_slice(&fixture(file)).expect("fixture json");
    let mut e = normalize::github(event, "d-1", p);
    e.payload = Some(
        serde_json::value::RawValue::from_string(String::from_utf8(fixture(file)).expect("utf8"))
            .expect("raw"),
    );
    e
}

fn gitlab(file: &str, event: &str) -> Event {
    let p = serde_json::from_slice(&fixture(file)).expect("fixture json");
    normalize::gitlab(event, "d-1", p)
}

/// Matches `event` against one pipeline whose only trigger is `trigger` (YAML flow
/// mapping) and returns `Ok(detail)` on a match or `Err((filter, detail))`.
fn check(event: &Event, trigger: &str) -> Result<String, (String, String)> {
    let yaml = format!("name: p\ntriggers:\n  - {trigger}\nsteps:\n  - {{name: s, image: i}}\n");
    let pipelines = parse_documents("t.yaml", &yaml).unwrap_or_else(|e| panic!("{trigger}: {e}"));
    let index = Index::new(pipelines.into_iter().map(Arc::new));
    let cel = CelEvent::new(event);
    let eval = evaluate(&index, event, &cel, None);
    if eval.decisions.is_empty() {
        return Err(("not considered".into(), String::new()));
    }
    let t = &eval.decisions[0].triggers[0];
    match &t.failed {
        None => Ok(t.detail.clone()),
        Some(f) => Err((f.clone(), t.detail.clone())),
    }
}

#[track_caller]
fn matches(event: &Event, trigger: &str) -> String {
    check(event, trigger)
        .unwrap_or_else(|(f, d)| panic!("{trigger}: expected a match, failed on {f}: {d}"))
}

#[track_caller]
fn fails_on(event: &Event, trigger: &str, filter: &str) -> String {
    match check(event, trigger) {
        Ok(d) => panic!("{trigger}: expected to fail on {filter}, matched: {d}"),
        Err((f, d)) => {
            assert_eq!(f, filter, "{trigger}: {d}");
            d
        }
    }
}

#[test]
fn github_pull_requests() {
    for (file, action) in [
        ("github/pull_request.opened.json", "opened"),
        ("github/pull_request.reopened.json", "reopened"),
        ("github/pull_request.synchronize.json", "synchronize"),
        ("github/pull_request.closed.json", "closed"),
        ("github/pull_request.labeled.json", "labeled"),
    ] {
        let e = github(file, "pull_request");
        matches(&e, &format!("{{provider: github, repos: [codertocat/hello-world], kinds: [pull_request], actions: [{action}], branches: [master]}}"));
        matches(&e, "{repos: [\"Codertocat/*\"], kinds: [pull_request]}");
        fails_on(&e, "{provider: gitlab}", "provider");
        // A pipeline whose repository filter excludes the event's repository does not
        // watch it: it is counted as not considered rather than listed.
        fails_on(&e, "{repos: [\"acme/*\"]}", "not considered");
        fails_on(
            &e,
            "{repos: [\"codertocat/*\", \"!codertocat/hello-world\"]}",
            "not considered",
        );
        // Listed (its second trigger watches every repository): the first says why.
        let d = fails_on(&e, "{repos: [\"acme/*\"]}\n  - {kinds: [push]}", "repos");
        assert!(
            d.contains("Codertocat/Hello-World is not in [acme/*]"),
            "{d}"
        );
        fails_on(&e, "{kinds: [push]}", "kinds");
        fails_on(&e, "{actions: [edited]}", "actions");
        fails_on(&e, "{branches: [main, \"release/*\"]}", "branches");
        fails_on(&e, "{branches: [\"!master\"]}", "branches");
        fails_on(&e, "{tags: [\"v*\"]}", "tags");
        matches(&e, "{when: \"event.pr_draft == false && event.pr == 2\"}");
        matches(
            &e,
            "{when: \"event.payload.pull_request.head.ref == 'changes'\"}",
        );
        // PR changed files are not in the payload: the trigger fires and says so.
        let d = matches(&e, "{paths: [\"src/**\"]}");
        assert!(d.contains("changed files unknown"), "{d}");
    }
    let draft = github(
        "github/pull_request.converted_to_draft.json",
        "pull_request",
    );
    let d = fails_on(&draft, "{when: \"event.pr_draft == false\"}", "when");
    assert!(d.contains("is false"), "{d}");
}

#[test]
fn github_pushes_and_tags() {
    let branch = github("github/push.with-new-branch.json", "push");
    matches(&branch, "{kinds: [push], branches: [master]}");
    matches(&branch, "{branches: [\"ma*\"], actions: [created]}");
    fails_on(&branch, "{kinds: [tag]}", "kinds");
    fails_on(&branch, "{tags: [\"*\"]}", "tags");
    // A new branch's list is incomplete: paths are not trusted to skip.
    let d = matches(&branch, "{paths: [\"docs/**\"]}");
    assert!(d.contains("may be incomplete"), "{d}");
    let mut complete = branch.clone();
    complete.changed_files_complete = true;
    matches(&complete, "{paths: [\"*.md\"]}");
    fails_on(&complete, "{paths: [\"src/**\"]}", "paths");
    fails_on(&complete, "{paths: [\"**\", \"!README.md\"]}", "paths");

    for file in ["github/push.json", "github/push.with-organization.json"] {
        let tag = github(file, "push");
        assert_eq!(tag.kind, "tag");
        matches(
            &tag,
            "{kinds: [tag], tags: [\"simple-*\"], actions: [deleted]}",
        );
        fails_on(&tag, "{tags: [\"v*\"]}", "tags");
        fails_on(&tag, "{branches: [master]}", "branches");
    }
    for (file, name) in [
        ("github/create.json", "create"),
        ("github/delete.json", "delete"),
    ] {
        let e = github(file, name);
        matches(&e, &format!("{{kinds: [{name}]}}"));
        fails_on(&e, "{kinds: [push, tag]}", "kinds");
    }
    let ping = github("github/ping.json", "ping");
    matches(&ping, "{kinds: [ping]}");
    // A trigger without `kinds` fires on code changes only, never on a ping.
    fails_on(&ping, "{}", "kinds");
}

#[test]
fn comment_commands_only_for_trusted_authors() {
    let e = github("github/issue_comment.created.json", "issue_comment");
    fails_on(&e, "{command: /retest}", "command");
    let mut retest = e.clone();
    retest.comment = Some("/retest please".into());
    matches(&retest, "{command: /retest}");
    fails_on(&retest, "{command: /deploy}", "command");
    let mut stranger = retest.clone();
    stranger.actor_association = Some("NONE".into());
    let d = fails_on(&stranger, "{command: /retest}", "command_authors");
    assert!(d.contains("NONE"), "{d}");
    matches(&stranger, "{command: /retest, command_authors: [none]}");
    let mut contributor = retest.clone();
    contributor.actor_association = Some("CONTRIBUTOR".into());
    fails_on(&contributor, "{command: /retest}", "command_authors");
}

#[test]
fn gitlab_events() {
    let mr = gitlab("gitlab/merge-request-event.json", "Merge Request Hook");
    matches(&mr, "{provider: gitlab, repos: [gitlabhq/gitlab-test], kinds: [pull_request], actions: [opened, synchronize], branches: [master]}");
    fails_on(&mr, "{provider: github}", "provider");
    let note = gitlab("gitlab/comment-merge-request-event.json", "Note Hook");
    matches(&note, "{kinds: [comment], branches: [markdown]}");
    // GitLab payloads carry no author association: commands fail closed.
    let mut cmd = note.clone();
    cmd.comment = Some("/retest".into());
    fails_on(&cmd, "{command: /retest}", "command_authors");
    let commit_note = gitlab("gitlab/comment-commit-event.json", "Note Hook");
    fails_on(&commit_note, "{kinds: [comment]}", "kinds");
    matches(&commit_note, "{kinds: [note]}");
    let push = gitlab("gitlab/push-event.json", "Push Hook");
    matches(
        &push,
        "{kinds: [push], branches: [master], repos: [mike/diaspora]}",
    );
    let d = matches(&push, "{paths: [\"nothing/**\"]}");
    assert!(
        d.contains("may be incomplete"),
        "four commits pushed, two listed: {d}"
    );
    let tag = gitlab("gitlab/tag-event.json", "Tag Push Hook");
    matches(&tag, "{tags: [\"v1.*\"]}");
    fails_on(&tag, "{tags: [\"v2.*\"]}", "tags");
}

#[test]
fn cel_errors_and_non_booleans_are_reported_not_matched() {
    let e = github("github/pull_request.opened.json", "pull_request");
    let d = fails_on(&e, "{when: \"event.no_such_field == 1\"}", "when");
    assert!(d.contains("evaluation failed"), "{d}");
    let d = fails_on(&e, "{when: \"event.kind\"}", "when");
    assert!(d.contains("not a bool"), "{d}");
    matches(
        &e,
        "{when: \"event.repo.startsWith('Codertocat/') && 'OWNER' == event.actor_association\"}",
    );
}

#[test]
fn the_index_only_considers_pipelines_watching_the_repository() {
    let mut yaml = String::new();
    for i in 0..50 {
        yaml.push_str(&format!("---\nname: p{i}\ntriggers:\n  - repos: [acme/app-{i}]\nsteps:\n  - {{name: s, image: i}}\n"));
    }
    yaml.push_str(
        "---\nname: wide\ntriggers:\n  - repos: [\"acme/*\"]\nsteps:\n  - {name: s, image: i}\n",
    );
    yaml.push_str(
        "---\nname: other-org\ntriggers:\n  - repos: [\"other/*\"]\nsteps:\n  - {name: s, image: i}\n",
    );
    let index = Index::new(
        parse_documents("t.yaml", &yaml)
            .expect("valid")
            .into_iter()
            .map(Arc::new),
    );
    let mut e = github("github/push.with-new-branch.json", "push");
    e.repo = Some("Acme/App-7".into());
    let cel = CelEvent::new(&e);
    let eval = evaluate(&index, &e, &cel, None);
    let considered: Vec<&str> = eval.decisions.iter().map(|d| d.pipeline.as_str()).collect();
    // other-org's glob is evaluated but excludes the repository: counted, not listed.
    assert_eq!(considered, ["wide", "p7"]);
    assert_eq!(eval.not_considered, 50);
    assert_eq!(eval.matched.len(), 2);
}

#[test]
fn manual_events_can_name_a_pipeline() {
    let yaml = "name: nightly\nsteps:\n  - {name: s, image: i}\n";
    let index = Index::new(
        parse_documents("t.yaml", yaml)
            .expect("valid")
            .into_iter()
            .map(Arc::new),
    );
    let mut e = Event::new(sluice_core::Provider::Manual, "m-1", "push");
    e.pipeline = Some("nightly".into());
    let cel = CelEvent::new(&e);
    let eval = evaluate(&index, &e, &cel, None);
    assert_eq!(eval.matched.len(), 1);
    e.pipeline = Some("nope".into());
    let cel = CelEvent::new(&e);
    let eval = evaluate(&index, &e, &cel, None);
    assert!(eval.matched.is_empty());
    assert!(eval.decisions[0]
        .note
        .as_deref()
        .unwrap_or("")
        .contains("does not exist"));
}
