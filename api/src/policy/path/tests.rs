use proptest::prelude::*;

use super::*;

fn opts(normalization: Normalization) -> Options {
    Options {
        normalization,
        escaped_slashes: EscapedSlashes::Reject,
    }
}

fn norm(p: &str, n: Normalization) -> Result<String, Rejected> {
    normalize(p, opts(n)).map(Cow::into_owned)
}

#[test]
fn the_bypass_spellings_of_admin_are_admin() {
    for raw in [
        "/admin",
        "//admin",
        "/./admin",
        "/x/../admin",
        "/%61dmin",
        "/%61%64%6D%69%6e",
        "/x/%2e%2e/admin",
        "/x/%2E./admin",
        "/../admin",
        "/../../admin",
        "/.//admin",
        "/x\\..\\admin",
        "///admin",
    ] {
        assert_eq!(
            norm(raw, Normalization::MergeSlashes).as_deref(),
            Ok("/admin"),
            "{raw}"
        );
    }
}

#[test]
fn modes_table() {
    use Normalization::*;
    let cases: &[(&str, Normalization, Result<&str, Rejected>)] = &[
        ("/a//b", None, Ok("/a//b")),
        ("/a/../b", None, Ok("/a/../b")),
        ("/a%2Fb", None, Ok("/a%2Fb")),
        ("/a//b", Base, Ok("/a//b")),
        ("/a/./b/../c", Base, Ok("/a/c")),
        ("/a//b/../c", Base, Ok("/a//c")),
        ("/a//b", MergeSlashes, Ok("/a/b")),
        ("/a/b/", MergeSlashes, Ok("/a/b/")),
        ("/a/b//", MergeSlashes, Ok("/a/b/")),
        ("/a/b/.", MergeSlashes, Ok("/a/b/")),
        ("/a/b/..", MergeSlashes, Ok("/a/")),
        ("/", MergeSlashes, Ok("/")),
        ("//", MergeSlashes, Ok("/")),
        ("*", MergeSlashes, Ok("*")),
        ("/...", MergeSlashes, Ok("/...")),
        ("/.well-known/x", MergeSlashes, Ok("/.well-known/x")),
        ("/a%2fb", MergeSlashes, Err(Rejected::EscapedSlash)),
        ("/a%5Cb", Base, Err(Rejected::EscapedSlash)),
        ("/a%2fb", DecodeAndMergeSlashes, Ok("/a/b")),
        ("/a%5c%5cb", DecodeAndMergeSlashes, Ok("/a/b")),
        ("/a%2F..%2Fadmin", DecodeAndMergeSlashes, Ok("/admin")),
        ("/a%zz", MergeSlashes, Err(Rejected::BadEscape)),
        ("/a%4", MergeSlashes, Err(Rejected::BadEscape)),
        ("/a%", MergeSlashes, Err(Rejected::BadEscape)),
        ("/a%00b", MergeSlashes, Err(Rejected::ControlCharacter)),
        (
            "/a%0d%0aX: y",
            MergeSlashes,
            Err(Rejected::ControlCharacter),
        ),
        ("admin", MergeSlashes, Err(Rejected::NotOriginForm)),
        ("\\admin", MergeSlashes, Err(Rejected::NotOriginForm)),
        ("", MergeSlashes, Err(Rejected::NotOriginForm)),
        // Reserved characters stay escaped, with upper-case hex.
        ("/a%3fb", MergeSlashes, Ok("/a%3Fb")),
        ("/a%25b", MergeSlashes, Ok("/a%25b")),
        ("/caf%C3%A9", MergeSlashes, Ok("/caf%C3%A9")),
        ("/café/../x", MergeSlashes, Ok("/x")),
        ("/%7euser", MergeSlashes, Ok("/~user")),
    ];
    for (raw, mode, want) in cases {
        assert_eq!(
            norm(raw, *mode).as_deref().map_err(|e| *e),
            *want,
            "{raw} under {mode}"
        );
    }
}

