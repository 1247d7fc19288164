//! Keeping a request body so a try can be sent again (Envoy's retry buffer).
//!
//! Why a tee rather than reading the body first: a body without a declared length (chunked
//! HTTP/1.1, most gRPC over h2) may never end before its answer starts (a bidirectional
//! stream), so waiting for its end would hang such calls, and would add a full upload to
//! every request's latency. Instead the first try streams the body as it comes, and every
//! frame it pulls is kept, up to [`Replay::limit`] bytes. A later try reads what was kept,
//! then goes on pulling the rest from the app: a body that ends within the limit, or that
//! has not passed it yet, can be sent again. Past the limit the copy is dropped, the try in
//! progress carries on with what is left of the stream, and no further try is possible.
//!
//! Tries may overlap for a moment (a cancelled try's body task stops asynchronously), so
//! only the newest try may pull from the app: an older one still running gets an error
//! instead of taking a frame the newer one needs. Tries that run side by side (hedging) read
//! only a complete copy. The lock is per request and held for a few instructions, never
//! across an await.

use crate::transport::{Body, BoxError};
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

/// A request body shared by the tries of one request.
#[derive(Clone)]
pub struct Replay {
    shared: Arc<Mutex<Shared>>,
}

struct Shared {
    /// The app's body; `None` once it ended.
    source: Option<Body>,
    /// Frames pulled so far (data and trailers), while the copy is kept.
    kept: Vec<Kept>,
    kept_bytes: usize,
    limit: usize,
    /// The body passed the limit: the copy was dropped and no further try may start.
    overflowed: bool,
    /// An error the app's body ended with; every reader past the kept frames sees it.
    failed: Option<String>,
    /// The newest reader: the only one that may pull from the app.
    newest: u64,
    /// The called service, for the metric counted when the body passes the limit.
    peer: String,
}

