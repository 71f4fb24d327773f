//! GitHub credentials for the dispatcher's API calls (changed files, commit statuses):
//! a token, or a GitHub App. With an App, each repository owner's installation is
//! looked up once, and octocrab mints and renews its short-lived installation tokens.

use std::collections::HashMap;

use octocrab::models::InstallationId;
use octocrab::Octocrab;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::{Error, Result};

/// Why there is no GitHub look-up or status: neither a token nor an App.
pub(crate) const NO_CREDENTIALS: Error = Error::NoCredentials {
    forge: "GitHub",
    hint: "SLUICE_GITHUB_TOKEN or a GitHub App",
};

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
    ) -> Result<Option<GitHub>> {
        let builder = || {
            octocrab::OctocrabBuilder::new()
                .base_uri(api_url)
                .map_err(|source| Error::GitHubUrl {
                    url: api_url.to_owned(),
                    source,
                })
        };
        let auth = match (app, token) {
            (Some(app), _) => {
                let client = builder()?
                    .app_from_rsa_pem(app.id.into(), app.private_key.expose_secret())
                    .map_err(Error::GitHubAppKey)?
                    .build()
                    .map_err(Error::GitHubClient)?;
                Auth::App {
                    app: client,
                    installations: Mutex::new(HashMap::new()),
                }
            }
            (None, Some(token)) => Auth::Token(
                builder()?
                    .personal_token(token.expose_secret().to_owned())
                    .build()
                    .map_err(Error::GitHubClient)?,
            ),
            (None, None) => return Ok(None),
        };
        Ok(Some(GitHub { auth }))
    }

    /// The client to call the API about `repo` (`owner/name`) with: with an App,
    /// [`Error::NotInstalled`] when it is not installed there (asking again will not
    /// help), [`Error::Installation`] when GitHub could not be asked now.
    pub async fn client(&self, repo: &str) -> Result<Octocrab> {
        let (app, installations) = match &self.auth {
            Auth::Token(client) => return Ok(client.clone()),
            Auth::App { app, installations } => (app, installations),
        };
        let owner = repo.split('/').next().unwrap_or(repo);
        let route = format!("/repos/{repo}/installation");
        installation(app, installations, owner, repo, &route).await
    }

    /// The client to call the API about organisation `org` with (its hooks): with an
    /// App, the organisation's installation.
    pub async fn org_client(&self, org: &str) -> Result<Octocrab> {
        match &self.auth {
            Auth::Token(client) => Ok(client.clone()),
            Auth::App { app, installations } => {
                let route = format!("/orgs/{org}/installation");
                installation(app, installations, org, org, &route).await
            }
        }
    }

    /// The client authenticated as the App itself (its JWT): the only one that may
    /// read the App's own hook (`/app/hook/…`). `None` with a token.
    pub fn app_client(&self) -> Option<Octocrab> {
        match &self.auth {
            Auth::Token(_) => None,
            Auth::App { app, .. } => Some(app.clone()),
        }
    }
}

/// The installation client of `owner`, looked up at `route` once and cached.
async fn installation(
    app: &Octocrab,
    installations: &Mutex<HashMap<String, Octocrab>>,
    owner: &str,
    repo: &str,
    route: &str,
) -> Result<Octocrab> {
    let mut cached = installations.lock().await;
    if let Some(client) = cached.get(owner) {
        return Ok(client.clone());
    }
    let found: InstallationRef = app.get(route, None::<&()>).await.map_err(|source| {
        let repo = repo.to_owned();
        match &source {
            octocrab::Error::GitHub { source: answer, .. }
                if answer.status_code == http::StatusCode::NOT_FOUND =>
            {
                Error::NotInstalled { repo, source }
            }
            _ => Error::Installation { repo, source },
        }
    })?;
    let client = app
        .installation(InstallationId(found.id))
        .map_err(|source| Error::InstallationClient {
            id: found.id,
            source,
        })?;
    cached.insert(owner.to_owned(), client.clone());
    Ok(client)
}
