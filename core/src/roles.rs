//! The NATS users Sluice is deployed with, one per role, and what each may do: the
//! permission lists `sluice nats init` writes into the server's configuration, and the
//! configuration itself.
//!
//! Everything here is a pure function of the contract in [`crate::subjects`], so the
//! lists follow the subjects when they change, and `docs/security.md` shows them as
//! generated (a unit test fails when it is stale).
//!
//! NATS permissions are matched on subjects only, never on a request's body. Where a
//! JetStream API request carries what matters in its subject (a consumer's name and
//! filter in `$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`, the consumer in
//! `$JS.API.CONSUMER.MSG.NEXT.<stream>.<name>`) the lists pin it; requests that carry
//! it only in the body (an unnamed consumer create, a stream purge's filter) are not
//! allowed to roles that must be confined.

use crate::envelope::Provider;
use crate::subjects;

/// The one account every Sluice user belongs to (JetStream is enabled for it).
pub const ACCOUNT: &str = "SLUICE";

/// The first and last line of the users `sluice cluster add/remove` rewrite in a
/// rendered `nats.conf`; everything outside them is left as the operator edited it.
pub const USERS_BEGIN: &str =
    "# BEGIN sluice users: rendered from the seeds (*.nk) beside this file by `sluice nats init` and `sluice cluster add/remove`; edits between these lines are overwritten";
/// See [`USERS_BEGIN`].
pub const USERS_END: &str = "# END sluice users";

/// Who connects to NATS.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// `sluice streams apply` and the operators' CLI: everything.
    Admin,
    /// Publishes events.
    Ingest,
    /// Plans runs, relays child pipelines, reports statuses.
    Dispatcher,
    /// Reads runs, logs and decisions.
    Dashboard,
    /// The dashboard with `--allow-actions`: reads as [`Role::Dashboard`] does, and may
    /// also ask for a cancel or a rerun. A read-only dashboard has a seed that cannot.
    DashboardActions,
    /// One cluster's runners.
    Runner(String),
}

impl Role {
    /// The roles that exist whatever the clusters (`sluice nats init` writes a seed for
    /// each).
    pub const FIXED: [Role; 5] = [
        Role::Admin,
        Role::Ingest,
        Role::Dispatcher,
        Role::Dashboard,
        Role::DashboardActions,
    ];

    /// Whether a credentials folder must hold this role's seed (runners' are per
    /// cluster). `dashboard-actions` came later than the others: a folder made before
    /// it has none, and gets one when it is needed (`sluice install
    /// --dashboard-actions`; by hand: docs/security.md).
    pub fn required(&self) -> bool {
        !matches!(self, Role::DashboardActions | Role::Runner(_))
    }

    /// The role's user name, and the stem of its seed file (`<name>.nk`).
    pub fn name(&self) -> String {
        match self {
            Role::Admin => "admin".into(),
            Role::Ingest => "ingest".into(),
            Role::Dispatcher => "dispatcher".into(),
            Role::Dashboard => "dashboard".into(),
            Role::DashboardActions => "dashboard-actions".into(),
            Role::Runner(cluster) => format!("runner-{cluster}"),
        }
    }

    /// The role named `name` (`admin`, …, `runner-<cluster>`); a runner's cluster must
    /// be a valid name, since it becomes a subject token.
    pub fn parse(name: &str) -> Result<Role, String> {
        match name {
            "admin" => Ok(Role::Admin),
            "ingest" => Ok(Role::Ingest),
            "dispatcher" => Ok(Role::Dispatcher),
            "dashboard" => Ok(Role::Dashboard),
            "dashboard-actions" => Ok(Role::DashboardActions),
            other => match other.strip_prefix("runner-") {
                Some(cluster) => {
                    crate::pipeline::Name::parse(cluster)?;
                    Ok(Role::Runner(cluster.to_owned()))
                }
                None => Err(format!(
                    "`{name}` is not a role: admin, ingest, dispatcher, dashboard, dashboard-actions or runner-<cluster>"
                )),
            },
        }
    }

    /// Every role of a deployment with these clusters: the fixed ones, then one runner
    /// per cluster, sorted and without repeats.
    pub fn all_for<S: AsRef<str>>(clusters: &[S]) -> Vec<Role> {
        let mut roles: Vec<Role> = Role::FIXED.to_vec();
        roles.extend(clusters.iter().map(|c| Role::Runner(c.as_ref().to_owned())));
        roles.sort();
        roles.dedup();
        roles
    }

    /// The file holding the role's NKey seed: `<name>.nk`.
    pub fn seed_file(&self) -> String {
        format!("{}.nk", self.name())
    }
}

