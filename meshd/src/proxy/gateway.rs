//! The gateway role: the listeners of the Gateway resources this host runs (`[gateway] names`
//! in `meshd.toml`), opened, changed and closed as the resources change, each connection served
//! by its listener's protocol. Requests leave for the mesh with the gateway's own workload
//! identity, through the same endpoint path, retries and telemetry as an app's.

pub mod accept;
pub mod decide;
pub mod edge;
pub mod http;
pub mod listener;
pub mod proxy_protocol;
pub mod run;
pub mod sni;
pub mod terminate;

pub use accept::serve;
pub use listener::GatewayListener;
