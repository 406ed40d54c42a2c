//! The text `meshd dev` prints once the mesh works: what runs where, commands to try, logs.

use std::path::Path;

use super::Bins;
use super::layout::{self, Layout};
use super::procs::Procs;

/// Prints the walk-through to stdout.
pub(super) fn print(layout: &Layout, bins: &Bins, procs: &Procs, removed_on_exit: bool) {
    let pid = |name: &str| {
        procs
            .get(name)
            .map_or_else(|| "?".to_owned(), |p| p.pid.to_string())
    };
    let dir = layout.dir.display();
    println!();
    println!(
        "The mesh (trust domain {}), files in {dir}{}:",
        layout::TRUST_DOMAIN,
        if removed_on_exit {
            " (removed on exit)"
        } else {
            ""
        }
    );
    println!(
        "  registry  grpc {}  admin {}  pid {}",
        layout.registry,
        layout.registry_admin,
        pid("registry")
    );
    for n in &layout.nodes {
        println!(
            "  {:<3} meshd  gossip {}  inbound {}  admin {}  pid {}",
            n.name,
            n.gossip,
            n.inbound,
            n.admin,
            pid(&format!("{} meshd", n.name))
        );
        let upstream = n
            .upstream
            .map(|u| format!(", calls api through {u}"))
            .unwrap_or_default();
        println!(
            "      {} ({}) demo-app on {}{upstream}",
            n.service,
            n.version(),
            n.app
        );
    }

    let web = &layout.nodes[0];
    let up = web.upstream.map(|u| u.to_string()).unwrap_or_default();
    let api = &layout.nodes[1];
    let victim = &layout.nodes[layout.nodes.len() - 1];
    let meshd = show(&bins.meshd);
    let meshctl = if bins.meshctl.is_file() {
        show(&bins.meshctl)
    } else {
        "meshctl".to_owned()
    };
    let admin_dir = layout.admin_dir();
    println!();
    println!("Try it:");
    try_cmd(
        &format!("curl http://{up}/"),
        &[
            "web's upstream to api: meshd on n1 sends each request over mTLS to an api",
            "instance, round robin (DestinationPolicy api): \"hello from api on n2\", then n3, ...",
        ],
    );
    try_cmd(
        &format!("curl -i http://{up}/admin"),
        &[
            "403 from api's meshd: AuthorizationPolicy api-no-admin denies /admin, and the body",
            "says so; api also admits only web and the gateway (api-from-web-and-the-gateway)",
        ],
    );
    if layout
        .nodes
        .iter()
        .any(|n| n.service == "api" && n.version() == "v2")
    {
        try_cmd(
            &format!("curl -H 'x-canary: 1' http://{up}/"),
            &["Route api sends canary requests to subset v2 (the v2 nodes) only"],
        );
    }
    try_cmd(
        &format!(
            "curl http://{}/ ; curl http://{}/api/orders",
            layout.gateway, layout.gateway
        ),
        &[
            "the ingress gateway on n1 (Gateway public, Route edge): the site to web, /api/ to",
            "api, called with the gateway's own identity",
        ],
    );
    try_cmd(
        &format!(
            "{meshctl} --credentials {} get gateway public -o wide",
            admin_dir.display()
        ),
        &["the gateway's listeners and the Routes attached to each (or why not)"],
    );
    try_cmd(
        &format!(
            "$EDITOR {} && {meshctl} --credentials {} apply -f {}",
            layout.policy_file().display(),
            admin_dir.display(),
            layout.policy_file().display()
        ),
        &["change the routes or the authorization: every node follows within a second"],
    );
    try_cmd(
        &format!("curl http://{}/metrics", web.admin),
        &["n1's Prometheus metrics; also /ready, /members and /config_dump"],
    );
    try_cmd(
        &format!("{meshd} members --admin {}", web.admin),
        &["the members and api endpoints n1 sees"],
    );
    try_cmd(
        &format!("{meshctl} --credentials {} nodes", admin_dir.display()),
        &["the nodes the registry gave an identity to (and `certs` for certificates)"],
    );
    try_cmd(
        &format!("curl http://{}/", api.inbound),
        &[
            "fails: an inbound port speaks only mTLS with members of the mesh; meshd answers",
            "plaintext with a TLS alert and closes (curl: \"Received HTTP/0.9\")",
        ],
    );
    try_cmd(
        &format!("kill {}", pid(&format!("{} meshd", victim.name))),
        &[
            &format!(
                "stops {}'s meshd: n1 drops it from `members` within seconds",
                victim.name
            ),
            "and sends every request to the api instances left",
        ],
    );
    println!();
    println!("Logs:");
    println!("  {}", layout.registry_log().display());
    for n in &layout.nodes {
        println!(
            "  {}  {}",
            layout.node_log(n).display(),
            layout.app_log(n).display()
        );
    }
    println!("Configs: {dir}/n*/meshd.toml and {dir}/n*/services.d/");
    println!();
}

fn try_cmd(cmd: &str, explain: &[&str]) {
    println!("  {cmd}");
    for l in explain {
        println!("      {l}");
    }
}

/// A path relative to the current directory when it is below it (`target/debug/meshd`).
fn show(p: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| p.strip_prefix(cwd).ok().map(Path::to_owned))
        .unwrap_or_else(|| p.to_owned())
        .display()
        .to_string()
}
