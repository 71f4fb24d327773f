//! An HTTP double of the forge APIs the dispatcher reads a repository's `.sluice/`
//! files through, in their wire format: GitHub's contents API (`GET
//! /repos/:owner/:repo/contents/:path?ref=`, a folder as a list of entries, a file as
//! raw bytes with `Accept: application/vnd.github.raw+json` or as a JSON object with
//! base64 content without), its pull requests (`GET /repos/:owner/:repo/pulls/:n`, for
//! `/ok-to-test`), GitLab's repository API (`GET
//! /api/v4/projects/:id/repository/tree?path=&ref=` and `…/files/:path/raw?ref=`) and
//! its members API (`GET /api/v4/projects/:id/members/all/:user_id`).
//!
//! Each `(repository, ref)` serves the `.sluice/` folder it was given; anything else
//! is a 404 as the forges answer it. Every request is recorded as it arrived (raw path
//! and query, whether it carried the token, its `Accept`), so tests assert exactly
//! what was asked and how often. Faults on demand: the forge down (503) and back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use serde_json::json;
use sha1::{Digest, Sha1};

/// The GitHub token the double accepts (`Authorization: Bearer …`).
pub const GITHUB_TOKEN: &str = "ghp-test-contents-token-91c2";
/// The GitLab token the double accepts (`PRIVATE-TOKEN`).
pub const GITLAB_TOKEN: &str = "glpat-test-contents-token-5d0e";

/// Which API a request was made to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    GitHub,
    GitLab,
}

/// One request, as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub api: Api,
    pub method: String,
    /// Path and query, still percent-encoded.
    pub target: String,
    /// Whether it carried the double's token (GitHub `Authorization`, GitLab
    /// `PRIVATE-TOKEN`).
    pub authorized: bool,
    pub accept: Option<String>,
}

/// What a repository has at a ref.
#[derive(Debug, Clone)]
enum Tree {
    /// `.sluice/` holds these entries: `(name, content)`; a name ending in `/` is a
    /// folder.
    Folder(Vec<(String, Vec<u8>)>),
    /// `.sluice` is a file.
    File(Vec<u8>),
}

#[derive(Debug, Default)]
struct Forge {
    trees: HashMap<(String, String), Tree>,
    /// GitHub pull requests (`GET /repos/:owner/:repo/pulls/:number`) by repository
    /// and number.
    pulls: HashMap<(String, u64), serde_json::Value>,
    /// GitLab project members' access levels by project path and user id.
    members: HashMap<(String, u64), u64>,
    received: Vec<Received>,
    down: bool,
}

/// The running double.
#[derive(Debug, Clone)]
pub struct ForgeFiles {
    pub addr: SocketAddr,
    state: Arc<Mutex<Forge>>,
}