/// The prefix of a client's reply subjects. Runners use one of their cluster's, so that
/// one cluster's runner cannot receive another's replies (JetStream acks, API answers).
pub fn inbox_prefix(role: &Role) -> String {
    match role {
        Role::Runner(cluster) => format!("_INBOX_{cluster}"),
        _ => "_INBOX".into(),
    }
}

// === Permission lists ===

/// What one user may publish and subscribe to. A deny wins over an allow; anything not
/// allowed is denied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish_allow: Vec<String>,
    pub publish_deny: Vec<String>,
    pub subscribe_allow: Vec<String>,
    pub subscribe_deny: Vec<String>,
}

fn api(path: impl AsRef<str>) -> String {
    format!("$JS.API.{}", path.as_ref())
}

fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

fn object_stream(bucket: &str) -> String {
    format!("OBJ_{bucket}")
}

/// The durable consumers the contract puts on a stream. A role that may create named
/// consumers on, or pull from any consumer of, that stream is denied these names: a
/// consumer create with an existing durable's name updates it (a new filter would
/// redirect its messages), and a pull takes its messages away from their owner.
fn durables_on(stream: &str) -> &'static [&'static str] {
    match stream {
        subjects::EVENTS_STREAM => &[subjects::DISPATCHER_CONSUMER],
        subjects::STATUS_STREAM => &[
            subjects::DISPATCHER_STATUS_CONSUMER,
            subjects::REPORTER_CONSUMER,
        ],
        subjects::CHILDREN_STREAM => &[subjects::DISPATCHER_CHILDREN_CONSUMER],
        _ => &[],
    }
}

/// Subjects no user may hold a core subscription on: everything a stream stores and
/// the JetStream API and acknowledgements.
///
/// Runners (and the dashboard) may create consumers, and NATS lets a consumer push to
/// any deliver subject that has a subscriber; a stream storing that subject then
/// stores what was pushed (the server does not count its own streams as subscribers,
/// so without one nothing is delivered). A runner could otherwise push messages it
/// wrote itself into SLUICE_EVENTS or SLUICE_RUNS whenever anyone ran `nats sub '>'`.
/// Clients read streams through consumers, which deliver to their inboxes. The one
/// core subscription on a `sluice.` subject is the dispatchers' on
/// [`subjects::RERUN`], which no stream stores; a message a consumer pushes there
/// carries a `$JS.ACK` reply, and the dispatcher answers only to a client inbox
/// (`sluice_dispatcher::rerun::answerable`) and acts only on runs as stored.
pub const NO_CORE_SUBSCRIPTIONS: [&str; 4] = ["sluice.>", "$KV.>", "$O.>", "$JS.>"];

/// The permissions of `role`'s user.
pub fn permissions(role: &Role) -> Permissions {
    let inbox = vec![format!("{}.>", inbox_prefix(role))];
    match role {
        Role::Admin => Permissions {
            publish_allow: vec![">".into()],
            subscribe_allow: vec![">".into()],
            subscribe_deny: NO_CORE_SUBSCRIPTIONS.map(str::to_owned).to_vec(),
            ..Default::default()
        },
        Role::Ingest => ingest(inbox),
        Role::Dispatcher => Permissions {
            publish_allow: vec![">".into()],
            // Streams and buckets belong to `sluice streams apply`; a restore would
            // create one under another name.
            publish_deny: ["CREATE", "UPDATE", "DELETE", "PURGE", "RESTORE"]
                .iter()
                .map(|verb| api(format!("STREAM.{verb}.>")))
                .collect(),
            // Its consumers deliver to its inbox; see [`NO_CORE_SUBSCRIPTIONS`]. Rerun
            // requests (from the dashboard) are core requests it answers.
            subscribe_allow: [inbox, vec![subjects::RERUN.to_owned()]].concat(),
            ..Default::default()
        },
        Role::Dashboard => dashboard(inbox, false),
        Role::DashboardActions => dashboard(inbox, true),
        Role::Runner(cluster) => runner(cluster, inbox),
    }
}

fn ingest(inbox: Vec<String>) -> Permissions {
    let payloads = object_stream(subjects::PAYLOADS_BUCKET);
    let mut publish_allow = vec![
        api("INFO"),
        api(format!("STREAM.INFO.{}", subjects::EVENTS_STREAM)),
        api(format!("STREAM.INFO.{payloads}")),
    ];
    // Manual events are published by people (`sluice events publish`), never by ingest:
    // they may name a pipeline and clusters directly.
    publish_allow.extend(
        [Provider::Github, Provider::Gitlab, Provider::Generic]
            .iter()
            .map(|p| subjects::event(p.as_str(), ">")),
    );
    publish_allow.extend([
        // An object's chunks and its metadata.
        format!("$O.{}.>", subjects::PAYLOADS_BUCKET),
        // A put first looks up the object's metadata (to drop the chunks it replaces):
        // without this it waits for a reply that never comes.
        api(format!(
            "DIRECT.GET.{payloads}.$O.{}.M.>",
            subjects::PAYLOADS_BUCKET
        )),
        // A redelivered oversized webhook replaces its object, and the put purges the
        // old chunks. Ingest can rewrite any object's metadata anyway, so this adds no
        // reach beyond the payload store.
        api(format!("STREAM.PURGE.{payloads}")),
    ]);
    Permissions {
        publish_allow,
        subscribe_allow: inbox,
        ..Default::default()
    }
}

