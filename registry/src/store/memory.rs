//! [`MemoryStore`]: the [`Store`] contract held in memory behind one mutex, for unit tests of
//! the layers above the store. Nothing survives a restart.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{CertRecord, Error, NodeRecord, Store, TokenRecord, consume_token, newest_certs};

/// An in-memory [`Store`] with the same semantics as [`super::SledStore`], minus durability.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    tokens: BTreeMap<String, TokenRecord>,
    nodes: BTreeMap<String, NodeRecord>,
    certs: BTreeMap<String, CertRecord>,
}

// === impl MemoryStore ===

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every operation checks before it mutates, so the state is consistent even if a
    /// holder panicked; recover from poisoning rather than fail every later call.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Store for MemoryStore {
    fn put_token(&self, token: &TokenRecord) -> Result<(), Error> {
        self.state().tokens.insert(token.id.clone(), token.clone());
        Ok(())
    }

    fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, Error> {
        Ok(self.state().tokens.get(id).cloned())
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>, Error> {
        Ok(self.state().tokens.values().cloned().collect())
    }

    fn join(
        &self,
        token_id: &str,
        now_unix: i64,
        node: &NodeRecord,
        cert: &CertRecord,
    ) -> Result<TokenRecord, Error> {
        let mut state = self.state();
        let token = state.tokens.get(token_id).ok_or(Error::TokenNotFound)?;
        let used = consume_token(token, now_unix)?;
        state.tokens.insert(token_id.to_owned(), used.clone());
        state.nodes.insert(node.name.clone(), node.clone());
        state.certs.insert(cert.serial.clone(), cert.clone());
        Ok(used)
    }

    fn put_node(&self, node: &NodeRecord) -> Result<(), Error> {
        self.state().nodes.insert(node.name.clone(), node.clone());
        Ok(())
    }

    fn get_node(&self, name: &str) -> Result<Option<NodeRecord>, Error> {
        Ok(self.state().nodes.get(name).cloned())
    }

    fn list_nodes(&self) -> Result<Vec<NodeRecord>, Error> {
        Ok(self.state().nodes.values().cloned().collect())
    }

    fn put_cert(&self, cert: &CertRecord) -> Result<(), Error> {
        self.state().certs.insert(cert.serial.clone(), cert.clone());
        Ok(())
    }

    fn list_certs(&self, limit: usize) -> Result<Vec<CertRecord>, Error> {
        let certs = self.state().certs.values().cloned().collect();
        Ok(newest_certs(certs, limit))
    }
}
