//! The topology renderings: table, JSON, DOT (checked by a small DOT reader), SVG's error when
//! Graphviz is missing, and `--window` parsing.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

fn edge(src: &str, dst: &str, proto: &str, mtls: bool) -> pb::Edge {
    pb::Edge {
        source: src.into(),
        destination: dst.into(),
        mtls,
        protocol: proto.into(),
        ..Default::default()
    }
}

/// An HTTP edge: `(requests, errors)`, requests/s and `(p50, p99)` in ms.
fn http(
    src: &str,
    dst: &str,
    mtls: bool,
    counts: (u64, u64),
    rps: f64,
    ms: (f64, f64),
) -> pb::Edge {
    let (reqs, errs) = counts;
    pb::Edge {
        requests: reqs,
        errors: errs,
        requests_per_second: rps,
        error_rate: if reqs == 0 {
            0.0
        } else {
            errs as f64 / reqs as f64
        },
        p50_ms: ms.0,
        p99_ms: ms.1,
        bytes: reqs * 100,
        ..edge(src, dst, "http", mtls)
    }
}

/// web → api (mTLS), external → web (plaintext), api → db (TCP), out of order on purpose.
fn sample() -> pb::Topology {
    pb::Topology {
        window_seconds: 300,
        edges: vec![
            pb::Edge {
                requests: 40,
                errors: 1,
                requests_per_second: 0.133,
                error_rate: 0.025,
                bytes: 9_000,
                ..edge("shop/api", "shop/db", "tcp", true)
            },
            http(
                "shop/web",
                "shop/api",
                true,
                (36_000, 36),
                120.0,
                (12.5, 230.0),
            ),
            http(
                "external",
                "shop/web",
                false,
                (3_000, 0),
                10.0,
                (0.8, 1_250.0),
            ),
        ],
    }
}

#[test]
fn table_has_one_sorted_row_per_edge_and_shouts_plaintext() {
    assert_eq!(
        table(&sample()),
        "\
SOURCE     DESTINATION   SITE   PROTO   MTLS        RPS    ERRORS   P50     P99
external   shop/web      -      http    PLAINTEXT   10.0   0%       0.8ms   1.25s
shop/api   shop/db       -      tcp     mtls        0.13   2.50%    -       -
shop/web   shop/api      -      http    mtls        120    0.10%    12ms    230ms
"
    );
    assert_eq!(
        table(&pb::Topology::default()),
        "SOURCE   DESTINATION   SITE   PROTO   MTLS   RPS   ERRORS   P50   P99\n"
    );
}

#[test]
fn sorting_is_by_endpoints_then_protocol_then_mtls_first_and_stable() {
    let mut a = edge("a", "b", "http", false);
    a.requests = 1;
    let mut a2 = edge("a", "b", "http", false);
    a2.requests = 2;
    let t = pb::Topology {
        window_seconds: 60,
        edges: vec![
            edge("b", "a", "http", true),
            a,
            edge("a", "b", "tcp", true),
            edge("a", "b", "http", true),
            a2,
        ],
    };
    let order: Vec<(String, String, String, bool, u64)> = sorted_edges(&t)
        .into_iter()
        .map(|e| {
            (
                e.source.clone(),
                e.destination.clone(),
                e.protocol.clone(),
                e.mtls,
                e.requests,
            )
        })
        .collect();
    let o = |s: &str, d: &str, p: &str, m, r| (s.to_owned(), d.to_owned(), p.to_owned(), m, r);
    assert_eq!(
        order,
        [
            o("a", "b", "http", true, 0),
            o("a", "b", "http", false, 1),
            o("a", "b", "http", false, 2),
            o("a", "b", "tcp", true, 0),
            o("b", "a", "http", true, 0),
        ]
    );
}