/// The dashboard's reads; with `actions`, also its two requests.
fn dashboard(inbox: Vec<String>, actions: bool) -> Permissions {
    let mut publish_allow = vec![
        api("INFO"),
        api("STREAM.NAMES"),
        api("STREAM.LIST"),
        api("STREAM.INFO.*"),
        api("STREAM.MSG.GET.*"),
        api("DIRECT.GET.>"),
        api("CONSUMER.NAMES.*"),
        api("CONSUMER.LIST.*"),
        api("CONSUMER.INFO.*.*"),
        // Flow control replies of the push consumers that watch buckets.
        "$JS.FC.>".into(),
    ];
    let mut publish_deny = Vec::new();
    for stream in [
        subjects::EVENTS_STREAM,
        subjects::STATUS_STREAM,
        subjects::LOGS_STREAM,
        subjects::DECISIONS_STREAM,
        subjects::DEADLETTER_STREAM,
    ] {
        // Named consumers only (with or without a filter in the subject): an unnamed
        // create carries its name, if any, in the body, where no permission can see it.
        publish_allow.push(api(format!("CONSUMER.CREATE.{stream}.>")));
        publish_allow.push(api(format!("CONSUMER.MSG.NEXT.{stream}.*")));
        for durable in durables_on(stream) {
            publish_deny.push(api(format!("CONSUMER.CREATE.{stream}.{durable}")));
            publish_deny.push(api(format!("CONSUMER.CREATE.{stream}.{durable}.>")));
            publish_deny.push(api(format!("CONSUMER.MSG.NEXT.{stream}.{durable}")));
        }
    }
    // Bucket watches and key listings create unnamed consumers; buckets have no
    // durables to protect.
    for bucket in subjects::BUCKETS {
        let stream = kv_stream(bucket);
        publish_allow.push(api(format!("CONSUMER.CREATE.{stream}")));
        publish_allow.push(api(format!("CONSUMER.CREATE.{stream}.>")));
        publish_allow.push(api(format!("CONSUMER.MSG.NEXT.{stream}.*")));
    }
    if actions {
        // Its two actions (`--allow-actions`): a cancel request to a run's cluster, and
        // a rerun asked of a dispatcher, which alone stores the event — so this
        // credential can stop runs and repeat stored events, never store an event of
        // its own.
        publish_allow.extend([subjects::cancel("*"), subjects::RERUN.into()]);
    }
    Permissions {
        publish_allow,
        publish_deny,
        subscribe_allow: inbox,
        ..Default::default()
    }
}

fn runner(cluster: &str, inbox: Vec<String>) -> Permissions {
    let runs = subjects::RUNS_STREAM;
    let consumer = subjects::runner_consumer(cluster);
    let mut publish_allow = vec![
        api("INFO"),
        // The cluster's work queue: its own durable, nothing else of SLUICE_RUNS.
        api(format!("CONSUMER.INFO.{runs}.{consumer}")),
        api(format!("CONSUMER.MSG.NEXT.{runs}.{consumer}")),
        // Acks (and progress, nak, term): the classic reply subject, and the one with a
        // domain and account hash in front (ADR-15 v2, sent by newer servers).
        format!("$JS.ACK.{runs}.{consumer}.>"),
        format!("$JS.ACK.*.*.{runs}.{consumer}.>"),
        subjects::status(cluster, ">"),
        subjects::logs(cluster, ">"),
        subjects::child_request(cluster, ">"),
        // Heartbeats: a put is a publish to the key's subject; opening the bucket reads
        // its stream's info.
        format!(
            "$KV.{}.{}",
            subjects::RUNNERS_BUCKET,
            subjects::runner_key(cluster, ">")
        ),
        api(format!(
            "STREAM.INFO.{}",
            kv_stream(subjects::RUNNERS_BUCKET)
        )),
    ];
    // A run's last state by subject, before it starts one (the subject, in the API
    // subject, is one of the cluster's).
    publish_allow.push(api(format!(
        "DIRECT.GET.{}.{}",
        subjects::STATUS_STREAM,
        subjects::status(cluster, ">")
    )));
    let mut publish_deny = Vec::new();
    // Reading back its own runs' states and logs (adoption) and its control messages:
    // named consumers whose filter, in the subject, is inside the cluster's subjects.
    for (stream, filter) in [
        (subjects::STATUS_STREAM, subjects::status(cluster, ">")),
        (subjects::LOGS_STREAM, subjects::logs(cluster, ">")),
        (subjects::CONTROL_STREAM, subjects::control(cluster)),
    ] {
        publish_allow.push(api(format!("CONSUMER.CREATE.{stream}.*.{filter}")));
        publish_allow.push(api(format!("CONSUMER.MSG.NEXT.{stream}.*")));
        for durable in durables_on(stream) {
            publish_deny.push(api(format!("CONSUMER.CREATE.{stream}.{durable}.>")));
            publish_deny.push(api(format!("CONSUMER.MSG.NEXT.{stream}.{durable}")));
        }
    }
    Permissions {
        publish_allow,
        publish_deny,
        subscribe_allow: inbox,
        ..Default::default()
    }
}

