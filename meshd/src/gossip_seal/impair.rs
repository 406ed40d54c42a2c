//! A fault layer under the sealed socket, for the gossip scenario tests: it decides, per sealed
//! datagram, whether it leaves now, is lost, or leaves later (so datagrams also reorder). meshd
//! never sets one; with none, sending is exactly the production path.

use std::net::SocketAddr;
use std::time::Duration;

/// What happens to one sealed datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Sent now.
    Deliver,
    /// Never sent (as UDP loses it: the sender sees a send).
    Drop,
    /// Sent after this long, sealed as it was (its counter and send time age meanwhile).
    Delay(Duration),
}

/// Decides the fate of each datagram from `from` to `to`.
pub trait Impairment: Send + Sync + 'static {
    /// The fate of the next datagram on this directed link.
    fn fate(&self, from: SocketAddr, to: SocketAddr) -> Fate;
}
