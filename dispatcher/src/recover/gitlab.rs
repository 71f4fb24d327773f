//! GitLab's side of the reconciler (GitLab 17.4+): a project hook's events as
//! `GET /projects/:id/hooks/:hook_id/events` lists them (the last 7 days, newest
//! first, paged by `page` with `x-next-page`), turned into the [`Delivery`] the
//! decision takes, and `POST …/events/:hook_event_id/resend`. GitLab resends an event
//! with its original headers, `Idempotency-Key` included, so ingest stores it under
//! the same event id as the first attempt, and one that did arrive is never doubled.

use std::collections::BTreeMap;

use serde::Deserialize;
use time::OffsetDateTime;

use super::decide::Delivery;

/// GitLab's largest page.
pub(crate) const PER_PAGE: u32 = 100;

/// One hook event (a delivery attempt) as GitLab lists it. Only what the decision
/// needs is read; `request_data` (the payload) is left unparsed.
#[derive(Debug, Clone, Deserialize)]
pub struct HookEvent {
    pub id: u64,
    /// `push_hooks`, `merge_request_hooks`, `tag_push_hooks`, …
    #[serde(default)]
    pub trigger: String,
    /// The headers GitLab sent, by their names as sent; the secret token is redacted.
    #[serde(default)]
    pub request_headers: BTreeMap<String, String>,
    /// What Sluice answered: a number (as a string or not), or GitLab's words when it
    /// got no answer (`internal error`).
    #[serde(default)]
    pub response_status: serde_json::Value,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl HookEvent {
    fn header(&self, name: &str) -> Option<&str> {
        self.request_headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// The id ingest stores this delivery under (its event id is `gitlab:<id>`): the
    /// first of `Idempotency-Key`, `X-Gitlab-Event-UUID`, `webhook-id`, in ingest's
    /// order. `None` when it has none, or one that cannot be a record key: such a
    /// delivery cannot be matched to its event and is left alone.
    pub fn delivery_id(&self) -> Option<&str> {
        ["idempotency-key", "x-gitlab-event-uuid", "webhook-id"]
            .into_iter()
            .find_map(|name| self.header(name))
            .filter(|id| {
                id.len() <= 200
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
            })
    }

    /// The HTTP status Sluice answered; 0 when GitLab got none.
    pub fn status(&self) -> u16 {
        match &self.response_status {
            serde_json::Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
        .unwrap_or(0)
    }

    /// The delivery as the decision takes it: GitLab's event id as the delivery id,
    /// the idempotency key as the guid every resend shares.
    pub fn delivery(&self) -> Option<Delivery> {
        Some(Delivery {
            id: self.id,
            guid: self.delivery_id()?.to_owned(),
            delivered_at: self.created_at,
            redelivery: false,
            status_code: self.status(),
            event: self.trigger.clone(),
            action: None,
        })
    }
}

/// The next page from `x-next-page` (empty on the last page). Only the number is
/// taken: the next request is built against the configured API URL, so an answer can
/// never send the token to another host.
pub fn next_page(header: Option<&str>) -> Option<u32> {
    header?.trim().parse().ok().filter(|p| *p > 1)
}

/// The project as the API takes it in a path: a number as is, a path URL-encoded.
pub(crate) fn project_route(project: &str) -> String {
    crate::forge::gitlab_project(project)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event as GitLab's API answers it (17.4), trimmed of fields not read.
    const EVENT: &str = r#"{
        "id": 7,
        "url": "https://ci.example.com/webhooks/gitlab",
        "trigger": "push_hooks",
        "request_headers": {
            "Content-Type": "application/json",
            "User-Agent": "GitLab/17.4.0",
            "Idempotency-Key": "f4a5c0f2-0e8e-4d3b-9b8e-6b7f4f2c9a11",
            "X-Gitlab-Event": "Push Hook",
            "X-Gitlab-Webhook-UUID": "0f9a7d6c-1111-2222-3333-444455556666",
            "X-Gitlab-Instance": "https://gitlab.example.com",
            "X-Gitlab-Event-UUID": "9b1de7a4-aaaa-bbbb-cccc-ddddeeeeffff",
            "X-Gitlab-Token": "[REDACTED]"
        },
        "request_data": {"object_kind": "push"},
        "response_headers": {},
        "response_body": "",
        "response_status": "503",
        "execution_duration": 0.02,
        "created_at": "2026-12-02T11:40:00.123Z"
    }"#;

    fn event(edit: impl FnOnce(&mut serde_json::Value)) -> HookEvent {
        let mut v: serde_json::Value = serde_json::from_str(EVENT).expect("json");
        edit(&mut v);
        serde_json::from_value(v).expect("an event")
    }

    #[test]
    fn an_event_maps_to_the_event_id_ingest_stores_it_under() {
        let d = event(|_| {}).delivery().expect("a delivery");
        assert_eq!(d.guid, "f4a5c0f2-0e8e-4d3b-9b8e-6b7f4f2c9a11");
        assert_eq!((d.id, d.status_code), (7, 503));
        assert_eq!(d.event, "push_hooks");
        // Before 17.4 there was no Idempotency-Key: ingest takes the event UUID.
        let older = event(|v| {
            v["request_headers"]
                .as_object_mut()
                .expect("headers")
                .remove("Idempotency-Key");
        });
        assert_eq!(
            older.delivery_id(),
            Some("9b1de7a4-aaaa-bbbb-cccc-ddddeeeeffff")
        );
        let lower = event(|v| {
            v["request_headers"] = serde_json::json!({"idempotency-key": "abc-1"});
        });
        assert_eq!(lower.delivery_id(), Some("abc-1"), "names in any case");
    }

    #[test]
    fn an_event_without_a_usable_id_is_not_a_delivery() {
        let none = event(|v| v["request_headers"] = serde_json::json!({}));
        assert!(none.delivery().is_none());
        let odd = event(|v| {
            v["request_headers"] = serde_json::json!({"Idempotency-Key": "a.b>c"});
        });
        assert!(odd.delivery().is_none(), "not a record key");
    }

    #[test]
    fn statuses_are_read_in_every_form_gitlab_writes_them() {
        assert_eq!(event(|v| v["response_status"] = "200".into()).status(), 200);
        assert_eq!(event(|v| v["response_status"] = 502.into()).status(), 502);
        assert_eq!(
            event(|v| v["response_status"] = "internal error".into()).status(),
            0
        );
        assert_eq!(
            event(|v| v["response_status"] = serde_json::Value::Null).status(),
            0
        );
    }

    #[test]
    fn the_next_page_comes_from_x_next_page_only() {
        assert_eq!(next_page(Some("2")), Some(2));
        assert_eq!(next_page(Some("")), None, "the last page");
        assert_eq!(next_page(None), None);
        assert_eq!(next_page(Some("1")), None, "never back to the start");
        assert_eq!(next_page(Some("https://evil/?page=2")), None);
    }

    #[test]
    fn projects_are_named_by_number_or_encoded_path() {
        assert_eq!(project_route("42"), "42");
        assert_eq!(project_route("acme/sub/app"), "acme%2Fsub%2Fapp");
    }
}
