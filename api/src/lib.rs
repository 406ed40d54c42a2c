//! mesh-api: the vocabulary every meshd component shares — identities and names, join tokens,
//! the gossip key schema, and the registry wire protocol (generated code is committed).

pub mod gossip;
pub mod gossip_key;
pub mod identity;
pub mod name;
pub mod observe;
pub mod policy;
pub mod proto;
pub mod token;

pub use identity::{Identity, TrustDomain};
pub use name::{Label, NodeName, ServiceKey};
pub use policy::path;