#[test]
fn json_lists_the_edges_as_objects_with_null_latency_for_tcp() {
    let v: Value = serde_json::from_str(&json(&sample())).unwrap();
    assert_eq!(v["window_seconds"], 300);
    let edges = v["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 3);
    assert_eq!(
        edges[2],
        json!({
            "source": "shop/web", "destination": "shop/api", "destination_site": null,
            "protocol": "http", "mtls": true,
            "requests": 36_000, "errors": 36, "requests_per_second": 120.0, "error_rate": 0.001,
            "p50_ms": 12.5, "p99_ms": 230.0, "bytes": 3_600_000,
        })
    );
    assert_eq!(edges[1]["protocol"], "tcp");
    assert!(edges[1]["p50_ms"].is_null() && edges[1]["p99_ms"].is_null());
    assert_eq!(edges[0]["mtls"], false);
    let empty: Value = serde_json::from_str(&json(&pb::Topology::default())).unwrap();
    assert_eq!(empty["edges"], json!([]));
}

// === a small DOT reader, enough to check what `dot` emits ===

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// A quoted string, unescaped.
    Str(String),
    /// A bare id or keyword.
    Id(String),
    /// `{ } [ ] ; , =` or `->`.
    Sym(&'static str),
}

fn lex(text: &str) -> Vec<Tok> {
    let mut toks = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            '"' => {
                let mut s = String::new();
                loop {
                    match chars.next().expect("unterminated string") {
                        '\\' => {
                            let next = chars.next().expect("escape at the end");
                            if next != '"' && next != '\\' {
                                s.push('\\');
                            }
                            s.push(next);
                        }
                        '"' => break,
                        '\n' => panic!("raw newline in a string"),
                        c => s.push(c),
                    }
                }
                toks.push(Tok::Str(s));
            }
            '-' => {
                assert_eq!(chars.next(), Some('>'), "only -> in a digraph");
                toks.push(Tok::Sym("->"));
            }
            '{' => toks.push(Tok::Sym("{")),
            '}' => toks.push(Tok::Sym("}")),
            '[' => toks.push(Tok::Sym("[")),
            ']' => toks.push(Tok::Sym("]")),
            ';' => toks.push(Tok::Sym(";")),
            ',' => toks.push(Tok::Sym(",")),
            '=' => toks.push(Tok::Sym("=")),
            c if c.is_ascii_alphanumeric() || c == '_' || c == '.' => {
                let mut s = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_ascii_alphanumeric() || n == '_' || n == '.' {
                        s.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                toks.push(Tok::Id(s));
            }
            c => panic!("unexpected {c:?} outside a string"),
        }
    }
    toks
}

/// Node ids declared, and edges with their attributes; panics on anything malformed.
#[derive(Debug, Default)]
struct Graph {
    nodes: BTreeSet<String>,
    edges: Vec<(String, String, BTreeMap<String, String>)>,
}

fn parse_dot(text: &str) -> Graph {
    let toks = lex(text);
    let mut depth = 0i32;
    for t in &toks {
        match t {
            Tok::Sym("{") => depth += 1,
            Tok::Sym("}") => depth -= 1,
            _ => {}
        }
        assert!(depth >= 0, "a brace closes before it opens");
    }
    assert_eq!(depth, 0, "braces are balanced");
    assert_eq!(toks[0], Tok::Id("digraph".into()));
    let open = toks.iter().position(|t| *t == Tok::Sym("{")).unwrap();
    assert_eq!(toks.last(), Some(&Tok::Sym("}")));
    let body = &toks[open + 1..toks.len() - 1];
    let mut g = Graph::default();
    for stmt in body
        .split(|t| *t == Tok::Sym(";"))
        .filter(|s| !s.is_empty())
    {
        let (head, attrs) = match stmt.iter().position(|t| *t == Tok::Sym("[")) {
            Some(i) => {
                assert_eq!(stmt.last(), Some(&Tok::Sym("]")), "{stmt:?}");
                (&stmt[..i], attributes(&stmt[i + 1..stmt.len() - 1]))
            }
            None => (stmt, BTreeMap::new()),
        };
        let id = |t: &Tok| match t {
            Tok::Str(s) | Tok::Id(s) => s.clone(),
            Tok::Sym(s) => panic!("{s} where an id belongs in {stmt:?}"),
        };
        match head {
            [Tok::Id(k)] if ["graph", "node", "edge"].contains(&k.as_str()) => {}
            [n] => {
                g.nodes.insert(id(n));
            }
            [a, Tok::Sym("->"), b] => g.edges.push((id(a), id(b), attrs)),
            other => panic!("not a statement: {other:?}"),
        }
    }
    g
}

fn attributes(toks: &[Tok]) -> BTreeMap<String, String> {
    toks.split(|t| *t == Tok::Sym(","))
        .map(|kv| match kv {
            [Tok::Id(k), Tok::Sym("="), Tok::Str(v) | Tok::Id(v)] => (k.clone(), v.clone()),
            other => panic!("not an attribute: {other:?}"),
        })
        .collect()
}

#[test]
fn dot_is_a_digraph_with_every_endpoint_declared() {
    let text = dot(&sample());
    let g = parse_dot(&text);
    assert_eq!(
        g.nodes,
        BTreeSet::from(["external", "shop/api", "shop/db", "shop/web"].map(String::from))
    );
    assert_eq!(g.edges.len(), 3);
    for (a, b, _) in &g.edges {
        assert!(g.nodes.contains(a) && g.nodes.contains(b), "{a} -> {b}");
    }
    let find = |a: &str, b: &str| {
        &(g.edges.iter())
            .find(|(x, y, _)| x == a && y == b)
            .unwrap_or_else(|| panic!("no edge {a} -> {b}"))
            .2
    };
    let plain = find("external", "shop/web");
    assert_eq!(plain["color"], "red");
    assert_eq!(plain["style"], "dashed");
    assert_eq!(
        plain["label"],
        "PLAINTEXT http\\n10.0 rps · 0% err · p99 1.25s"
    );
    let mtls = find("shop/web", "shop/api");
    assert_eq!(mtls["style"], "solid");
    assert!(!mtls.contains_key("color"), "{mtls:?}");
    assert_eq!(
        mtls["label"],
        "🔒 mtls http\\n120 rps · 0.10% err · p99 230ms"
    );
    let tcp = find("shop/api", "shop/db");
    assert_eq!(
        tcp["label"], "🔒 mtls tcp\\n0.13 rps · 2.50% err",
        "no p99 for TCP"
    );
    assert!(
        text.contains("\"external\" [shape=ellipse, style=dashed];"),
        "{text}"
    );
    assert!(text.contains("label=\"mesh topology, last 5m\""), "{text}");
}

