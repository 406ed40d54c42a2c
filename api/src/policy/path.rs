//! Request path normalization: the one spelling of a path that authorization, rate limits and
//! route matching see, and that the app is sent — so `//admin`, `/./admin`, `/x/../admin` and
//! `/%61dmin` are all `/admin` to a policy that denies `/admin*` (the Envoy CVE-2019-9901 class
//! of bypass, where the proxy matched one spelling and the app resolved another).
//!
//! Set mesh-wide by `MeshConfig.path_normalization` (Istio's `meshConfig.pathNormalization`):
//!
//! | meshd | Istio | what happens |
//! | --- | --- | --- |
//! | `none` | `NONE` | the path is used and forwarded as received |
//! | `base` | `BASE` | RFC 3986: percent-encoded unreserved characters decoded (`%61` → `a`), other escapes' hex upper-cased, `\` read as `/`, dot segments removed (`/a/./b/../c` → `/a/c`) |
//! | `merge_slashes` (default) | `MERGE_SLASHES` | `base`, then runs of `/` merged (`//a///b` → `/a/b`) |
//! | `decode_and_merge_slashes` | `DECODE_AND_MERGE_SLASHES` | `%2F` and `%5C` decoded to `/` first, then `merge_slashes` |
//!
//! Escaped slashes (`%2F`, `%5C`, any case) are ambiguous — an app may or may not decode them
//! before splitting its path — so outside `decode_and_merge_slashes` and `none` they are
//! refused (400) unless `MeshConfig.escaped_slashes = "keep"` passes them through undecoded
//! (Envoy's `path_with_escaped_slashes_action`: `REJECT_REQUEST` here by default, `KEEP_UNCHANGED`
//! with `keep`). A malformed escape (`%4`, `%zz`) and a path that is neither origin-form (`/…`)
//! nor `*` are refused too. Only the path is normalized; the query is kept byte for byte.
//!
//! Pure and allocation-free for a path that is already normal (the common case): the scan
//! returns the input borrowed.

use std::borrow::Cow;

use super::decode::choice_enum;

choice_enum! {
    /// How request paths are normalized before policy and routing see them.
    pub enum Normalization {
        /// As received (Istio `NONE`).
        None = "none",
        /// RFC 3986 normalization (Istio `BASE`).
        Base = "base",
        /// `base`, then merged slashes (Istio `MERGE_SLASHES`; the default).
        MergeSlashes = "merge_slashes",
        /// Escaped slashes decoded, then `merge_slashes` (Istio `DECODE_AND_MERGE_SLASHES`).
        DecodeAndMergeSlashes = "decode_and_merge_slashes",
    }
}

choice_enum! {
    /// What happens to `%2F` / `%5C` in a path under `base` or `merge_slashes`.
    pub enum EscapedSlashes {
        /// Refused with 400 (the default).
        Reject = "reject",
        /// Passed through undecoded (policy sees them escaped too).
        Keep = "keep",
    }
}

/// The default path normalization (as Istio's recommended setting, not its `NONE` default).
pub const DEFAULT_NORMALIZATION: Normalization = Normalization::MergeSlashes;
/// The default handling of escaped slashes.
pub const DEFAULT_ESCAPED_SLASHES: EscapedSlashes = EscapedSlashes::Reject;

/// The normalization settings of one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The mode.
    pub normalization: Normalization,
    /// Escaped slashes under `base` / `merge_slashes`.
    pub escaped_slashes: EscapedSlashes,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            normalization: DEFAULT_NORMALIZATION,
            escaped_slashes: DEFAULT_ESCAPED_SLASHES,
        }
    }
}

/// Why a path was refused (answered with 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// `%2F` or `%5C` under a mode that does not decode them.
    #[error("the path holds an escaped slash (%2F or %5C), which this mesh refuses")]
    EscapedSlash,
    /// `%` not followed by two hex digits.
    #[error("the path holds a malformed percent escape")]
    BadEscape,
    /// Neither `/…` nor `*`.
    #[error("the path is not in origin form (it must start with '/')")]
    NotOriginForm,
    /// A decoded byte that may not appear in a path (a control character or NUL).
    #[error("the path decodes to a control character")]
    ControlCharacter,
}