// === nats.conf ===

/// One user of the rendered configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub role: Role,
    /// The NKey public key (`U…`), never the seed.
    pub public_key: String,
}

/// The server settings `sluice nats init` writes outside the users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// `host:port` clients connect to.
    pub listen: String,
    /// JetStream's store folder.
    pub store_dir: String,
    /// JetStream's file storage limit (`max_file_store`, e.g. `20G`). Without one NATS
    /// takes 75% of the disk free when it starts, which varies from start to start.
    pub max_file_store: Option<String>,
}

/// Where clients connect by default.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4222";
/// JetStream's store by default: the data volume of the NATS StatefulSet.
pub const DEFAULT_STORE_DIR: &str = "/data/jetstream";

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            listen: DEFAULT_LISTEN.into(),
            store_dir: DEFAULT_STORE_DIR.into(),
            max_file_store: None,
        }
    }
}

/// A string in the configuration's syntax. Quoted, so that `$` (a variable reference
/// unquoted) and `>` are read literally.
fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn list(out: &mut String, indent: &str, key: &str, items: &[String]) {
    if items.is_empty() {
        return;
    }
    out.push_str(&format!("{indent}{key}: [\n"));
    for item in items {
        out.push_str(&format!("{indent}  {}\n", quoted(item)));
    }
    out.push_str(&format!("{indent}]\n"));
}

/// The users block, between [`USERS_BEGIN`] and [`USERS_END`] (both included), in role
/// order whatever the order of `users`.
pub fn render_users(users: &[User]) -> String {
    let mut users = users.to_vec();
    users.sort_by(|a, b| a.role.cmp(&b.role));
    let mut out = format!("{USERS_BEGIN}\n");
    for user in &users {
        let p = permissions(&user.role);
        out.push_str(&format!("      # {}\n      {{\n", user.role.name()));
        out.push_str(&format!("        nkey: {}\n", quoted(&user.public_key)));
        out.push_str("        permissions: {\n          publish: {\n");
        list(&mut out, "            ", "allow", &p.publish_allow);
        list(&mut out, "            ", "deny", &p.publish_deny);
        out.push_str("          }\n          subscribe: {\n");
        list(&mut out, "            ", "allow", &p.subscribe_allow);
        list(&mut out, "            ", "deny", &p.subscribe_deny);
        out.push_str("          }\n        }\n      }\n");
    }
    out.push_str(USERS_END);
    out.push('\n');
    out
}

/// A whole `nats.conf` for `nats-server -c`.
pub fn render_config(users: &[User], options: &ServerOptions) -> String {
    format!(
        r#"# NATS for Sluice, written by `sluice nats init`. Start it with `nats-server -c nats.conf`;
# after `sluice cluster add/remove` rewrite the users, reload it (`nats-server --signal
# reload`, or SIGHUP) and existing connections get the new permissions at once.
# Settings outside the users block are yours to edit; those commands leave them alone.

listen: {listen}

jetstream {{
  store_dir: {store_dir}
  # Every stored message is on disk before JetStream acknowledges it, and ingest
  # answers a forge only after that acknowledgement.
  sync_interval: always
{max_file_store}}}

# A 3-node cluster (R3 streams, `sluice streams apply --replicas 3`): give each node its
# own name and uncomment the routes, one per node, e.g. for a StatefulSet `sluice-nats`:
#
# server_name: $POD_NAME
# cluster {{
#   name: sluice
#   listen: 0.0.0.0:6222
#   routes: [
#     nats://sluice-nats-0.sluice-nats:6222
#     nats://sluice-nats-1.sluice-nats:6222
#     nats://sluice-nats-2.sluice-nats:6222
#   ]
# }}

accounts {{
  {ACCOUNT}: {{
    jetstream: enabled
    users: [
{users}    ]
  }}
}}
"#,
        listen = quoted(&options.listen),
        store_dir = quoted(&options.store_dir),
        max_file_store = match &options.max_file_store {
            Some(limit) => format!("  max_file_store: {limit}\n"),
            None =>
                "  # Every stream's byte limit is reserved from JetStream's storage, which is\n  \
                     # 75% of the disk free at start unless set here to what the volume holds:\n  \
                     # max_file_store: 20G\n"
                    .into(),
        },
        users = render_users(users),
    )
}

