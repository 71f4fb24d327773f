//! The values of the Secrets a run's Pods mount, read before any of its output is
//! followed so that they are masked in it (see [`crate::mask`]).
//!
//! A Secret that cannot be read fails the run before its Pod is made: a step whose
//! output cannot be masked does not run. The error names the Secret and, when the API
//! refused, the rule the runner's Role needs; it never holds a value (none was read).

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use sluice_core::run::RunRequest;

use super::decide;
use crate::executor::Outcome;
use crate::mask::Masker;

/// The Secrets whose values can reach the run's output: every step's, and the clone's
/// credentials when the run clones. Sorted, each once.
pub(super) fn names(req: &RunRequest, clone_secret: Option<&str>) -> Vec<String> {
    let mut names: Vec<String> = req
        .steps
        .iter()
        .flat_map(|s| s.secrets.iter().cloned())
        .collect();
    if let (Some(_), Some(secret)) = (&req.clone_url, clone_secret) {
        names.push(secret.to_owned());
    }
    names.sort();
    names.dedup();
    names
}

/// A masker for every value of the Secrets `names` in `namespace`; the run's failure
/// when one cannot be read.
pub(super) async fn masker(
    api: &Api<Secret>,
    namespace: &str,
    names: &[String],
) -> Result<Masker, Outcome> {
    let mut values = Vec::new();
    for name in names {
        match Box::pin(api.get(name)).await {
            Ok(secret) => values.extend(secret.data.into_iter().flatten().map(|(_, v)| v.0)),
            Err(e) => {
                let answer = match &e {
                    kube::Error::Api(s) => Answer::Refused {
                        code: s.code,
                        message: &s.message,
                    },
                    _ => Answer::Unreachable(&e),
                };
                return Err(decide::error(unreadable(name, namespace, answer)));
            }
        }
    }
    Masker::new(values).map_err(|e| decide::error(e.to_string()))
}

/// What the API said to a Secret read.
pub(super) enum Answer<'a> {
    /// An API error: its status code and message.
    Refused { code: u16, message: &'a str },
    /// No answer: a connection or decoding error.
    Unreachable(&'a dyn std::fmt::Display),
}

/// Why the run fails when Secret `name` cannot be read.
pub(super) fn unreadable(name: &str, namespace: &str, answer: Answer<'_>) -> String {
    let why = "its values must be read to mask them in the logs";
    match answer {
        Answer::Refused { code: 404, .. } => format!(
            "Secret {name:?} not found in namespace {namespace:?}: a step names it \
             ({why}, and the step needs it)"
        ),
        Answer::Refused { code: 403, message } => format!(
            "cannot read Secret {name:?} in namespace {namespace:?}: {why}, and the \
             runner's Role needs the rule apiGroups [\"\"], resources [\"secrets\"], verbs \
             [\"get\"] there (sluice install renders it): {message}"
        ),
        Answer::Refused { code, message } => format!(
            "cannot read Secret {name:?} in namespace {namespace:?} ({why}): {code} {message}"
        ),
        Answer::Unreachable(e) => {
            format!("cannot read Secret {name:?} in namespace {namespace:?} ({why}): {e}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::run::RunStep;

    fn step(name: &str, secrets: &[&str]) -> RunStep {
        // From JSON, as a run request arrives: fields added later keep their defaults.
        serde_json::from_value(serde_json::json!({ "name": name, "secrets": secrets }))
            .expect("a step")
    }

    fn request(clone_url: Option<&str>, steps: Vec<RunStep>) -> RunRequest {
        let mut req: RunRequest = serde_json::from_value(serde_json::json!({
            "run_id": "r1", "event_id": "e1", "pipeline": "p", "cluster": "eu-1",
            "steps": [], "attempt": 1, "created_at": "2026-01-01T00:00:00Z",
        }))
        .expect("a minimal run request");
        req.clone_url = clone_url.map(str::to_owned);
        req.steps = steps;
        req
    }

    #[test]
    fn every_steps_secrets_once_and_the_clone_credentials_when_cloning() {
        let steps = vec![
            step("a", &["npm-token", "db"]),
            step("b", &[]),
            step("c", &["db"]),
        ];
        let req = request(Some("https://git.example/app.git"), steps.clone());
        assert_eq!(
            names(&req, Some("git-creds")),
            ["db", "git-creds", "npm-token"]
        );
        assert_eq!(names(&req, None), ["db", "npm-token"]);
        // No clone, no credentials read.
        let req = request(None, steps);
        assert_eq!(names(&req, Some("git-creds")), ["db", "npm-token"]);
        assert!(names(&request(None, vec![step("a", &[])]), None).is_empty());
    }

    #[test]
    fn a_refusal_names_the_secret_and_the_rule_needed() {
        let forbidden = unreadable(
            "npm-token",
            "ci",
            Answer::Refused {
                code: 403,
                message: "secrets \"npm-token\" is forbidden",
            },
        );
        assert!(forbidden.contains("Secret \"npm-token\""), "{forbidden}");
        assert!(forbidden.contains("namespace \"ci\""), "{forbidden}");
        assert!(
            forbidden.contains("resources [\"secrets\"], verbs [\"get\"]"),
            "{forbidden}"
        );
        let missing = unreadable(
            "npm-token",
            "ci",
            Answer::Refused {
                code: 404,
                message: "not found",
            },
        );
        assert!(
            missing.starts_with("Secret \"npm-token\" not found in namespace \"ci\""),
            "{missing}"
        );
        let other = unreadable("npm-token", "ci", Answer::Unreachable(&"connection reset"));
        assert!(other.ends_with(": connection reset"), "{other}");
    }
}