impl Rejected {
    /// The `x-mesh-error` reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::EscapedSlash => "escaped_slash",
            Self::BadEscape => "bad_escape",
            Self::NotOriginForm => "bad_path",
            Self::ControlCharacter => "control_character",
        }
    }
}

/// `path` (without the query) normalized under `opts`; borrowed when it is already normal.
pub fn normalize(path: &str, opts: Options) -> Result<Cow<'_, str>, Rejected> {
    if opts.normalization == Normalization::None {
        return Ok(Cow::Borrowed(path));
    }
    if path == "*" {
        return Ok(Cow::Borrowed(path));
    }
    if !path.starts_with('/') {
        return Err(Rejected::NotOriginForm);
    }
    let merge = opts.normalization != Normalization::Base;
    if is_normal(path.as_bytes(), merge) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path.as_bytes(), opts)?;
    let segments = remove_dots(&decoded, merge);
    // Every byte is either copied from a `str` or an ASCII byte we wrote, and multi-byte
    // sequences are never split (only ASCII bytes are looked at), so this cannot fail.
    Ok(Cow::Owned(
        String::from_utf8(segments).expect("normalization keeps UTF-8 intact"),
    ))
}

/// Whether `p` (starting with `/`) needs no change: no `%`, no `\`, no `.` or `..` segment,
/// and (when merging) no `//`.
fn is_normal(p: &[u8], merge: bool) -> bool {
    let mut prev_slash = false;
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'%' | b'\\' => return false,
            b'/' => {
                if merge && prev_slash {
                    return false;
                }
                prev_slash = true;
            }
            b'.' if prev_slash => {
                // `/.` or `/..` followed by `/` or the end is a dot segment.
                let rest = &p[i..];
                let dots = if rest.starts_with(b"..") { 2 } else { 1 };
                if rest.len() == dots || rest[dots] == b'/' {
                    return false;
                }
                prev_slash = false;
            }
            _ => prev_slash = false,
        }
        i += 1;
    }
    true
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Percent-decodes unreserved characters (and, by mode, slashes), upper-cases the hex of the
/// escapes kept, and reads `\` as `/`.
fn decode(p: &[u8], opts: Options) -> Result<Vec<u8>, Rejected> {
    let decode_slashes = opts.normalization == Normalization::DecodeAndMergeSlashes;
    let mut out = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    p.get(i + 1).copied().and_then(hex),
                    p.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(Rejected::BadEscape);
                };
                let b = hi << 4 | lo;
                if b == b'/' || b == b'\\' {
                    if decode_slashes {
                        out.push(b'/');
                    } else if opts.escaped_slashes == EscapedSlashes::Keep {
                        out.extend_from_slice(if b == b'/' { b"%2F" } else { b"%5C" });
                    } else {
                        return Err(Rejected::EscapedSlash);
                    }
                } else if is_unreserved(b) {
                    out.push(b);
                } else if b.is_ascii_control() {
                    // An encoded NUL or CR/LF is never a path an app should see decoded or not.
                    return Err(Rejected::ControlCharacter);
                } else {
                    out.push(b'%');
                    out.push(HEX_UPPER[usize::from(hi)]);
                    out.push(HEX_UPPER[usize::from(lo)]);
                }
                i += 3;
            }
            b'\\' => {
                out.push(b'/');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// RFC 3986 §5.2.4 over segments, never climbing above the root; with `merge`, empty segments
/// (from `//`) are dropped. `p` starts with `/`.
fn remove_dots(p: &[u8], merge: bool) -> Vec<u8> {
    let mut out: Vec<&[u8]> = Vec::new();
    let segments: Vec<&[u8]> = p[1..].split(|b| *b == b'/').collect();
    let last = segments.len() - 1;
    // A trailing dot segment (`/a/.` or `/a/..`) leaves a directory: `/a/` and `/`.
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            b"." => trailing_slash = i == last,
            b".." => {
                out.pop();
                trailing_slash = i == last;
            }
            b"" if merge && i != last => {}
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut res = Vec::with_capacity(p.len());
    for s in &out {
        res.push(b'/');
        res.extend_from_slice(s);
    }
    if trailing_slash || res.is_empty() {
        res.push(b'/');
    }
    // A kept empty last segment (`/a/`) already wrote its `/` above.
    res
}

#[cfg(test)]
mod tests;
