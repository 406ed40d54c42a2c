//! [`EtcdKv`]: the [`Kv`] contract on etcd v3, for registry replicas sharing one store. Every
//! key lives under a namespace (several meshes can share an etcd); revisions are etcd's own,
//! so a watch resumes at the revision any replica saw. Reads are linearizable. A watch asks
//! for progress notices and ends with [`Error::Compacted`] when etcd cancels it for a
//! compacted start, so the caller lists again at a new revision instead of jumping ahead.
//!
//! The wire layer is `pb`: the part of etcd's v3 gRPC API the registry speaks
//! (`proto/etcd.proto`, client generated with protox and committed; `tests/etcd_proto.rs`
//! keeps it fresh, `etcd/tests.rs` proves it against a real etcd).

use std::collections::VecDeque;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::log::{self};
use super::{
    Batch, Compare, Entry, Error, Event, Kv, Op, Revision, Snapshot, Txn, WatchStream, printable,
};

#[allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]
pub mod pb {
    include!("etcd/gen/etcdserverpb.rs");
}

#[cfg(test)]
pub(crate) mod tests;

use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::kv_client::KvClient;
use pb::watch_client::WatchClient;

const BACKEND: &str = "etcd";
/// Keys per page of a range: pages are read at one pinned revision.
const PAGE: i64 = 1000;
/// Longest wait for one request: a member that neither answers nor fails (a partition, a
/// stalled disk) must not hold a registry thread forever; the caller sees a backend error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One unary (or stream-opening) request, bounded by [`REQUEST_TIMEOUT`].
async fn bounded<T>(
    op: &'static str,
    request: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<Result<T, tonic::Status>, Error> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(answer) => Ok(answer.map(tonic::Response::into_inner)),
        Err(_) => Err(Error::Backend {
            backend: BACKEND,
            op,
            reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
        }),
    }
}

/// A [`Kv`] on an etcd cluster (the channel may balance over several endpoints).
#[derive(Clone)]
pub struct EtcdKv {
    channel: Channel,
    namespace: Vec<u8>,
}

fn backend(op: &'static str, status: &tonic::Status) -> Error {
    Error::Backend {
        backend: BACKEND,
        op,
        reason: format!("{}: {}", status.code(), status.message()),
    }
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix);
/// `\0` (every key) when there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn revision_of(header: Option<&pb::ResponseHeader>, op: &'static str) -> Result<Revision, Error> {
    let revision = header.map_or(-1, |h| h.revision);
    u64::try_from(revision).map_err(|_| Error::Backend {
        backend: BACKEND,
        op,
        reason: format!("answer without a valid revision ({revision})"),
    })
}

impl EtcdKv {
    /// Keys under `namespace` (for example `/meshd/<trust domain>/`) on the etcd behind
    /// `channel`. Each request is bounded here; an open watch is not (it is quiet while nothing
    /// changes), so the channel must carry HTTP/2 keep-alives to notice a dead member.
    pub fn new(channel: Channel, namespace: impl Into<Vec<u8>>) -> Self {
        Self {
            channel,
            namespace: namespace.into(),
        }
    }

    fn key(&self, key: &[u8]) -> Vec<u8> {
        [self.namespace.as_slice(), key].concat()
    }

    fn entry(&self, kv: pb::KeyValue) -> Result<(Vec<u8>, Entry), Error> {
        let Some(key) = kv.key.strip_prefix(self.namespace.as_slice()) else {
            return Err(Error::Corrupt {
                backend: BACKEND,
                what: "key outside the namespace",
                key: printable(&kv.key),
                reason: "etcd answered with a key not asked for".to_owned(),
            });
        };
        let revision = |r: i64| {
            u64::try_from(r).map_err(|_| Error::Corrupt {
                backend: BACKEND,
                what: "revision",
                key: printable(&kv.key),
                reason: format!("negative: {r}"),
            })
        };
        Ok((
            key.to_vec(),
            Entry {
                mod_revision: revision(kv.mod_revision)?,
                create_revision: revision(kv.create_revision)?,
                value: kv.value,
            },
        ))
    }

