//! Webhook secrets: per repository, per organisation or group, and a default.
//!
//! The most specific entry wins, as in Prow: a repository listed on its own uses only
//! its own secrets. Every entry is a list, so a secret can be rotated by adding the new
//! one, changing it at the forge, then removing the old one.

use std::collections::HashMap;
use std::path::Path;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::{Error, Result};

/// The secrets of one provider.
#[derive(Debug, Default, Clone)]
pub struct SecretSet {
    default: Vec<SecretString>,
    /// Keyed by lower-case organisation or (GitLab) group path.
    groups: HashMap<String, Vec<SecretString>>,
    /// Keyed by lower-case `owner/name` or full project path.
    repos: HashMap<String, Vec<SecretString>>,
}

impl SecretSet {
    /// Default secrets from a comma-separated list (the form the env variables take).
    pub fn from_list(list: &str) -> Self {
        SecretSet {
            default: split_list(list),
            ..Default::default()
        }
    }

    /// True when some secret is configured for a repository or group: only then does
    /// the payload's target select the secrets, and need reading before verification.
    pub fn selects_by_target(&self) -> bool {
        !self.groups.is_empty() || !self.repos.is_empty()
    }

    /// True when no secret at all is configured: the endpoint then refuses everything.
    pub fn is_empty(&self) -> bool {
        self.default.is_empty() && self.groups.is_empty() && self.repos.is_empty()
    }

    /// The secrets that may sign a delivery for `repo`: the repository's own, else its
    /// closest group's (GitLab groups nest: `a/b/c/project` tries `a/b/c`, `a/b`, `a`),
    /// else the default.
    pub fn for_repo(&self, repo: Option<&str>) -> &[SecretString] {
        if let Some(repo) = repo {
            let repo = repo.to_ascii_lowercase();
            if let Some(s) = self.repos.get(&repo) {
                return s;
            }
            // An organisation-level hook names only the organisation.
            if let Some(s) = self.groups.get(&repo) {
                return s;
            }
            let mut prefix = repo.as_str();
            while let Some(cut) = prefix.rfind('/') {
                prefix = &prefix[..cut];
                if let Some(s) = self.groups.get(prefix) {
                    return s;
                }
            }
        }
        &self.default
    }

    fn merge(&mut self, file: FileSet) {
        self.default
            .extend(file.default.into_iter().map(SecretString::from));
        for (k, v) in file.groups {
            self.groups
                .entry(k.to_ascii_lowercase())
                .or_default()
                .extend(v.into_iter().map(SecretString::from));
        }
        for (k, v) in file.repos {
            self.repos
                .entry(k.to_ascii_lowercase())
                .or_default()
                .extend(v.into_iter().map(SecretString::from));
        }
    }
}

/// All webhook secrets ingest knows.
#[derive(Debug, Default, Clone)]
pub struct Secrets {
    /// GitHub `X-Hub-Signature-256` HMAC secrets.
    pub github: SecretSet,
    /// GitLab `X-Gitlab-Token` values, and signing tokens (those starting `whsec_`).
    pub gitlab: SecretSet,
    /// Standard Webhooks signing secrets (`whsec_…`) for `/webhooks/generic`.
    pub generic: SecretSet,
}

/// Where secrets come from: the three env variables (comma-separated lists) and a file.
#[derive(Debug, Default)]
pub struct SecretSources<'a> {
    pub github: Option<&'a SecretString>,
    pub gitlab: Option<&'a SecretString>,
    pub generic: Option<&'a SecretString>,
    pub file: Option<&'a Path>,
}