#[test]
fn dot_quotes_ids_that_would_break_it() {
    let t = pb::Topology {
        window_seconds: 60,
        edges: vec![http(
            "ns/we\"ird",
            "ns/back\\slash",
            true,
            (1, 0),
            1.0,
            (1.0, 1.0),
        )],
    };
    let text = dot(&t);
    let g = parse_dot(&text);
    assert_eq!(
        g.nodes,
        BTreeSet::from(["ns/we\"ird".to_owned(), "ns/back\\slash".to_owned()])
    );
    assert_eq!(g.edges[0].0, "ns/we\"ird");
    let empty = parse_dot(&dot(&pb::Topology::default()));
    assert!(empty.nodes.is_empty() && empty.edges.is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn svg_without_graphviz_names_the_package() {
    let err = svg(&dot(&sample()), "meshctl-test-no-such-dot-program")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::GraphvizMissing { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("`meshctl-test-no-such-dot-program` was not found")
            && text.contains("graphviz"),
        "{text}"
    );
}

#[test]
fn windows() {
    assert_eq!(parse_window("5m"), Ok(DEFAULT_WINDOW));
    assert_eq!(parse_window("90s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_window("1h"), Ok(Duration::from_secs(3600)));
    for bad in ["", "5", "soon", "500ms", "0s"] {
        let e = parse_window(bad).unwrap_err();
        assert!(e.contains("e.g. 90s, 5m or 1h"), "{bad:?}: {e}");
    }
}

#[test]
fn numbers_for_people() {
    for (rps, want) in [
        (0.0, "0"),
        (0.004, "<0.01"),
        (0.42, "0.42"),
        (12.34, "12.3"),
        (1234.4, "1234"),
    ] {
        assert_eq!(rate(rps), want, "{rps}");
    }
    for (v, want) in [(0.84, "0.8ms"), (45.4, "45ms"), (1250.0, "1.25s")] {
        assert_eq!(ms(v), want, "{v}");
    }
    for (reqs, errs, want) in [
        (0, 0, "0%"),
        (100, 0, "0%"),
        (100, 3, "3.00%"),
        (1_000_000, 1, "<0.01%"),
    ] {
        let e = http("a", "b", true, (reqs, errs), 0.0, (0.0, 0.0));
        assert_eq!(error_percent(&e), want, "{errs}/{reqs}");
    }
}

/// web calls api in its own site and in site `b` (through b's east-west gateway).
fn crossed() -> pb::Topology {
    let mut remote = http("shop/web", "shop/api", true, (10, 0), 1.0, (40.0, 90.0));
    remote.destination_site = "b".to_owned();
    pb::Topology {
        window_seconds: 60,
        edges: vec![
            remote,
            http("shop/web", "shop/api", true, (30, 0), 3.0, (2.0, 9.0)),
        ],
    }
}

#[test]
fn an_edge_that_crossed_a_site_names_it_everywhere() {
    let t = crossed();
    assert_eq!(
        table(&t),
        "\
SOURCE     DESTINATION   SITE   PROTO   MTLS   RPS    ERRORS   P50     P99
shop/web   shop/api      -      http    mtls   3.00   0%       2.0ms   9.0ms
shop/web   shop/api      b      http    mtls   1.00   0%       40ms    90ms
"
    );
    let v: Value = serde_json::from_str(&json(&t)).unwrap();
    assert!(v["edges"][0]["destination_site"].is_null());
    assert_eq!(v["edges"][1]["destination_site"], "b");
    let g = parse_dot(&dot(&t));
    assert_eq!(
        g.nodes,
        BTreeSet::from(["shop/api", "shop/api@b", "shop/web"].map(String::from))
    );
    let to_b = &(g.edges.iter())
        .find(|(a, b, _)| a == "shop/web" && b == "shop/api@b")
        .expect("an edge to b's instances")
        .2;
    assert_eq!(
        to_b["label"],
        "🔒 mtls http · to site b\\n1.00 rps · 0% err · p99 90ms"
    );
    assert!(dot(&t).contains("\"shop/api@b\" [peripheries=2];"));
}
