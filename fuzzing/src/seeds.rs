//! Seed inputs for each target, built from the real webhook fixtures
//! (`../shared/fixtures/`, read where they are, never copied) and the tests' own
//! payloads, in each target's input layout and signed with the targets' secrets.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A whole envelope, as ingest stores it: the CEL target's event when its input has none.
pub const EVENT_JSON: &str = r#"{"id":"github:1","provider":"github","kind":"pull_request","action":"opened","repo":"acme/app","clone_url":"https://github.com/acme/app.git","default_branch":"main","ref":"refs/heads/feature","sha":"0123456789abcdef0123456789abcdef01234567","base_ref":"refs/heads/main","pr":7,"pr_draft":false,"actor":"octocat","actor_association":"MEMBER","changed_files":["src/main.rs","docs/a.md"],"changed_files_complete":true,"comment":null,"pipeline":null,"payload":{"number":7,"labels":[{"name":"ci"}]}}"#;

/// `../shared/fixtures` beside the workspace, or `SLUICE_FIXTURES`.
pub fn fixtures_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SLUICE_FIXTURES") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
}

fn fixtures(provider: &str) -> Vec<(String, Vec<u8>)> {
    read_fixtures(&fixtures_dir().join(provider)).unwrap_or_else(|e| panic!("{e}"))
}

/// Every `*.json` in `dir`, sorted by name; the error says which variable points elsewhere,
/// since a checkout not beside `shared/` is the usual reason it fails.
fn read_fixtures(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        format!(
            "cannot read the fixtures in {}: {e}; set SLUICE_FIXTURES to the directory \
             holding github/ and gitlab/ (shared/fixtures)",
            dir.display()
        )
    })?;
    let mut out: Vec<(String, Vec<u8>)> = entries
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path
                .file_name()?
                .to_str()?
                .strip_suffix(".json")?
                .to_owned();
            Some((name, std::fs::read(&path).ok()?))
        })
        .collect();
    out.sort();
    Ok(out)
}

fn hmac256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

fn with_headers(headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = headers.join("\n").into_bytes();
    out.extend_from_slice(b"\n\n");
    out.extend_from_slice(body);
    out
}

/// A GitHub event name from a fixture's file name (`pull_request.opened` →
/// `pull_request`).
fn event_name(file: &str) -> &str {
    file.split('.').next().unwrap_or(file)
}

/// The GitLab `X-Gitlab-Event` of each fixture.
fn gitlab_event(file: &str) -> &'static str {
    match file {
        f if f.starts_with("push") => "Push Hook",
        f if f.starts_with("tag") => "Tag Push Hook",
        f if f.starts_with("merge") => "Merge Request Hook",
        _ => "Note Hook",
    }
}

/// The seeds of `target`, named.
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let secret = crate::SECRET.as_bytes();
    match target {
        "verify_github" => fixtures("github")
            .into_iter()
            .map(|(name, body)| {
                let sig = format!("sha256={}", hex::encode(hmac256(secret, &[&body])));
                (name, with_headers(&[&sig, "sha1=00"], &body))
            })
            .collect(),
        "verify_gitlab" => vec![
            ("token".into(), with_headers(&[crate::SECRET], b"")),
            ("wrong".into(), with_headers(&["not-it"], b"")),
        ],
        "verify_standard" | "normalize_generic" => {
            let key = b64
                .decode(crate::STANDARD_SECRET.trim_start_matches("whsec_"))
                .expect("the secret is base64");
            let bodies: Vec<(String, Vec<u8>)> = vec![
                (
                    "event".into(),
                    br#"{"type":"deploy.requested","repo":"acme/app","ref":"refs/heads/main","sha":"0123456789abcdef0123456789abcdef01234567"}"#.to_vec(),
                ),
                ("vector".into(), br#"{"test": 2432232314}"#.to_vec()),
            ];
            bodies
                .into_iter()
                .map(|(name, body)| {
                    if target == "normalize_generic" {
                        return (name, body);
                    }
                    let ts = crate::NOW.to_string();
                    let sig = hmac256(&key, &[b"msg_1", b".", ts.as_bytes(), b".", &body]);
                    let sig = format!("v1,{}", b64.encode(sig));
                    (name, with_headers(&["msg_1", &ts, &sig], &body))
                })
                .collect()
        }
        "normalize_github" => fixtures("github")
            .into_iter()
            .map(|(name, body)| {
                let event = event_name(&name).to_owned();
                (name, with_headers(&[&event], &body))
            })
            .collect(),
        "normalize_gitlab" => fixtures("gitlab")
            .into_iter()
            .map(|(name, body)| {
                let event = gitlab_event(&name);
                (name, with_headers(&[event], &body))
            })
            .collect(),
        "pipeline_yaml" => {
            let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
            let mut out = Vec::new();
            collect_yaml(&examples, &mut out);
            out.push((
                "inline".into(),
                b"name: ci\ntriggers:\n  - kinds: [push, pull_request]\n    branches: ['main', 'release/*']\n    paths: ['src/**']\n    when: event.actor != 'bot'\nruntime: { cluster: eu-1 }\nsteps:\n  - { name: build, image: alpine, commands: ['make'] }\n".to_vec(),
            ));
            out
        }
        "cel" => [
            "event.kind == 'pull_request' && event.action in ['opened', 'synchronize']",
            "event.changed_files.exists(f, f.startsWith('src/'))",
            "event.payload.labels.exists(l, l.name == 'ci')",
            "size(event.repo) > 3 && event.pr > 1",
        ]
        .iter()
        .enumerate()
        .map(|(i, expr)| {
            (
                format!("expr{i}"),
                with_headers(&[expr], EVENT_JSON.as_bytes()),
            )
        })
        .collect(),
        "step_lines" => vec![
            ("plain".into(), b"one\ntwo\r\nthree".to_vec()),
            ("binary".into(), vec![0xff, 0xfe, b'\n', 0xe2, 0x82]),
        ],
        "contract" => {
            let mut out = vec![("event".into(), EVENT_JSON.as_bytes().to_vec())];
            out.push((
                "status".into(),
                br#"{"run_id":"r1","pipeline":"p","state":"running","step":null,"at":"2026-01-01T00:00:00Z","cluster":"eu-1"}"#.to_vec(),
            ));
            out.push(("key".into(), b"eu-1.runner-1".to_vec()));
            out
        }
        "ingest_router" => router_seeds(),
        other => panic!("no target {other}"),
    }
}