impl Secrets {
    /// Loads secrets from env values and an optional YAML file:
    ///
    /// ```yaml
    /// github:
    ///   default: ["…"]
    ///   orgs:  { acme: ["…"] }
    ///   repos: { acme/app: ["new", "old"] }
    /// gitlab:
    ///   groups: { platform/infra: ["…"] }
    /// generic:
    ///   default: ["whsec_…"]
    /// ```
    pub fn load(sources: SecretSources<'_>) -> Result<Self> {
        let from = |s: Option<&SecretString>| {
            s.map(|s| SecretSet::from_list(s.expose_secret()))
                .unwrap_or_default()
        };
        let mut secrets = Secrets {
            github: from(sources.github),
            gitlab: from(sources.gitlab),
            generic: from(sources.generic),
        };
        if let Some(path) = sources.file {
            let text = std::fs::read_to_string(path).map_err(|source| Error::SecretsFile {
                path: path.to_owned(),
                source,
            })?;
            let invalid = |reason: String| Error::SecretsFormat {
                path: path.to_owned(),
                reason,
            };
            sluice_core::yaml::check_size(&text).map_err(invalid)?;
            // The parser's message can quote the offending line, which may be a
            // secret: report only where it is.
            let file: SecretsFile =
                serde_saphyr::from_str_with_options(&text, sluice_core::yaml::options())
                    .map_err(|e| {
                        let at = e
                            .location()
                            .map(|l| format!("line {} column {}", l.line(), l.column()))
                            .unwrap_or_else(|| "unknown position".into());
                        invalid(format!(
                            "expected `github`/`gitlab`/`generic` maps of `default`, `orgs` (or `groups`) and `repos` lists, error at {at}"
                        ))
                    })?;
            secrets.github.merge(file.github);
            secrets.gitlab.merge(file.gitlab);
            secrets.generic.merge(file.generic);
        }
        Ok(secrets)
    }
}

fn split_list(list: &str) -> Vec<SecretString> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| SecretString::from(s.to_owned()))
        .collect()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SecretsFile {
    #[serde(default)]
    github: FileSet,
    #[serde(default)]
    gitlab: FileSet,
    #[serde(default)]
    generic: FileSet,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileSet {
    #[serde(default)]
    default: Vec<String>,
    #[serde(default, alias = "orgs")]
    groups: HashMap<String, Vec<String>>,
    #[serde(default)]
    repos: HashMap<String, Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposed(s: &[SecretString]) -> Vec<&str> {
        s.iter().map(|s| s.expose_secret()).collect()
    }

    #[test]
    fn most_specific_secret_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secrets.yaml");
        std::fs::write(
            &path,
            "github:\n  orgs: { Acme: [org] }\n  repos: { acme/App: [repo-new, repo-old] }\ngitlab:\n  groups: { a/b: [ab], a: [a] }\n",
        )
        .expect("write");
        let env = SecretString::from("d1, d2".to_owned());
        let secrets = Secrets::load(SecretSources {
            github: Some(&env),
            file: Some(&path),
            ..Default::default()
        })
        .expect("load");
        assert_eq!(
            exposed(secrets.github.for_repo(Some("ACME/app"))),
            ["repo-new", "repo-old"]
        );
        assert_eq!(
            exposed(secrets.github.for_repo(Some("acme/other"))),
            ["org"]
        );
        assert_eq!(
            exposed(secrets.github.for_repo(Some("else/x"))),
            ["d1", "d2"]
        );
        assert_eq!(exposed(secrets.github.for_repo(None)), ["d1", "d2"]);
        assert_eq!(exposed(secrets.gitlab.for_repo(Some("a/b/c/proj"))), ["ab"]);
        assert_eq!(exposed(secrets.gitlab.for_repo(Some("a/z/proj"))), ["a"]);
        assert!(secrets.gitlab.for_repo(Some("q/proj")).is_empty());
        assert!(secrets.generic.is_empty());
    }

    #[test]
    fn a_hostile_file_is_refused_quickly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secrets.yaml");
        let mut text = String::from("github:\n  default:\n    - &l0 lol\n");
        for level in 1..10 {
            let refs = vec![format!("*l{}", level - 1); 10].join(", ");
            text.push_str(&format!("    - &l{level} [{refs}]\n"));
        }
        std::fs::write(&path, text).expect("write");
        let started = std::time::Instant::now();
        let err = Secrets::load(SecretSources {
            file: Some(&path),
            ..Default::default()
        })
        .expect_err("must fail")
        .to_string();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(err.contains("error at line"), "{err}");
    }

    #[test]
    fn a_bad_file_error_names_the_place_but_never_the_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secrets.yaml");
        std::fs::write(&path, "github:\n  repos: [super-secret-value]\n").expect("write");
        let err = Secrets::load(SecretSources {
            file: Some(&path),
            ..Default::default()
        })
        .expect_err("must fail")
        .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(!err.contains("super-secret-value"), "{err}");
    }
}