impl ForgeFiles {
    /// Serves on a loopback port until the test's runtime ends.
    pub async fn start() -> ForgeFiles {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let forge = ForgeFiles {
            addr: listener.local_addr().expect("addr"),
            state: Arc::new(Mutex::new(Forge::default())),
        };
        let app = Router::new().fallback(serve).with_state(forge.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        forge
    }

    /// `--github-api-url`.
    pub fn github_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `--gitlab-api-url`.
    pub fn gitlab_url(&self) -> String {
        format!("http://{}/api/v4", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, Forge> {
        self.state.lock().expect("double state")
    }

    /// `repo` (`owner/name`, or a GitLab project path) at `git_ref` has these files in
    /// `.sluice/`: `(name, content)`, a name ending in `/` being a folder.
    pub fn set(&self, repo: &str, git_ref: &str, files: &[(&str, &str)]) {
        let files = files
            .iter()
            .map(|(n, c)| ((*n).to_owned(), c.as_bytes().to_vec()))
            .collect();
        self.set_bytes(repo, git_ref, files);
    }

    /// [`ForgeFiles::set`] with any bytes.
    pub fn set_bytes(&self, repo: &str, git_ref: &str, files: Vec<(String, Vec<u8>)>) {
        self.lock()
            .trees
            .insert((repo.to_owned(), git_ref.to_owned()), Tree::Folder(files));
    }

    /// `.sluice` at `git_ref` is a file, not a folder.
    pub fn set_file(&self, repo: &str, git_ref: &str, content: &str) {
        self.lock().trees.insert(
            (repo.to_owned(), git_ref.to_owned()),
            Tree::File(content.as_bytes().to_vec()),
        );
    }

    /// GitHub's pull request `number` of `repo` has its head at `head_sha` in
    /// `head_repo` (another name: a fork) and is based on `base_sha` of `main`.
    pub fn set_pull(
        &self,
        repo: &str,
        number: u64,
        head_sha: &str,
        head_repo: &str,
        base_sha: &str,
    ) {
        let pull = json!({
            "url": format!("https://api.github.com/repos/{repo}/pulls/{number}"),
            "number": number,
            "state": "open",
            "head": {
                "label": format!("{}:topic", head_repo.split('/').next().unwrap_or_default()),
                "ref": "topic",
                "sha": head_sha,
                "repo": {"full_name": head_repo, "fork": head_repo != repo}
            },
            "base": {
                "label": format!("{}:main", repo.split('/').next().unwrap_or_default()),
                "ref": "main",
                "sha": base_sha,
                "repo": {"full_name": repo, "fork": false}
            }
        });
        self.lock().pulls.insert((repo.to_owned(), number), pull);
    }

    /// GitLab user `user_id` is a member of `project` (its full path) with
    /// `access_level` (30 Developer, 40 Maintainer, 50 Owner); anyone else is a 404.
    pub fn set_member(&self, project: &str, user_id: u64, access_level: u64) {
        self.lock()
            .members
            .insert((project.to_owned(), user_id), access_level);
    }

    /// Every request answers 503 while `down`.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    /// Every request received, in order.
    pub fn received(&self) -> Vec<Received> {
        self.lock().received.clone()
    }

    /// The targets (path and query) of the requests received, in order.
    pub fn targets(&self) -> Vec<String> {
        self.lock()
            .received
            .iter()
            .map(|r| r.target.clone())
            .collect()
    }

    /// Forgets the requests received so far.
    pub fn clear(&self) {
        self.lock().received.clear();
    }
}

// === Serving ===

async fn serve(State(forge): State<ForgeFiles>, request: Request) -> Response {
    let uri = request.uri().clone();
    let target = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let headers = request.headers();
    let api = if uri.path().starts_with("/api/v4/") {
        Api::GitLab
    } else {
        Api::GitHub
    };
    let authorized = match api {
        Api::GitHub => header_is(headers, "authorization", &format!("Bearer {GITHUB_TOKEN}")),
        Api::GitLab => header_is(headers, "private-token", GITLAB_TOKEN),
    };
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let raw = accept.as_deref() == Some("application/vnd.github.raw+json");
    let mut state = forge.lock();
    state.received.push(Received {
        api,
        method: request.method().to_string(),
        target,
        authorized,
        accept,
    });
    if state.down {
        return (StatusCode::SERVICE_UNAVAILABLE, "forge down").into_response();
    }
    if !authorized {
        return (
            StatusCode::UNAUTHORIZED,
            json_body(&json!({"message": "Bad credentials", "status": "401"})),
        )
            .into_response();
    }
    let query = parse_query(uri.query().unwrap_or(""));
    let segments: Vec<String> = uri.path().split('/').skip(1).map(decode).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let answer = match (api, segments.as_slice()) {
        (Api::GitHub, ["repos", owner, name, "contents", path @ ..]) => {
            let repo = format!("{owner}/{name}");
            let git_ref = query.get("ref").cloned().unwrap_or_default();
            github(&state, &forge, &repo, &git_ref, &path.join("/"), raw)
        }
        (Api::GitHub, ["repos", owner, name, "pulls", number]) => number
            .parse::<u64>()
            .ok()
            .and_then(|n| state.pulls.get(&(format!("{owner}/{name}"), n)))
            .map(json_body),
        (Api::GitLab, ["api", "v4", "projects", project, "repository", "tree"]) => {
            let git_ref = query.get("ref").cloned().unwrap_or_default();
            let path = query.get("path").cloned().unwrap_or_default();
            gitlab_tree(&state, project, &git_ref, &path)
        }
        (Api::GitLab, ["api", "v4", "projects", project, "repository", "files", path, "raw"]) => {
            let git_ref = query.get("ref").cloned().unwrap_or_default();
            gitlab_raw(&state, project, &git_ref, path)
        }
        (Api::GitLab, ["api", "v4", "projects", project, "members", "all", user]) => {
            match user.parse::<u64>() {
                Ok(id) => match state.members.get(&((*project).to_owned(), id)) {
                    Some(level) => Some(gitlab_member(id, *level)),
                    None => Some(
                        (
                            StatusCode::NOT_FOUND,
                            json_body(&json!({"message": "404 Not found"})),
                        )
                            .into_response(),
                    ),
                },
                Err(_) => None,
            }
        }
        _ => None,
    };
    answer.unwrap_or_else(|| not_found(api))
}

fn json_body(value: &serde_json::Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        value.to_string(),
    )
        .into_response()
}

fn header_is(headers: &HeaderMap, name: &str, want: &str) -> bool {
    headers
        .get(name)
        .is_some_and(|v| v.as_bytes() == want.as_bytes())
}

fn not_found(api: Api) -> Response {
    let body = match api {
        Api::GitHub => json!({
            "message": "Not Found",
            "documentation_url": "https://docs.github.com/rest/repos/contents#get-repository-content",
            "status": "404"
        }),
        Api::GitLab => json!({"message": "404 Tree Not Found"}),
    };
    (StatusCode::NOT_FOUND, json_body(&body)).into_response()
}

/// Git's blob id of `content`.
fn blob_sha(content: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", content.len()));
    h.update(content);
    hex::encode(h.finalize())
}

fn github(
    state: &Forge,
    forge: &ForgeFiles,
    repo: &str,
    git_ref: &str,
    path: &str,
    raw: bool,
) -> Option<Response> {
    let tree = state.trees.get(&(repo.to_owned(), git_ref.to_owned()))?;
    let base = forge.github_url();
    let entry = |name: &str, content: &[u8]| {
        let (name, kind) = match name.strip_suffix('/') {
            Some(dir) => (dir, "dir"),
            None => (name, "file"),
        };
        let path = format!(".sluice/{name}");
        let sha = blob_sha(content);
        let url = format!("{base}/repos/{repo}/contents/{path}?ref={git_ref}");
        let html = format!("https://github.com/{repo}/blob/{git_ref}/{path}");
        let git = format!("{base}/repos/{repo}/git/blobs/{sha}");
        json!({
            "name": name,
            "path": path,
            "sha": sha,
            "size": if kind == "dir" { 0 } else { content.len() },
            "url": url,
            "html_url": html,
            "git_url": git,
            "download_url": if kind == "dir" { serde_json::Value::Null } else {
                json!(format!("https://raw.githubusercontent.com/{repo}/{git_ref}/{path}"))
            },
            "type": kind,
            "_links": {"self": url, "git": git, "html": html}
        })
    };
    let file = |name: &str, content: &[u8]| {
        if raw {
            return (
                [(header::CONTENT_TYPE, "application/vnd.github.raw+json")],
                Body::from(content.to_vec()),
            )
                .into_response();
        }
        let mut object = entry(name, content);
        object["encoding"] = json!("base64");
        object["content"] = json!(base64::engine::general_purpose::STANDARD.encode(content));
        json_body(&object)
    };
    match tree {
        Tree::File(content) if path == ".sluice" => Some(file(".sluice", content)),
        Tree::File(_) => None,
        Tree::Folder(files) if path == ".sluice" => Some(json_body(&json!(files
            .iter()
            .map(|(n, c)| entry(n, c))
            .collect::<Vec<_>>()))),
        Tree::Folder(files) => {
            let name = path.strip_prefix(".sluice/")?;
            let (name, content) = files.iter().find(|(n, _)| n == name)?;
            Some(file(name, content))
        }
    }
}

fn gitlab_tree(state: &Forge, project: &str, git_ref: &str, path: &str) -> Option<Response> {
    let Tree::Folder(files) = state.trees.get(&(project.to_owned(), git_ref.to_owned()))? else {
        return None;
    };
    if path != ".sluice" {
        return None;
    }
    let entries: Vec<_> = files
        .iter()
        .map(|(name, content)| {
            let (name, kind, mode) = match name.strip_suffix('/') {
                Some(dir) => (dir, "tree", "040000"),
                None => (name.as_str(), "blob", "100644"),
            };
            json!({
                "id": blob_sha(content),
                "name": name,
                "type": kind,
                "path": format!(".sluice/{name}"),
                "mode": mode
            })
        })
        .collect();
    Some(json_body(&json!(entries)))
}

/// A member as GitLab's members API answers (`GET …/members/all/:user_id`).
fn gitlab_member(id: u64, access_level: u64) -> Response {
    json_body(&json!({
        "id": id,
        "username": format!("user{id}"),
        "name": format!("User {id}"),
        "state": "active",
        "avatar_url": "https://www.gravatar.com/avatar/c2525a7f58ae3776070e44c106c48e15?s=80&d=identicon",
        "web_url": format!("http://192.168.1.8:3000/user{id}"),
        "expires_at": null,
        "access_level": access_level,
        "created_at": "2012-10-22T14:13:35Z",
        "membership_state": "active"
    }))
}

fn gitlab_raw(state: &Forge, project: &str, git_ref: &str, path: &str) -> Option<Response> {
    let Tree::Folder(files) = state.trees.get(&(project.to_owned(), git_ref.to_owned()))? else {
        return None;
    };
    let name = path.strip_prefix(".sluice/")?;
    let (_, content) = files.iter().find(|(n, _)| n == name)?;
    Some(
        (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            Body::from(content.clone()),
        )
            .into_response(),
    )
}

// === Percent-encoding ===

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(&v.replace('+', " ")))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
