//! Path normalization (`mesh_api::path::normalize`): what authorization, rate limits and routes
//! match on, and what the app is sent, for every request path from outside.
//!
//! The first input byte picks the options (the four modes × both `escaped_slashes`); the rest is
//! the path. Invariants: never panics; `none` returns the path as is; otherwise the result is a
//! fixed point (normalizing it again gives it back, borrowed), starts with `/` (or is `*`), and
//! holds no `.` or `..` segment, no `\`, no percent-encoded unreserved character, no lowercase or
//! malformed escape, no `//` when merging, and no escaped slash unless `keep` kept it; an
//! escaped slash is refused under `reject`.

#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use mesh_api::path::{EscapedSlashes, Normalization, Options, Rejected, normalize};

const MODES: [Normalization; 4] = [
    Normalization::None,
    Normalization::Base,
    Normalization::MergeSlashes,
    Normalization::DecodeAndMergeSlashes,
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(path) = std::str::from_utf8(rest) else {
        return;
    };
    let opts = Options {
        normalization: MODES[usize::from(selector & 3)],
        escaped_slashes: if selector & 4 == 0 {
            EscapedSlashes::Reject
        } else {
            EscapedSlashes::Keep
        },
    };
    let result = normalize(path, opts);
    if opts.normalization == Normalization::None {
        assert_eq!(result, Ok(Cow::Borrowed(path)));
        return;
    }
    let has_escaped_slash = escapes(path.as_bytes()).any(|b| b == b'/' || b == b'\\');
    let out = match result {
        Ok(out) => out,
        Err(Rejected::EscapedSlash) => {
            assert!(
                has_escaped_slash,
                "{path:?} refused for an escaped slash it lacks"
            );
            assert!(
                opts.normalization != Normalization::DecodeAndMergeSlashes
                    && opts.escaped_slashes == EscapedSlashes::Reject
            );
            return;
        }
        Err(Rejected::NotOriginForm) => {
            assert!(!path.starts_with('/') && path != "*");
            return;
        }
        Err(Rejected::BadEscape | Rejected::ControlCharacter) => return,
    };
    if opts.normalization != Normalization::DecodeAndMergeSlashes
        && opts.escaped_slashes == EscapedSlashes::Reject
    {
        assert!(!has_escaped_slash, "{path:?} passed with an escaped slash");
    }
    assert_eq!(
        normalize(&out, opts),
        Ok(Cow::Borrowed(&*out)),
        "not a fixed point: {path:?} → {out:?}"
    );
    if out == "*" {
        assert_eq!(path, "*");
        return;
    }
    let b = out.as_bytes();
    assert_eq!(b.first(), Some(&b'/'), "{path:?} → {out:?}");
    assert!(!b.contains(&b'\\'), "{path:?} → {out:?}");
    for segment in out.split('/') {
        assert!(segment != "." && segment != "..", "{path:?} → {out:?}");
    }
    if opts.normalization != Normalization::Base {
        assert!(!out.contains("//"), "{path:?} → {out:?}");
    }
    let mut i = 0;
    while let Some(at) = b[i..].iter().position(|c| *c == b'%') {
        let at = i + at;
        let hex = b.get(at + 1..at + 3).expect("complete escape");
        assert!(
            hex.iter()
                .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c)),
            "{path:?} → {out:?}: escape not in upper-case hex"
        );
        let byte = u8::from_str_radix(std::str::from_utf8(hex).expect("ascii"), 16).expect("hex");
        assert!(
            !(byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)),
            "{path:?} → {out:?}: unreserved character left encoded"
        );
        if byte == b'/' || byte == b'\\' {
            assert_eq!(opts.escaped_slashes, EscapedSlashes::Keep);
            assert_ne!(opts.normalization, Normalization::DecodeAndMergeSlashes);
        }
        i = at + 3;
    }
});

/// The bytes of the well-formed `%XX` escapes in `p`.
fn escapes(p: &[u8]) -> impl Iterator<Item = u8> + '_ {
    p.windows(3).filter(|w| w[0] == b'%').filter_map(|w| {
        let s = std::str::from_utf8(&w[1..]).ok()?;
        u8::from_str_radix(s, 16).ok()
    })
}