    fn compare(&self, compare: &Compare) -> pb::Compare {
        match compare {
            // An absent key has create revision 0.
            Compare::Absent(key) => pb::Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Create as i32,
                key: self.key(key),
                target_union: Some(TargetUnion::CreateRevision(0)),
            },
            Compare::ModRevision(key, revision) => pb::Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Mod as i32,
                key: self.key(key),
                // Revision 0 would match an absent key: no revision we hand out is 0 or this
                // large, so an impossible one keeps "exists at exactly" meaning that.
                target_union: Some(TargetUnion::ModRevision(
                    i64::try_from(*revision).unwrap_or(i64::MAX).max(-1),
                )),
            },
        }
    }

    fn op(&self, op: &Op) -> pb::RequestOp {
        use pb::request_op::Request;
        let request = match op {
            Op::Put(key, value) => Request::RequestPut(pb::PutRequest {
                key: self.key(key),
                value: value.clone(),
                lease: 0,
            }),
            Op::Delete(key) => Request::RequestDeleteRange(pb::DeleteRangeRequest {
                key: self.key(key),
                range_end: Vec::new(),
            }),
        };
        pb::RequestOp {
            request: Some(request),
        }
    }

    async fn range_page(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
        revision: i64,
    ) -> Result<pb::RangeResponse, Error> {
        let mut kv = KvClient::new(self.channel.clone());
        let request = kv.range(pb::RangeRequest {
            key: start,
            range_end: end,
            limit: PAGE,
            revision,
            ..Default::default()
        });
        bounded("range", request)
            .await?
            .map_err(|s| backend("range", &s))
    }
}

#[tonic::async_trait]
impl Kv for EtcdKv {
    async fn get(&self, key: &[u8]) -> Result<Option<Entry>, Error> {
        let mut kv = KvClient::new(self.channel.clone());
        let request = kv.range(pb::RangeRequest {
            key: self.key(key),
            ..Default::default()
        });
        let resp = bounded("get", request)
            .await?
            .map_err(|s| backend("get", &s))?;
        resp.kvs
            .into_iter()
            .next()
            .map(|kv| self.entry(kv).map(|(_, e)| e))
            .transpose()
    }

    async fn range(&self, prefix: &[u8]) -> Result<Snapshot, Error> {
        let full = self.key(prefix);
        let end = prefix_end(&full);
        let first = self.range_page(full, end.clone(), 0).await?;
        let revision = revision_of(first.header.as_ref(), "range")?;
        let mut entries = Vec::new();
        let mut page = first;
        loop {
            let more = page.more;
            let next = page.kvs.last().map(|kv| [kv.key.as_slice(), &[0]].concat());
            for kv in page.kvs {
                entries.push(self.entry(kv)?);
            }
            match next {
                // Later pages at the first page's revision: one consistent view.
                Some(next) if more => {
                    let pinned = i64::try_from(revision).unwrap_or(i64::MAX);
                    page = self.range_page(next, end.clone(), pinned).await?;
                }
                _ => break,
            }
        }
        Ok(Snapshot { revision, entries })
    }

    async fn txn(&self, txn: Txn) -> Result<Option<Revision>, Error> {
        log::check_size(BACKEND, &txn)?;
        let request = pb::TxnRequest {
            compare: txn.compares.iter().map(|c| self.compare(c)).collect(),
            success: txn.ops.iter().map(|o| self.op(o)).collect(),
            failure: Vec::new(),
        };
        let mut kv = KvClient::new(self.channel.clone());
        let resp = bounded("transaction", kv.txn(request))
            .await?
            .map_err(|s| backend("transaction", &s))?;
        if !resp.succeeded {
            return Ok(None);
        }
        revision_of(resp.header.as_ref(), "transaction").map(Some)
    }

    async fn revision(&self) -> Result<Revision, Error> {
        // A linearizable count of one key: the header carries the store's revision.
        let mut kv = KvClient::new(self.channel.clone());
        let request = kv.range(pb::RangeRequest {
            key: self.key(b""),
            count_only: true,
            ..Default::default()
        });
        let resp = bounded("revision", request)
            .await?
            .map_err(|s| backend("revision", &s))?;
        revision_of(resp.header.as_ref(), "revision")
    }

