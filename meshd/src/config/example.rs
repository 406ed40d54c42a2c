//! Commented sample files for packaging to ship (the node file and one service file); tests
//! keep them parsing and in step with the defaults.

/// A sample node file: every key, each set to its default unless marked as an example value.
pub const EXAMPLE_NODE_TOML: &str = r#"# meshd node configuration: /etc/meshd/meshd.toml
#
# Check it with `meshd check-config --config /etc/meshd/meshd.toml`.
# Durations are written like "200ms", "5s", "1m 30s". Relative paths are resolved
# against the directory of this file. Unknown keys are errors.

# This host's name in the mesh: DNS-style labels separated by dots. Required.
# (Example value.)
node_name = "node-1"

# Where this node runs. Lowercase letters, digits and '-'. A site is one gossip pool and one
# registry; a mesh of one site need not name it.
datacenter = "dc1"
zone = "default"
site = "default"

# State: the node identity, the trust bundle and the workload certificates.
data_dir = "/var/lib/meshd"

# One file per local service, named *.toml; other files are ignored.
services_dir = "/etc/meshd/services.d"

[registry]
# The registry as "host:port"; host may be a DNS name or IP address. Required.
# (Example value.)
address = "registry.mesh.internal:7700"
# One-time token for the first join; not read again once the node has its identity.
join_token_file = "/etc/meshd/join-token"
connect_timeout = "5s"
request_timeout = "10s"

[gossip]
# Membership gossip between nodes (UDP).
bind = "0.0.0.0:7946"
# Address other nodes use to reach this one. Required when bind is 0.0.0.0 or [::];
# otherwise it defaults to bind. (Example value.)
advertise = "10.0.0.5:7946"
# Nodes to contact first when joining, as "host:port" (any two or three long-lived
# nodes). Default: none, which only suits the first node of a mesh.
seeds = []
# Time between gossip rounds, from 10ms to 10s.
interval = "200ms"
# Separates clusters on a shared network. Default: the trust domain.
# cluster_id = "prod"
# Only during a rolling upgrade from a meshd without replay-protected sealing and signed
# gossip state: talk its format and use its unsigned state. Reopens both holes; default false.
# legacy_peers = false
# Gossip protocol, 2 (bounded digests, SWIM failure detection). Nodes speaking different
# protocols see each other dead: 1 only while upgrading from a meshd that speaks nothing else
# (roll out with protocol = 1 everywhere, then remove the line and roll again).
# protocol = 2

[inbound]
# mTLS listener for connections from other nodes to local services.
bind = "0.0.0.0:15008"
# Address other nodes use to reach this listener. Required when bind is 0.0.0.0 or [::];
# otherwise it defaults to bind. (Example value.)
advertise = "10.0.0.5:15008"
handshake_timeout = "10s"
# Most inbound connections served at once.
max_connections = 10000

[outbound]
# Time allowed to connect to another node on behalf of a local app.
connect_timeout = "5s"

[admin]
# Health, readiness, metrics and config dump. It has no authentication: keep it on loopback.
bind = "127.0.0.1:15000"
# An address other hosts can reach (e.g. for a Prometheus elsewhere) is refused unless this
# is true; check-config and `meshctl check` still warn about it.
allow_remote = false

[drain]
# On shutdown, time open connections get to finish before they are closed.
grace_period = "15s"

[gateway]
# Gateways this host runs ("namespace/name", e.g. "default/public"); none by default. An
# ingress gateway's listeners come from its Gateway resource; an egress gateway needs none
# (ExternalServices name it in `egress_gateway`). Each gateway's identity is the service named
# like it, which this host's join token must allow.
names = []

[telemetry]
# How often this node reports its state and per-edge traffic to the registry (topology, SLOs,
# `meshctl check`); 100ms to 60s.
report_interval = "10s"

[access_log]
# One event per HTTP request and TCP connection: to the journal (MESHD_* fields) under systemd,
# JSON lines on stdout otherwise. Reloadable.
enabled = true
# Only HTTP statuses >= 400 and failed connections.
errors_only = false
# Paths never logged, e.g. a load balancer's health checks.
exclude_paths = []

[tracing]
# OTLP/gRPC collector (http://host:port). Without it spans are not exported, but trace context
# (W3C traceparent, B3) is still continued and propagated.
# collector = "http://127.0.0.1:4317"
# Share of new traces sampled (requests that arrive with a decision keep it).
sampling = 0.01
"#;

/// A sample service file for `services_dir`.
pub const EXAMPLE_SERVICE_TOML: &str = r#"# A local service: /etc/meshd/services.d/web.toml
#
# One file per service that runs on this host. meshd accepts mTLS connections for it
# from other nodes and forwards them to `address`, and opens a local listener for each
# upstream the app calls. Unknown keys are errors.

# Service name: lowercase letters, digits and '-'. Required.
name = "web"
# Namespace: same rules. Default "default".
namespace = "default"

# Where the app listens on this host. Required.
address = "127.0.0.1:8080"

# Optional: an address where meshd itself accepts this service's callers, typically the
# one the app listened on before it moved behind meshd. Mesh clients may use it with mTLS;
# clients not yet in the mesh may send plaintext while a PeerAuthentication makes the
# service PERMISSIVE (STRICT, the default, closes them). No default: not opened.
# listen = "10.0.0.5:8080"

# "tcp" (bytes, the default), "http" (the app speaks HTTP/1.1), "http2" (HTTP/2 without
# TLS) or "grpc". For the HTTP family meshd proxies each request: authorization sees the
# method, path and headers, and a denied request gets 403.
protocol = "tcp"

# Free-form labels: names and values of letters, digits, '.', '_' and '-', up to 63 each.
[labels]
version = "v1"
team = "storefront"

# Optional: a local HTTP listener where the app reaches any HTTP, HTTP/2 or gRPC mesh
# service by name without declaring an upstream: use it as the app's HTTP proxy
# (HTTP_PROXY=http://127.0.0.1:15001, then http://api.mesh/ or http://api.payments.mesh/).
# http_proxy = "127.0.0.1:15001"

# Services the app calls. The app connects to `bind` (keep it on loopback), and meshd
# carries the connection over mTLS to a healthy instance of `service`
# ("name" or "namespace/name").
[[upstreams]]
service = "api"
bind = "127.0.0.1:9001"

[[upstreams]]
service = "payments/checkout"
bind = "127.0.0.1:9002"

# Health checks. The instance takes traffic once its checks pass; after
# `unhealthy_threshold` failures in a row callers stop sending it requests, after
# `healthy_threshold` passes it is back. Exactly one of http, tcp, grpc or command each.
[[checks]]
# GET on `address` (or a full "http://host:port/path"); passes on a status in expect_status.
http = "/healthz"
expect_status = "200-399"
interval = "10s"
timeout = "1s"
unhealthy_threshold = 3
healthy_threshold = 2

[[checks]]
# Connect to `address` (true) or to "host:port".
tcp = true
# grpc = ""        grpc.health.v1 Check on `address` ("" = the whole server)
# command = ["/usr/local/bin/check-web"]   exit code 0 passes; killed at the timeout
"#;