#[test]
fn escaped_slashes_kept_when_asked() {
    let keep = Options {
        normalization: Normalization::MergeSlashes,
        escaped_slashes: EscapedSlashes::Keep,
    };
    assert_eq!(normalize("/a%2fb/../c", keep).unwrap(), "/c");
    assert_eq!(normalize("/a%2fb//c", keep).unwrap(), "/a%2Fb/c");
    assert_eq!(normalize("/a%5cb", keep).unwrap(), "/a%5Cb");
}

#[test]
fn each_rejection_has_its_reason() {
    for (r, want) in [
        (Rejected::EscapedSlash, "escaped_slash"),
        (Rejected::BadEscape, "bad_escape"),
        (Rejected::NotOriginForm, "bad_path"),
        (Rejected::ControlCharacter, "control_character"),
    ] {
        assert_eq!(r.reason(), want, "{r:?}");
    }
}

/// The fast path: which paths are recognized as already normal (and so borrowed unchanged).
#[test]
fn is_normal_table() {
    for (p, merge, want) in [
        ("/", true, true),
        ("/a/b", true, true),
        ("/a..", true, true),
        ("/a../b", true, true),
        ("/a.b/.c/..d", true, true),
        ("/a//b", false, true),
        ("/a//b", true, false),
        ("/a/./b", true, false),
        ("/a/../b", true, false),
        ("/a/.", true, false),
        ("/a/..", true, false),
        ("/a%2e", true, false),
        ("/a\\b", true, false),
    ] {
        assert_eq!(is_normal(p.as_bytes(), merge), want, "{p} (merge {merge})");
    }
}

#[test]
fn a_normal_path_is_borrowed() {
    for p in ["/", "/api/items", "/a.b/c..d/.e", "/a-b_c~d"] {
        assert!(matches!(
            normalize(p, Options::default()).unwrap(),
            Cow::Borrowed(_)
        ));
    }
}

fn any_mode() -> impl Strategy<Value = Options> {
    (
        prop::sample::select(<Normalization as crate::policy::decode::Choice>::ALL.to_vec()),
        prop::sample::select(vec![EscapedSlashes::Reject, EscapedSlashes::Keep]),
    )
        .prop_map(|(normalization, escaped_slashes)| Options {
            normalization,
            escaped_slashes,
        })
}

/// Paths built from the pieces that matter: slashes, dots, escapes (valid or not), letters.
fn path_like() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "/", "/", ".", "..", "a", "admin", "%2e", "%2E", "%2f", "%5C", "%61", "%", "%4", "%zz",
        "\\", "é", "%C3%A9", "%25", "~", "%7E",
    ]);
    prop::collection::vec(piece, 0..12).prop_map(|v| format!("/{}", v.concat()))
}

proptest! {
    #[test]
    fn normalizing_twice_changes_nothing(p in path_like(), o in any_mode()) {
        if let Ok(once) = normalize(&p, o) {
            let twice = normalize(&once, o).expect("a normalized path normalizes");
            prop_assert_eq!(&*twice, &*once);
        }
    }

    #[test]
    fn normalized_paths_have_no_dot_segments(p in path_like(), o in any_mode()) {
        prop_assume!(o.normalization != Normalization::None);
        if let Ok(n) = normalize(&p, o) {
            prop_assert!(n.starts_with('/'));
            prop_assert!(!n.contains('\\'));
            prop_assert!(!n.split('/').any(|s| s == "." || s == ".."), "{}", n);
            if o.normalization != Normalization::Base {
                prop_assert!(!n.contains("//"), "{}", n);
            }
            // No escape of an unreserved character survives.
            let lower = n.to_ascii_lowercase();
            for c in "abcdefghijklmnopqrstuvwxyz0123456789-._~".bytes() {
                let esc = format!("%{c:02x}");
                prop_assert!(!lower.contains(&esc), "{} holds {}", n, esc);
            }
        }
    }

    #[test]
    fn any_string_is_safe(p in ".*", o in any_mode()) {
        let _ = normalize(&p, o);
    }
}
