//! A request body that can be sent again: it streams the app's body to the first attempt while
//! keeping a copy of what passed (up to a limit), so a retry replays the copy and then goes on
//! reading the app's body where the failed attempt left it. Bodies larger than the limit
//! still stream; they just cannot be retried once past it.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::Body;

/// Bytes of a request body kept for retries.
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

struct State {
    /// The app's body, read by whichever attempt is current.
    inner: Body,
    /// Data frames seen so far (while not over the limit).
    chunks: Vec<Bytes>,
    buffered: usize,
    /// More than the limit passed: a retry could not resend the start.
    overflowed: bool,
    trailers: Option<HeaderMap>,
    /// The app's body has ended.
    done: bool,
}

/// One attempt's view of a replayable body.
pub struct ReplayBody {
    state: Arc<Mutex<State>>,
    /// Chunks of `state.chunks` this attempt has sent.
    replayed: usize,
    /// Trailers sent.
    trailers_sent: bool,
}

impl ReplayBody {
    /// Wraps the app's body.
    pub fn new(inner: Body) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                inner,
                chunks: Vec::new(),
                buffered: 0,
                overflowed: false,
                trailers: None,
                done: false,
            })),
            replayed: 0,
            trailers_sent: false,
        }
    }

    /// A body for another attempt, replaying everything read so far first; `None` once more
    /// than [`MAX_REPLAY_BYTES`] have passed.
    pub fn try_clone(&self) -> Option<Self> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (!st.overflowed).then(|| Self {
            state: self.state.clone(),
            replayed: 0,
            trailers_sent: false,
        })
    }
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        // Held for one poll: attempts run one after another, so there is no contention.
        let mut st = this.state.lock().unwrap_or_else(|e| e.into_inner());
        if this.replayed < st.chunks.len() {
            let chunk = st.chunks[this.replayed].clone();
            this.replayed += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if st.done {
            if !this.trailers_sent
                && let Some(t) = st.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut st.inner).poll_frame(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                st.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !st.overflowed {
                        st.buffered += data.len();
                        if st.buffered > MAX_REPLAY_BYTES {
                            st.overflowed = true;
                            st.chunks.clear();
                        } else {
                            st.chunks.push(data.clone());
                        }
                    }
                    if !st.overflowed {
                        this.replayed = st.chunks.len();
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    st.trailers = Some(t.clone());
                    st.done = true;
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.done && self.replayed >= st.chunks.len() && (st.trailers.is_none() || self.trailers_sent)
    }

    fn size_hint(&self) -> SizeHint {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.replayed == 0 && !st.overflowed {
            // Everything buffered plus what the app has still to send.
            let rest = st.inner.size_hint();
            let mut h = SizeHint::new();
            let buffered = st.buffered as u64;
            h.set_lower(buffered + rest.lower());
            if let Some(u) = rest.upper() {
                h.set_upper(buffered + u);
            }
            return h;
        }
        SizeHint::default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, StreamBody};

    fn body(chunks: Vec<&'static [u8]>, trailers: bool) -> Body {
        let mut frames: Vec<Result<Frame<Bytes>, hyper::Error>> = chunks
            .into_iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", "0".parse().unwrap());
            frames.push(Ok(Frame::trailers(t)));
        }
        StreamBody::new(futures::stream::iter(frames)).boxed()
    }

    async fn read_all(b: ReplayBody) -> (Vec<u8>, Option<HeaderMap>) {
        let c = b.collect().await.unwrap();
        let t = c.trailers().cloned();
        (c.to_bytes().to_vec(), t)
    }

    #[tokio::test]
    async fn a_retry_replays_what_was_read_and_continues() {
        let first = ReplayBody::new(body(vec![b"ab", b"cd", b"ef"], true));
        let second = first.try_clone().unwrap();
        // The first attempt reads one frame, then fails.
        let mut first = first;
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        drop(first);
        let (data, trailers) = read_all(second).await;
        assert_eq!(data, b"abcdef");
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
    }

    #[tokio::test]
    async fn a_complete_body_replays_whole() {
        let first = ReplayBody::new(body(vec![b"hello", b" world"], false));
        let second = first.try_clone().unwrap();
        let (a, _) = read_all(first).await;
        let (b, _) = read_all(second).await;
        assert_eq!(a, b"hello world");
        assert_eq!(b, b"hello world");
    }

    #[tokio::test]
    async fn over_the_limit_it_streams_but_cannot_be_retried() {
        static BIG: [u8; MAX_REPLAY_BYTES] = [7; MAX_REPLAY_BYTES];
        let first = ReplayBody::new(body(vec![&BIG, b"x"], false));
        let (a, _) = read_all(first.try_clone().unwrap()).await;
        assert_eq!(a.len(), MAX_REPLAY_BYTES + 1);
        assert!(first.try_clone().is_none());
    }
}