/// `config` with its users block replaced by one rendered from `users`. Refuses a file
/// whose markers were removed or reordered, rather than guessing where users go.
pub fn replace_users(config: &str, users: &[User]) -> crate::Result<String> {
    let begin = config.find(USERS_BEGIN);
    let end = config.find(USERS_END);
    match (begin, end) {
        (Some(begin), Some(end)) if begin < end => {
            let after = &config[end + USERS_END.len()..];
            let after = after.strip_prefix('\n').unwrap_or(after);
            Ok(format!(
                "{}{}{}",
                &config[..begin],
                render_users(users),
                after
            ))
        }
        _ => Err(crate::Error::Invalid(format!(
            "the users block is missing or broken (expected a line `{USERS_BEGIN}` followed by a line `{USERS_END}`)"
        ))),
    }
}

// === Documentation ===

/// The permission lists of every role as `docs/security.md` shows them, for a cluster
/// named `<cluster>`.
pub fn permissions_markdown() -> String {
    let mut out = String::new();
    for role in Role::all_for(&["<cluster>"]) {
        let p = permissions(&role);
        out.push_str(&format!("#### `{}`\n\n```text\n", role.name()));
        for (what, items) in [
            ("publish allow", &p.publish_allow),
            ("publish deny", &p.publish_deny),
            ("subscribe allow", &p.subscribe_allow),
            ("subscribe deny", &p.subscribe_deny),
        ] {
            if items.is_empty() {
                continue;
            }
            out.push_str(&format!("{what}:\n"));
            for item in items.iter() {
                out.push_str(&format!("  {item}\n"));
            }
        }
        out.push_str("```\n\n");
    }
    out
}

/// The lines between which `docs/security.md` holds [`permissions_markdown`].
pub const DOCS_BEGIN: &str =
    "<!-- BEGIN generated by sluice_core::roles::permissions_markdown; `SLUICE_UPDATE_DOCS=1 cargo test -p sluice-core roles` rewrites it -->";
/// See [`DOCS_BEGIN`].
pub const DOCS_END: &str = "<!-- END generated -->";

#[cfg(test)]
mod tests {
    use super::*;

    fn runner_a() -> Permissions {
        permissions(&Role::Runner("a".into()))
    }

    #[test]
    fn roles_round_trip_through_their_names() {
        for role in Role::all_for(&["eu-1", "b"]) {
            assert_eq!(Role::parse(&role.name()), Ok(role.clone()));
            assert_eq!(role.seed_file(), format!("{}.nk", role.name()));
        }
        assert_eq!(Role::parse("runner-eu-1"), Ok(Role::Runner("eu-1".into())));
        for bad in [
            "root",
            "runner-",
            "runner-EU",
            "runner-a.b",
            "runner-a>",
            "",
        ] {
            assert!(Role::parse(bad).is_err(), "{bad}");
        }
        let names: Vec<String> = Role::all_for(&["b", "a", "b"])
            .iter()
            .map(Role::name)
            .collect();
        assert_eq!(
            names,
            [
                "admin",
                "ingest",
                "dispatcher",
                "dashboard",
                "dashboard-actions",
                "runner-a",
                "runner-b"
            ]
        );
    }

    #[test]
    fn a_runner_may_use_exactly_its_own_clusters_subjects() {
        let p = runner_a();
        assert_eq!(
            p.publish_allow,
            [
                "$JS.API.INFO",
                "$JS.API.CONSUMER.INFO.SLUICE_RUNS.sluice-runner-a",
                "$JS.API.CONSUMER.MSG.NEXT.SLUICE_RUNS.sluice-runner-a",
                "$JS.ACK.SLUICE_RUNS.sluice-runner-a.>",
                "$JS.ACK.*.*.SLUICE_RUNS.sluice-runner-a.>",
                "sluice.status.a.>",
                "sluice.logs.a.>",
                "sluice.children.a.>",
                "$KV.SLUICE_RUNNERS.a.>",
                "$JS.API.STREAM.INFO.KV_SLUICE_RUNNERS",
                "$JS.API.DIRECT.GET.SLUICE_STATUS.sluice.status.a.>",
                "$JS.API.CONSUMER.CREATE.SLUICE_STATUS.*.sluice.status.a.>",
                "$JS.API.CONSUMER.MSG.NEXT.SLUICE_STATUS.*",
                "$JS.API.CONSUMER.CREATE.SLUICE_LOGS.*.sluice.logs.a.>",
                "$JS.API.CONSUMER.MSG.NEXT.SLUICE_LOGS.*",
                "$JS.API.CONSUMER.CREATE.SLUICE_CONTROL.*.sluice.control.a.>",
                "$JS.API.CONSUMER.MSG.NEXT.SLUICE_CONTROL.*",
            ]
        );
        assert_eq!(
            p.publish_deny,
            [
                "$JS.API.CONSUMER.CREATE.SLUICE_STATUS.sluice-dispatcher-groups.>",
                "$JS.API.CONSUMER.MSG.NEXT.SLUICE_STATUS.sluice-dispatcher-groups",
                "$JS.API.CONSUMER.CREATE.SLUICE_STATUS.sluice-reporter.>",
                "$JS.API.CONSUMER.MSG.NEXT.SLUICE_STATUS.sluice-reporter",
            ]
        );
        assert_eq!(p.subscribe_allow, ["_INBOX_a.>"]);
        assert!(p.subscribe_deny.is_empty());
    }