#[derive(Clone)]
enum Kept {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Replay {
    /// Starts keeping `body`, up to `limit` bytes. Passing the limit is counted in
    /// `sinew_retries_unreplayable_total{peer}`.
    pub fn new(body: Body, limit: usize, peer: &str) -> Replay {
        Replay {
            shared: Arc::new(Mutex::new(Shared {
                source: Some(body),
                kept: Vec::new(),
                kept_bytes: 0,
                limit,
                overflowed: false,
                failed: None,
                newest: 0,
                peer: peer.to_string(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The limit this body is kept up to.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// Whether another try may send the body again: it has not passed the limit.
    pub fn replayable(&self) -> bool {
        !self.lock().overflowed
    }

    /// Whether the whole body is kept (it ended within the limit): tries may then run side
    /// by side (hedging), each reading only the copy.
    pub fn complete(&self) -> bool {
        let shared = self.lock();
        shared.source.is_none() && !shared.overflowed && shared.failed.is_none()
    }

    /// The body of one try: the kept frames, then the rest of the app's body.
    pub fn body(&self) -> Body {
        let id = {
            let mut shared = self.lock();
            shared.newest += 1;
            shared.newest
        };
        http_body_util::BodyExt::boxed(Reader {
            replay: self.clone(),
            id,
            next: 0,
        })
    }
}

/// One try's view of the body.
struct Reader {
    replay: Replay,
    id: u64,
    /// Index of the next kept frame to return.
    next: usize,
}

impl http_body::Body for Reader {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let replay = self.replay.clone();
        let mut shared = replay.lock();
        if let Some(kept) = shared.kept.get(self.next).cloned() {
            self.next += 1;
            return Poll::Ready(Some(Ok(match kept {
                Kept::Data(data) => Frame::data(data),
                Kept::Trailers(trailers) => Frame::trailers(trailers),
            })));
        }
        if let Some(error) = &shared.failed {
            return Poll::Ready(Some(Err(error.clone().into())));
        }
        if shared.source.is_some() && self.id != shared.newest {
            return Poll::Ready(Some(Err("superseded by a later try".into())));
        }
        let Some(source) = shared.source.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(item) => {
                let result = match item {
                    None => {
                        shared.source = None;
                        None
                    }
                    Some(Err(e)) => {
                        shared.failed = Some(e.to_string());
                        Some(Err(e))
                    }
                    Some(Ok(frame)) => {
                        if !shared.overflowed {
                            let kept = match frame.data_ref() {
                                Some(data) => Some(Kept::Data(data.clone())),
                                None => frame.trailers_ref().cloned().map(Kept::Trailers),
                            };
                            let size = frame.data_ref().map_or(0, |d| d.len());
                            if shared.kept_bytes + size > shared.limit {
                                shared.overflowed = true;
                                shared.kept = Vec::new();
                                metrics::counter!("sinew_retries_unreplayable_total", "peer" => shared.peer.clone())
                                    .increment(1);
                            } else if let Some(kept) = kept {
                                shared.kept_bytes += size;
                                shared.kept.push(kept);
                                // This reader has seen it: it is past the new frame.
                                self.next = shared.kept.len();
                            }
                        }
                        Some(Ok(frame))
                    }
                };
                Poll::Ready(result)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.replay.lock();
        shared.source.is_none() && shared.failed.is_none() && self.next >= shared.kept.len()
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.replay.lock();
        match &shared.source {
            None if !shared.overflowed => {
                let left: usize = shared.kept[self.next.min(shared.kept.len())..]
                    .iter()
                    .map(|k| match k {
                        Kept::Data(d) => d.len(),
                        Kept::Trailers(_) => 0,
                    })
                    .sum();
                SizeHint::with_exact(left as u64)
            }
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::sync::mpsc;

    /// A body fed by hand, frame by frame, like an app uploading without a length.
    fn channel() -> (mpsc::Sender<Result<Frame<Bytes>, BoxError>>, Body) {
        let (tx, rx) = mpsc::channel(16);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        (tx, StreamBody::new(stream).boxed())
    }

    fn data(text: &'static str) -> Result<Frame<Bytes>, BoxError> {
        Ok(Frame::data(Bytes::from_static(text.as_bytes())))
    }

    async fn collect(body: Body) -> (Bytes, Option<HeaderMap>) {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes(), trailers)
    }

    #[tokio::test]
    async fn a_body_that_ends_within_the_limit_is_sent_again_whole_with_its_trailers() {
        let (tx, body) = channel();
        let replay = Replay::new(body, 64, "orders");
        tx.send(data("hello ")).await.unwrap();
        tx.send(data("world")).await.unwrap();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        tx.send(Ok(Frame::trailers(trailers.clone())))
            .await
            .unwrap();
        drop(tx);
        let first = collect(replay.body()).await;
        assert_eq!(first, (Bytes::from("hello world"), Some(trailers.clone())));
        assert!(replay.replayable() && replay.complete());
        // Two more tries, possibly side by side: each reads the copy.
        let (a, b) = tokio::join!(collect(replay.body()), collect(replay.body()));
        assert_eq!(a, first);
        assert_eq!(b, first);
    }

    #[tokio::test]
    async fn a_try_given_up_mid_stream_is_followed_by_one_that_reads_the_copy_then_the_rest() {
        let (tx, body) = channel();
        let replay = Replay::new(body, 64, "orders");
        tx.send(data("abc")).await.unwrap();
        let mut first = replay.body();
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "abc");
        assert!(replay.replayable() && !replay.complete(), "not ended yet");
        drop(first); // the first try failed before the body ended
        let second = tokio::spawn(collect(replay.body()));
        tx.send(data("def")).await.unwrap();
        drop(tx);
        assert_eq!(second.await.unwrap().0, Bytes::from("abcdef"));
        assert!(replay.complete());
    }

    #[tokio::test]
    async fn an_older_try_still_running_cannot_take_a_frame_from_the_newer_one() {
        let (tx, body) = channel();
        let replay = Replay::new(body, 64, "orders");
        let mut old = replay.body();
        tx.send(data("a")).await.unwrap();
        assert_eq!(
            old.frame().await.unwrap().unwrap().into_data().unwrap(),
            "a"
        );
        let new = replay.body();
        tx.send(data("b")).await.unwrap();
        assert!(
            old.frame().await.unwrap().is_err(),
            "the old try is superseded"
        );
        drop(tx);
        assert_eq!(collect(new).await.0, Bytes::from("ab"));
    }

    #[tokio::test]
    async fn past_the_limit_the_try_streams_on_but_nothing_can_be_sent_again() {
        let (tx, body) = channel();
        let replay = Replay::new(body, 8, "orders");
        tx.send(data("12345")).await.unwrap();
        tx.send(data("67890")).await.unwrap();
        tx.send(data("tail")).await.unwrap();
        drop(tx);
        assert_eq!(
            collect(replay.body()).await.0,
            Bytes::from("1234567890tail")
        );
        assert!(!replay.replayable() && !replay.complete());
    }

    #[tokio::test]
    async fn an_error_from_the_app_reaches_every_try() {
        let (tx, body) = channel();
        let replay = Replay::new(body, 64, "orders");
        tx.send(data("a")).await.unwrap();
        tx.send(Err("client went away".into())).await.unwrap();
        assert!(replay.body().collect().await.is_err());
        assert!(replay.body().collect().await.is_err());
        assert!(!replay.complete());
    }

    #[tokio::test]
    async fn an_empty_body_is_complete_at_once() {
        let replay = Replay::new(Body::default(), 64, "orders");
        assert_eq!(collect(replay.body()).await.0, Bytes::new());
        assert!(replay.complete());
    }
}