/// An HTTP/1.1 request as a client writes it on the connection.
fn request(path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("POST {path} HTTP/1.1\r\nhost: ingest\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Signed requests to each endpoint from the fixtures, a pair on one kept-alive
/// connection, a chunked body and a few a client gets wrong.
fn router_seeds() -> Vec<(String, Vec<u8>)> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let secret = crate::SECRET.as_bytes();
    let json = ("content-type", "application/json");
    let mut out: Vec<(String, Vec<u8>)> = fixtures("github")
        .into_iter()
        .map(|(name, body)| {
            let sig = format!("sha256={}", hex::encode(hmac256(secret, &[&body])));
            let headers = [
                json,
                ("x-github-event", event_name(&name)),
                ("x-github-delivery", "d-1"),
                ("x-hub-signature-256", sig.as_str()),
            ];
            (
                format!("github-{name}"),
                request("/webhooks/github", &headers, &body),
            )
        })
        .collect();
    out.extend(fixtures("gitlab").into_iter().map(|(name, body)| {
        let headers = [
            json,
            ("x-gitlab-event", gitlab_event(&name)),
            ("x-gitlab-event-uuid", "u-1"),
            ("x-gitlab-token", crate::SECRET),
        ];
        (
            format!("gitlab-{name}"),
            request("/webhooks/gitlab", &headers, &body),
        )
    }));
    let key = b64
        .decode(crate::STANDARD_SECRET.trim_start_matches("whsec_"))
        .expect("the secret is base64");
    let body = br#"{"type":"deploy.requested","repo":"acme/app","ref":"refs/heads/main"}"#;
    let ts = crate::NOW.to_string();
    let sig = format!(
        "v1,{}",
        b64.encode(hmac256(&key, &[b"msg_1", b".", ts.as_bytes(), b".", body]))
    );
    let generic = request(
        "/webhooks/generic",
        &[
            json,
            ("webhook-id", "msg_1"),
            ("webhook-timestamp", ts.as_str()),
            ("webhook-signature", sig.as_str()),
        ],
        body,
    );
    let mut pair = generic.clone();
    pair.extend_from_slice(&request("/webhooks/github", &[json], b"{}"));
    out.push(("generic".into(), generic));
    out.push(("kept-alive-pair".into(), pair));
    out.push((
        "chunked".into(),
        b"POST /webhooks/github HTTP/1.1\r\nhost: ingest\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nx-github-event: ping\r\nx-github-delivery: d-2\r\n\r\n2\r\n{}\r\n0\r\n\r\n".to_vec(),
    ));
    out.push((
        "form".into(),
        request(
            "/webhooks/github",
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("x-github-event", "ping"),
            ],
            b"payload=%7B%7D",
        ),
    ));
    out.push((
        "get".into(),
        b"GET /webhooks/gitlab HTTP/1.1\r\nhost: ingest\r\n\r\n".to_vec(),
    ));
    out.push((
        "short-body".into(),
        b"POST /webhooks/generic HTTP/1.1\r\ncontent-length: 100\r\n\r\n{".to_vec(),
    ));
    out
}

fn collect_yaml(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            collect_yaml(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            if let Ok(body) = std::fs::read(&path) {
                let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("yaml");
                out.push((name.to_owned(), body));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_fixtures_directory_names_the_variable_that_fixes_it() {
        let dir = std::env::temp_dir().join("sluice-no-such-fixtures-dir");
        let err = read_fixtures(&dir).expect_err("the directory does not exist");
        assert!(err.contains("SLUICE_FIXTURES"), "{err}");
        assert!(err.contains("sluice-no-such-fixtures-dir"), "{err}");
    }
}
