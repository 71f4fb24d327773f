//! Following one container's log into `SLUICE_LOGS`.

use std::sync::Arc;
use std::time::Duration;

use kube::api::LogParams;
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

use super::logs::LogClients;
use super::status;
use super::watch::PodView;
use crate::mask::{Masker, StreamMasker};
use crate::report::{LogWriter, Reporter};
use crate::wait::sleep_until;

/// One container's log to follow.
pub(super) struct LogFollow {
    pub logs: Arc<LogClients>,
    pub pod_name: String,
    pub container: String,
    pub step: String,
    pub reporter: Reporter,
    /// Resume after the lines already stored.
    pub adopted: bool,
    /// The run's secret values, masked before a line is stored.
    pub mask: Arc<Masker>,
    pub pod: tokio::sync::watch::Receiver<PodView>,
    pub handoff: CancellationToken,
}

/// Ships one container's log to `SLUICE_LOGS` as it is written. Resumes after the
/// lines already stored when the run was adopted, and re-opens the stream if it drops
/// while the container still runs.
pub(super) async fn follow_log(f: LogFollow) {
    let LogFollow {
        logs,
        pod_name,
        container,
        step,
        reporter,
        adopted,
        mask,
        pod,
        handoff,
    } = f;
    let (mut stored, next_seq) = if adopted {
        Box::pin(reporter.stored_log(&step)).await
    } else {
        (0, 0)
    };
    let mut log = reporter.log_writer(&step, next_seq);
    // Lines of output read, stored or not: the first `stored` are already stored.
    let mut read: u64 = 0;
    let mut delay = Duration::from_millis(200);
    let mut pod = pod;
    loop {
        let params = LogParams {
            container: Some(container.clone()),
            follow: true,
            ..Default::default()
        };
        let mut clean = false;
        let mut ended_at = time::OffsetDateTime::now_utc();
        // Held while the stream is open: it counts towards its connection's streams.
        let lease = logs.lease();
        match Box::pin(lease.log_stream(&pod_name, &params)).await {
            Ok(stream) => {
                let mut lines = crate::lines::Lines::new(stream.compat());
                let mut masked = StreamMasker::new(mask.clone());
                loop {
                    // `next_piece` keeps what it has read when the batch's time
                    // comes first, so no output is lost to the select.
                    let next = tokio::select! {
                        next = lines.next_piece() => next,
                        () = sleep_until(log.due()) => {
                            log.flush().await;
                            continue;
                        }
                        () = handoff.cancelled() => {
                            // A held piece is not stored: the replica that adopts the
                            // run reads it again, with the rest of its line.
                            log.flush().await;
                            return;
                        }
                    };
                    match next {
                        Ok(Some(piece)) => {
                            for text in masked.push(piece.text, piece.continues) {
                                store(&mut log, &mut read, stored, text).await;
                            }
                        }
                        Ok(None) => {
                            store(&mut log, &mut read, stored, masked.finish()).await;
                            clean = true;
                            ended_at = time::OffsetDateTime::now_utc();
                            break;
                        }
                        Err(e) => {
                            store(&mut log, &mut read, stored, masked.finish()).await;
                            tracing::debug!(pod = %pod_name, container = %container, error = %e, "log stream broke");
                            break;
                        }
                    }
                }
            }
            Err(kube::Error::Api(s)) if s.code == 404 => break,
            Err(e) => {
                tracing::debug!(pod = %pod_name, container = %container, error = %e, "cannot open the log")
            }
        }
        drop(lease);
        // A follow ends when the container does; the watch may report the exit a
        // moment later. If the container still runs after that, the stream dropped.
        // With the exit, whether the stream was dropped before it rather than closed
        // by it: then the lines written in between are read by opening it once more.
        let ended = async {
            loop {
                let done = match &*pod.borrow_and_update() {
                    PodView::Present(p) => status::terminated(p, &container).then(|| {
                        status::ended_before_the_container(
                            ended_at,
                            status::finished_at(p, &container),
                        )
                    }),
                    PodView::Gone => Some(false),
                    PodView::Unknown => None,
                };
                if let Some(dropped) = done {
                    return (true, dropped);
                }
                if pod.changed().await.is_err() {
                    return (true, false);
                }
            }
        };
        let wait = if clean {
            Duration::from_secs(5)
        } else {
            Duration::ZERO
        };
        let (done, dropped) = tokio::time::timeout(wait, ended)
            .await
            .unwrap_or((false, false));
        if done && clean && !dropped {
            break;
        }
        if !done {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        // Re-open: a follow of a finished container returns its whole log and ends,
        // which catches lines written between the drop and the exit. The stream starts
        // again from the container's first line: every line read so far is skipped.
        stored = stored.max(read);
        read = 0;
    }
    log.flush().await;
}

/// Stores one masked line of output, unless it is among the `stored` ones.
async fn store(log: &mut LogWriter, read: &mut u64, stored: u64, text: Option<String>) {
    let Some(text) = text else { return };
    *read += 1;
    if *read > stored {
        let stream = "stdout".to_owned();
        log.line(sluice_core::run::LogLine { stream, text }).await;
    }
}
