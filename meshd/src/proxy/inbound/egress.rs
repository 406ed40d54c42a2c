//! The egress gateway's side of an ExternalService: a mesh caller's mTLS connection that
//! names the service through this host's gateway (see [`mesh_api::policy::egress_sni`]) is
//! checked (this host runs that gateway, and the service leaves through it), authorized by the
//! caller's identity against the policies that select the ExternalService by name — per
//! request for HTTP, per connection (and on every policy change) for TCP — and sent to the
//! service with TLS originated here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use mesh_api::policy::{ExternalProtocol, ExternalService};
use mesh_api::{Identity, ServiceKey};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use super::super::copy;
use super::super::shared::Shared;
use super::{decide, http, tcp};
use crate::config::{Protocol, Service};

/// Serves one caller of `service` through `gateway` until the connection ends.
pub async fn serve(
    tls_stream: TlsStream<TcpStream>,
    caller: Identity,
    service: &ServiceKey,
    gateway: &ServiceKey,
    peer: SocketAddr,
    shared: &Shared,
    started: Instant,
) {
    let refuse = |reason: &'static str, why: String| {
        copy::reset(tls_stream.get_ref().0);
        decide::reject(shared, peer, reason, &why);
    };
    if !shared.config().gateway.names.contains(gateway) {
        return refuse(
            "unknown_service",
            format!("gateway {gateway} does not run on this node"),
        );
    }
    let compiled = shared.compiled();
    let (Some(spec), Some(client)) = (
        compiled.external(service).cloned(),
        compiled.external_client(service).cloned(),
    ) else {
        return refuse(
            "unknown_service",
            format!("{service} is no ExternalService"),
        );
    };
    if spec.egress_gateway.as_ref() != Some(&gateway.name) {
        return refuse(
            "not_egress_gateway",
            format!("{service} does not leave the mesh through gateway {gateway}"),
        );
    }
    drop(compiled);
    let local = stand_in(service, &spec);
    let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(mesh_runtime::tls::ALPN_MESH_H2);
    match (h2, spec.protocol) {
        (true, ExternalProtocol::Http) => {
            http::serve_egress(tls_stream, caller, &local, client, peer, shared).await;
        }
        (false, ExternalProtocol::Tcp) => {
            let connect = || async move {
                let dialed = client.dialer.dial().await;
                dialed
                    .map(|(io, _)| io)
                    .map_err(|e| (e.reason(), e.to_string()))
            };
            tcp::serve_to(
                tls_stream,
                Some(&caller),
                &local,
                peer,
                shared,
                started,
                connect,
            )
            .await;
        }
        _ => refuse(
            "protocol_mismatch",
            format!(
                "{service} is {}; the caller asked for {}",
                spec.protocol,
                if h2 { "http" } else { "tcp" }
            ),
        ),
    }
}

/// The local service that stands for `service` on the inbound path: what policy, metrics and
/// the access log know it by. Its address is only read for its port (`ports` in policy).
fn stand_in(service: &ServiceKey, spec: &Arc<ExternalService>) -> Service {
    let address = (spec.endpoints.first()).map_or_else(
        || SocketAddr::from(([0, 0, 0, 0], spec.port)),
        |e| e.address,
    );
    Service {
        key: service.clone(),
        address: SocketAddr::new(address.ip(), spec.port),
        listen: None,
        protocol: match spec.protocol {
            ExternalProtocol::Http => Protocol::Http,
            ExternalProtocol::Tcp => Protocol::Tcp,
        },
        labels: Default::default(),
        upstreams: Vec::new(),
        http_proxy: None,
        checks: Vec::new(),
        file: PathBuf::from(format!(
            "ExternalService/{}/{}",
            service.namespace, service.name
        )),
    }
}