    async fn watch(&self, prefix: &[u8], after: Revision) -> Result<WatchStream, Error> {
        let full = self.key(prefix);
        let create = pb::WatchCreateRequest {
            range_end: prefix_end(&full),
            key: full,
            start_revision: i64::try_from(after.saturating_add(1)).unwrap_or(i64::MAX),
            progress_notify: true,
            fragment: true,
            ..Default::default()
        };
        let (tx, rx) = mpsc::channel(1);
        tx.send(pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)),
        })
        .await
        .map_err(|_| Error::Backend {
            backend: BACKEND,
            op: "watch",
            reason: "request channel closed".to_owned(),
        })?;
        let mut client = WatchClient::new(self.channel.clone());
        let responses = bounded("watch", client.watch(ReceiverStream::new(rx)))
            .await?
            .map_err(|s| backend("watch", &s))?;
        Ok(Box::pin(
            Follow::new(self.clone(), after, tx).stream(responses),
        ))
    }

    async fn compact(&self, revision: Revision) -> Result<(), Error> {
        // etcd keeps the revision it compacts at; ours forgets it too: compact one later,
        // never beyond the present (etcd refuses a future revision).
        let current = self.revision().await?;
        let at = revision.saturating_add(1).min(current);
        let mut kv = KvClient::new(self.channel.clone());
        let request = kv.compact(pb::CompactionRequest {
            revision: i64::try_from(at).unwrap_or(i64::MAX),
            physical: true,
        });
        match bounded("compact", request).await? {
            Ok(_) => Ok(()),
            // Already compacted there or beyond: nothing to do.
            Err(s) if s.message().contains("compacted") => Ok(()),
            Err(s) => Err(backend("compact", &s)),
        }
    }
}

/// Turns etcd's watch responses into [`Batch`]es: the events of one revision (which etcd
/// may split into fragments) as one batch, progress notices skipped, a cancellation as the
/// error it means.
struct Follow {
    kv: EtcdKv,
    after: Revision,
    /// Held so the request side stays open (closing it ends etcd's watch stream).
    _requests: mpsc::Sender<pb::WatchRequest>,
    /// Events of a revision not yet complete (a fragmented response).
    partial: Vec<Event>,
    partial_revision: Revision,
    ready: VecDeque<Batch>,
    done: bool,
}

impl Follow {
    fn new(kv: EtcdKv, after: Revision, requests: mpsc::Sender<pb::WatchRequest>) -> Self {
        Self {
            kv,
            after,
            _requests: requests,
            partial: Vec::new(),
            partial_revision: 0,
            ready: VecDeque::new(),
            done: false,
        }
    }

    fn flush(&mut self) {
        if !self.partial.is_empty() {
            self.after = self.partial_revision;
            self.ready.push_back(Batch {
                revision: self.partial_revision,
                events: std::mem::take(&mut self.partial),
            });
        }
    }

    /// Takes in one response: complete batches go to `ready`.
    fn absorb(&mut self, resp: pb::WatchResponse) -> Result<(), Error> {
        if resp.canceled {
            return Err(if resp.compact_revision > 0 {
                // etcd keeps its compaction revision; the history before it is gone.
                let compacted = u64::try_from(resp.compact_revision - 1).unwrap_or(0);
                Error::Compacted {
                    after: self.after,
                    compacted,
                }
            } else {
                Error::Backend {
                    backend: BACKEND,
                    op: "watch",
                    reason: format!("cancelled by etcd: {}", resp.cancel_reason),
                }
            });
        }
        for event in resp.events {
            let Some(kv) = event.kv else { continue };
            let deleted = event.r#type == pb::event::EventType::Delete as i32;
            let (key, entry) = self.kv.entry(kv)?;
            let revision = entry.mod_revision;
            if revision <= self.after {
                continue;
            }
            if revision != self.partial_revision {
                self.flush();
                self.partial_revision = revision;
            }
            self.partial.push(if deleted {
                Event::Delete {
                    key,
                    mod_revision: revision,
                }
            } else {
                Event::Put { key, entry }
            });
        }
        if !resp.fragment {
            self.flush();
        }
        Ok(())
    }

    fn stream(
        self,
        responses: tonic::Streaming<pb::WatchResponse>,
    ) -> impl futures::Stream<Item = Result<Batch, Error>> + Send {
        futures::stream::unfold((self, responses), |(mut st, mut responses)| async move {
            loop {
                if let Some(batch) = st.ready.pop_front() {
                    return Some((Ok(batch), (st, responses)));
                }
                if st.done {
                    return None;
                }
                let resp = match responses.next().await {
                    Some(Ok(resp)) => resp,
                    Some(Err(s)) => {
                        st.done = true;
                        return Some((Err(backend("watch", &s)), (st, responses)));
                    }
                    None => return None,
                };
                if let Err(e) = st.absorb(resp) {
                    st.done = true;
                    st.ready.clear();
                    return Some((Err(e), (st, responses)));
                }
            }
        })
    }
}
