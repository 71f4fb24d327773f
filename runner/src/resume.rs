//! Following a subject for as long as the runner runs. A follow that fails or ends (a
//! deleted consumer the client gave up on, a closed subscription, a server that kept
//! refusing) is started again after the last message seen, with backoff, so a reader
//! never sits idle on a dead stream.

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::stream::BoxStream;
use futures::StreamExt;
use sluice_core::bus;

use crate::wait::Backoff;

/// The first and longest waits before a follow is tried again.
pub(crate) const RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
pub(crate) const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// One subject, followed from the start of its stream and resumed where it stopped.
pub(crate) struct Follow {
    js: jetstream::Context,
    stream: &'static str,
    subject: String,
    /// The stream sequence of the last message returned.
    last: Option<u64>,
    current: Option<BoxStream<'static, sluice_core::Result<jetstream::Message>>>,
    backoff: Backoff,
}

impl std::fmt::Debug for Follow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follow")
            .field("subject", &self.subject)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl Follow {
    pub fn new(js: &jetstream::Context, stream: &'static str, subject: String) -> Self {
        Follow {
            js: js.clone(),
            stream,
            subject,
            last: None,
            current: None,
            backoff: Backoff::new(RETRY_FIRST, RETRY_MAX),
        }
    }

    /// The next message on the subject. Failures are logged and waited out, never
    /// returned; cancel-safe, so callers select on it with their shutdown.
    pub async fn next(&mut self) -> jetstream::Message {
        loop {
            let mut current = match self.current.take() {
                Some(c) => c,
                None => {
                    let from = resume_policy(self.last);
                    match bus::follow(&self.js, self.stream, self.subject.clone(), from).await {
                        Ok(s) => s.boxed(),
                        Err(e) => {
                            let delay = self.failed("cannot follow the subject", &e);
                            tokio::time::sleep(delay).await;
                            continue;
                        }
                    }
                }
            };
            let next = current.next().await;
            match next {
                Some(Ok(message)) => {
                    self.current = Some(current);
                    if let Ok(info) = message.info() {
                        self.last = Some(info.stream_sequence);
                    }
                    self.backoff.reset();
                    return message;
                }
                Some(Err(e)) => {
                    // The ordered consumer recreates itself after most errors.
                    self.current = Some(current);
                    let delay = self.failed("following the subject failed", &e);
                    tokio::time::sleep(delay).await;
                }
                None => {
                    let delay = self.failed("following the subject ended", &"no more messages");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Logs a failure; returns how long to wait before going on.
    fn failed(&mut self, what: &str, error: &dyn std::fmt::Display) -> std::time::Duration {
        let delay = self.backoff.next_delay();
        tracing::warn!(subject = %self.subject, error = %error, retry_in = ?delay, "{what}; resuming");
        delay
    }
}

/// Where a follow starts again: after the last message seen, else from the start.
fn resume_policy(last: Option<u64>) -> DeliverPolicy {
    match last {
        Some(seq) => DeliverPolicy::ByStartSequence {
            start_sequence: seq + 1,
        },
        None => DeliverPolicy::All,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_follow_starts_after_the_last_message_seen() {
        assert!(matches!(resume_policy(None), DeliverPolicy::All));
        assert!(matches!(
            resume_policy(Some(41)),
            DeliverPolicy::ByStartSequence { start_sequence: 42 }
        ));
    }
}