    /// A small matcher with NATS's token rules (`*` one token, `>` one or more), to
    /// check what the lists mean. The integration tests check the real server agrees.
    fn matches(pattern: &str, subject: &str) -> bool {
        let (mut p, mut s) = (pattern.split('.'), subject.split('.'));
        loop {
            match (p.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    fn may_publish(p: &Permissions, subject: &str) -> bool {
        p.publish_allow.iter().any(|a| matches(a, subject))
            && !p.publish_deny.iter().any(|d| matches(d, subject))
    }

    #[test]
    fn a_runner_cannot_reach_another_cluster_or_change_anything() {
        let p = runner_a();
        for allowed in [
            "sluice.status.a.run1",
            "sluice.logs.a.run1",
            "sluice.children.a.run1",
            "$KV.SLUICE_RUNNERS.a.r1",
            "$JS.ACK.SLUICE_RUNS.sluice-runner-a.1.2.3.4.5",
            "$JS.ACK._.HASH.SLUICE_RUNS.sluice-runner-a.1.2.3.4.5.tok",
            "$JS.API.CONSUMER.CREATE.SLUICE_STATUS.read1.sluice.status.a.run1",
            "$JS.API.CONSUMER.CREATE.SLUICE_CONTROL.ctl.sluice.control.a.>",
        ] {
            assert!(may_publish(&p, allowed), "{allowed}");
        }
        for refused in [
            "sluice.status.b.run1",
            "sluice.logs.b.run1",
            "sluice.runs.a",
            "sluice.events.manual.push",
            "sluice.events.github.push",
            "sluice.control.a.cancel",
            "$KV.SLUICE_RUNNERS.b.r1",
            "$KV.SLUICE_PIPELINES.app",
            "$JS.API.CONSUMER.MSG.NEXT.SLUICE_RUNS.sluice-runner-b",
            "$JS.API.CONSUMER.INFO.SLUICE_RUNS.sluice-runner-b",
            "$JS.ACK.SLUICE_RUNS.sluice-runner-b.1.2.3.4.5",
            "$JS.ACK._.HASH.SLUICE_RUNS.sluice-runner-b.1.2.3.4.5",
            "$JS.API.CONSUMER.CREATE.SLUICE_RUNS.sluice-runner-a.sluice.runs.a",
            "$JS.API.CONSUMER.CREATE.SLUICE_STATUS",
            "$JS.API.CONSUMER.CREATE.SLUICE_STATUS.x",
            "$JS.API.CONSUMER.CREATE.SLUICE_STATUS.x.sluice.status.>",
            "$JS.API.CONSUMER.CREATE.SLUICE_STATUS.x.sluice.status.b.>",
            "$JS.API.CONSUMER.CREATE.SLUICE_STATUS.x.sluice.status.*.run1",
            "$JS.API.CONSUMER.CREATE.SLUICE_STATUS.sluice-reporter.sluice.status.a.>",
            "$JS.API.CONSUMER.MSG.NEXT.SLUICE_STATUS.sluice-reporter",
            "$JS.API.CONSUMER.MSG.NEXT.SLUICE_STATUS.sluice-dispatcher-groups",
            "$JS.API.CONSUMER.DURABLE.CREATE.SLUICE_STATUS.x",
            "$JS.API.CONSUMER.DELETE.SLUICE_STATUS.x",
            "$JS.API.CONSUMER.DELETE.SLUICE_RUNS.sluice-runner-a",
            "$JS.API.STREAM.INFO.SLUICE_RUNS",
            "$JS.API.STREAM.INFO.SLUICE_EVENTS",
            "$JS.API.STREAM.CREATE.X",
            "$JS.API.STREAM.UPDATE.SLUICE_RUNS",
            "$JS.API.STREAM.PURGE.SLUICE_STATUS",
            "$JS.API.STREAM.DELETE.SLUICE_STATUS",
            "$JS.API.STREAM.MSG.GET.SLUICE_STATUS",
            "$JS.API.DIRECT.GET.KV_SLUICE_PIPELINES.$KV.SLUICE_PIPELINES.app",
        ] {
            assert!(!may_publish(&p, refused), "{refused}");
        }
        assert!(!matches("_INBOX_a.>", "_INBOX.x"));
        assert!(!matches("_INBOX_a.>", "_INBOX_b.x"));
    }

    #[test]
    fn ingest_publishes_forge_events_and_payloads_only() {
        let p = permissions(&Role::Ingest);
        for allowed in [
            "sluice.events.github.push",
            "sluice.events.gitlab.merge_request",
            "sluice.events.generic.ping",
            "$O.SLUICE_PAYLOADS.C.abc",
            "$O.SLUICE_PAYLOADS.M.abc",
            "$JS.API.STREAM.INFO.SLUICE_EVENTS",
        ] {
            assert!(may_publish(&p, allowed), "{allowed}");
        }
        for refused in [
            "sluice.events.manual.push",
            "sluice.runs.a",
            "sluice.status.a.r",
            "$KV.SLUICE_PIPELINES.app",
            "$JS.API.STREAM.PURGE.SLUICE_EVENTS",
            "$JS.API.STREAM.DELETE.OBJ_SLUICE_PAYLOADS",
            "$JS.API.CONSUMER.CREATE.SLUICE_EVENTS.x.sluice.events.>",
        ] {
            assert!(!may_publish(&p, refused), "{refused}");
        }
        assert_eq!(p.subscribe_allow, ["_INBOX.>"]);
    }

    #[test]
    fn the_dispatcher_cannot_change_streams_and_the_dashboard_only_reads() {
        let p = permissions(&Role::Dispatcher);
        assert!(may_publish(&p, "sluice.runs.a"));
        assert!(may_publish(
            &p,
            "$JS.API.CONSUMER.CREATE.SLUICE_EVENTS.sluice-dispatcher"
        ));
        for verb in ["CREATE", "UPDATE", "DELETE", "PURGE", "RESTORE"] {
            assert!(!may_publish(
                &p,
                &format!("$JS.API.STREAM.{verb}.SLUICE_EVENTS")
            ));
        }
        let p = permissions(&Role::Dashboard);
        for allowed in [
            "$JS.API.CONSUMER.CREATE.SLUICE_STATUS.view.sluice.status.*.run1",
            "$JS.API.CONSUMER.MSG.NEXT.SLUICE_LOGS.view",
            "$JS.API.DIRECT.GET.SLUICE_DECISIONS.sluice.decisions.abc",
            "$JS.API.CONSUMER.CREATE.KV_SLUICE_PIPELINES",
            "$JS.API.STREAM.INFO.SLUICE_RUNS",
        ] {
            assert!(may_publish(&p, allowed), "{allowed}");
        }
        // A read-only dashboard's seed cannot act; the acting one's reads as it does,
        // plus a cancel to a run's cluster and a rerun asked of a dispatcher.
        let acting = permissions(&Role::DashboardActions);
        for action in ["sluice.control.eu-1.cancel", "sluice.rerun"] {
            assert!(!may_publish(&p, action), "{action}");
            assert!(may_publish(&acting, action), "{action}");
        }
        assert_eq!(
            acting.publish_allow[..acting.publish_allow.len() - 2],
            p.publish_allow[..]
        );
        assert_eq!(acting.publish_deny, p.publish_deny);
        assert_eq!(acting.subscribe_allow, p.subscribe_allow);
        for refused in [
            "sluice.status.a.r",
            "sluice.events.manual.push",
            "sluice.events.github.push",
            "sluice.control.eu-1.child.r1",
            "$KV.SLUICE_PIPELINES.app",
            "$JS.API.CONSUMER.CREATE.SLUICE_STATUS",
            "$JS.API.CONSUMER.CREATE.SLUICE_RUNS.sluice-runner-a.sluice.runs.b",
            "$JS.API.CONSUMER.CREATE.SLUICE_STATUS.sluice-reporter.sluice.status.>",
            "$JS.API.CONSUMER.CREATE.SLUICE_EVENTS.sluice-dispatcher",
            "$JS.API.CONSUMER.MSG.NEXT.SLUICE_EVENTS.sluice-dispatcher",
            "$JS.API.CONSUMER.DELETE.SLUICE_STATUS.x",
            "$JS.API.STREAM.PURGE.SLUICE_STATUS",
        ] {
            assert!(!may_publish(&p, refused), "{refused}");
        }
        let p = permissions(&Role::Admin);
        assert_eq!(
            (p.publish_allow, p.subscribe_allow),
            (vec![">".into()], vec![">".into()])
        );
        for role in Role::all_for(&["a"]) {
            let p = permissions(&role);
            let may_subscribe = |s: &str| {
                p.subscribe_allow.iter().any(|a| matches(a, s))
                    && !p.subscribe_deny.iter().any(|d| matches(d, s))
            };
            for stored in [
                "sluice.runs.b",
                "sluice.events.manual.push",
                "$KV.SLUICE_PIPELINES.app",
                "$O.SLUICE_PAYLOADS.M.x",
                "$JS.API.STREAM.DELETE.SLUICE_EVENTS",
                "$JS.ACK.SLUICE_RUNS.sluice-runner-b.1.1.1.1.0",
            ] {
                assert!(
                    !may_subscribe(stored),
                    "{} may subscribe to {stored}",
                    role.name()
                );
            }
            assert!(may_subscribe(&format!("{}.x", inbox_prefix(&role))));
        }
    }

    fn users() -> Vec<User> {
        Role::all_for(&["b", "a"])
            .into_iter()
            .enumerate()
            .map(|(i, role)| User {
                role,
                public_key: format!("UKEY{i}"),
            })
            .collect()
    }

    #[test]
    fn the_config_has_one_account_every_user_and_the_options() {
        let options = ServerOptions {
            listen: "127.0.0.1:4333".into(),
            store_dir: "/var/lib/nats".into(),
            max_file_store: Some("20G".into()),
        };
        let config = render_config(&users(), &options);
        assert!(config.contains("  max_file_store: 20G\n}\n"), "{config}");
        let unset = render_config(&users(), &ServerOptions::default());
        assert!(unset.contains("  # max_file_store: 20G\n}\n"), "{unset}");
        assert!(config.contains("listen: \"127.0.0.1:4333\"\n"));
        assert!(config.contains("store_dir: \"/var/lib/nats\"\n"));
        assert!(config.contains("sync_interval: always\n"));
        assert!(config.contains("  SLUICE: {\n    jetstream: enabled\n"));
        for (i, role) in Role::all_for(&["a", "b"]).iter().enumerate() {
            assert!(config.contains(&format!("      # {}\n", role.name())));
            assert!(config.contains(&format!("nkey: \"UKEY{i}\"")));
        }
        assert!(config.contains("\"$JS.ACK.*.*.SLUICE_RUNS.sluice-runner-b.>\""));
        // Rendered in role order, whatever order the users came in.
        let mut reversed = users();
        reversed.reverse();
        assert_eq!(render_config(&reversed, &options), config);
    }

    #[test]
    fn replacing_users_keeps_the_operators_edits() {
        let config = render_config(&users(), &ServerOptions::default());
        let edited = config.replace(
            "listen: \"0.0.0.0:4222\"",
            "listen: \"0.0.0.0:4999\"\nhttp: 8222",
        );
        let fewer: Vec<User> = users()
            .into_iter()
            .filter(|u| u.role != Role::Runner("b".into()))
            .collect();
        let replaced = replace_users(&edited, &fewer).expect("markers present");
        assert!(replaced.contains("http: 8222\n"));
        assert!(!replaced.contains("runner-b"));
        assert!(replaced.contains("      # runner-a\n"));
        assert_eq!(replace_users(&replaced, &fewer).expect("again"), replaced);
        assert_eq!(
            replace_users(&replaced, &users()).expect("back"),
            edited,
            "adding the user back gives the edited file again"
        );
        for broken in [
            config.replace(USERS_BEGIN, ""),
            config.replace(USERS_END, ""),
            format!("{USERS_END}\n{}", config.replace(USERS_END, "")),
        ] {
            assert!(replace_users(&broken, &fewer).is_err());
        }
    }

    #[test]
    fn docs_security_md_shows_the_lists_as_generated() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/security.md");
        let doc = std::fs::read_to_string(&path).expect("docs/security.md");
        let (Some(begin), Some(end)) = (doc.find(DOCS_BEGIN), doc.find(DOCS_END)) else {
            panic!("docs/security.md lacks the lines `{DOCS_BEGIN}` and `{DOCS_END}`");
        };
        let want = format!("{DOCS_BEGIN}\n\n{}{DOCS_END}", permissions_markdown());
        let have = &doc[begin..end + DOCS_END.len()];
        if have != want {
            if std::env::var_os("SLUICE_UPDATE_DOCS").is_some() {
                let updated = format!("{}{want}{}", &doc[..begin], &doc[end + DOCS_END.len()..]);
                std::fs::write(&path, updated).expect("write docs/security.md");
            } else {
                panic!(
                    "docs/security.md's permission lists are stale; run `SLUICE_UPDATE_DOCS=1 cargo test -p sluice-core roles`"
                );
            }
        }
    }
}
