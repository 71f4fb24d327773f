//! GitHub credentials for the dispatcher's API calls (changed files, commit statuses):
//! a token, or a GitHub App. With an App, each repository owner's installation is
//! looked up once, and octocrab mints and renews its short-lived installation tokens.

use std::collections::HashMap;

use octocrab::models::InstallationId;
use octocrab::Octocrab;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::Mutex;

/// A GitHub App: its id and private key (PEM).
#[derive(Debug, Clone)]
pub struct GitHubApp {
    pub id: u64,
    pub private_key: SecretString,
}

/// Clients for GitHub, by repository.
pub struct GitHub {
    auth: Auth,
}

enum Auth {
    Token(Octocrab),
    App {
        app: Octocrab,
        /// Installation clients by repository owner.
        installations: Mutex<HashMap<String, Octocrab>>,
    },
}

impl std::fmt::Debug for GitHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.auth {
            Auth::Token(_) => "token",
            Auth::App { .. } => "app",
        };
        f.debug_struct("GitHub").field("auth", &kind).finish()
    }
}

#[derive(Deserialize)]
struct InstallationRef {
    id: u64,
}

impl GitHub {
    /// A client for `api_url` with the App when given (it wins), else the token; `None`
    /// without either.
    pub fn new(
        api_url: &str,
        token: Option<&SecretString>,
        app: Option<&GitHubApp>,
    ) -> Result<Option<GitHub>, String> {
        let builder = || {
            octocrab::OctocrabBuilder::new()
                .base_uri(api_url)
                .map_err(|e| format!("GitHub API URL {api_url}: {e}"))
        };
        let auth = match (app, token) {
            (Some(app), _) => {
                let client = builder()?
                    .app_from_rsa_pem(app.id.into(), app.private_key.expose_secret())
                    .map_err(|_| {
                        "the GitHub App private key is not an RSA key in PEM format".to_owned()
                    })?
                    .build()
                    .map_err(|e| format!("GitHub client: {e}"))?;
                Auth::App {
                    app: client,
                    installations: Mutex::new(HashMap::new()),
                }
            }
            (None, Some(token)) => Auth::Token(
                builder()?
                    .personal_token(token.expose_secret().to_owned())
                    .build()
                    .map_err(|e| format!("GitHub client: {e}"))?,
            ),
            (None, None) => return Ok(None),
        };
        Ok(Some(GitHub { auth }))
    }

    /// The client to call the API about `repo` (`owner/name`) with.
    pub async fn client(&self, repo: &str) -> Result<Octocrab, ClientError> {
        let (app, installations) = match &self.auth {
            Auth::Token(client) => return Ok(client.clone()),
            Auth::App { app, installations } => (app, installations),
        };
        let owner = repo.split('/').next().unwrap_or(repo).to_owned();
        let mut cached = installations.lock().await;
        if let Some(client) = cached.get(&owner) {
            return Ok(client.clone());
        }
        let route = format!("/repos/{repo}/installation");
        let found: InstallationRef = app.get(route, None::<&()>).await.map_err(|e| {
            let why = crate::forge::github_error(&e);
            match &e {
                octocrab::Error::GitHub { source, .. } if source.status_code.as_u16() == 404 => {
                    ClientError::NotInstalled(format!(
                        "the GitHub App is not installed on {repo}: {why}"
                    ))
                }
                _ => ClientError::Unavailable(format!(
                    "cannot find the GitHub App's installation for {repo}: {why}"
                )),
            }
        })?;
        let client = app.installation(InstallationId(found.id)).map_err(|e| {
            ClientError::Unavailable(format!("GitHub App installation {}: {e}", found.id))
        })?;
        cached.insert(owner, client.clone());
        Ok(client)
    }
}

/// Why there is no client for a repository.
#[derive(Debug)]
pub enum ClientError {
    /// The App is not installed there: asking again will not help.
    NotInstalled(String),
    /// GitHub could not be asked now.
    Unavailable(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NotInstalled(m) | ClientError::Unavailable(m) => f.write_str(m),
        }
    }
}
