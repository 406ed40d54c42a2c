//! The human-readable spec diff in apply responses: a line diff of pretty-printed JSON, only
//! the changed lines, prefixed `- ` (previous) and `+ ` (new).

/// Above this many line pairs the diff stops looking for common lines and shows the whole old
/// spec removed and the whole new one added (keeps the table below a few MB).
const MAX_LCS_CELLS: usize = 1_000_000;

/// The diff from `previous` to `new` spec JSON (`None` = absent). Empty when both render the
/// same. Invalid JSON is diffed as it is.
pub fn spec_diff(previous: Option<&str>, new: Option<&str>) -> String {
    let old = previous.map(pretty).unwrap_or_default();
    let new = new.map(pretty).unwrap_or_default();
    let old: Vec<&str> = old.lines().collect();
    let new: Vec<&str> = new.lines().collect();
    let mut out = Vec::new();
    for (sign, line) in line_diff(&old, &new) {
        out.push(format!("{sign} {line}"));
    }
    out.join("\n")
}

fn pretty(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| json.to_owned())
}

/// The changed lines between `old` and `new` in order, as `('-', line)` / `('+', line)`
/// (removals first where both fit), by a longest-common-subsequence table over the lines.
fn line_diff<'a>(old: &[&'a str], new: &[&'a str]) -> Vec<(char, &'a str)> {
    // Common head and tail need no table.
    let head = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let (old, new) = (&old[head..], &new[head..]);
    let tail = old
        .iter()
        .rev()
        .zip(new.iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let (old, new) = (&old[..old.len() - tail], &new[..new.len() - tail]);
    let (n, m) = (old.len(), new.len());
    if n.saturating_mul(m) > MAX_LCS_CELLS {
        let removed = old.iter().map(|l| ('-', *l));
        return removed.chain(new.iter().map(|l| ('+', *l))).collect();
    }
    // lcs[i][j] = length of the LCS of old[i..] and new[j..].
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if old[i] == new[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < n || j < m {
        if i < n && j < m && old[i] == new[j] {
            (i, j) = (i + 1, j + 1);
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push(('-', old[i]));
            i += 1;
        } else {
            out.push(('+', new[j]));
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_diffs() {
        let cases: &[(&str, Option<&str>, Option<&str>, &str)] = &[
            ("unchanged", Some(r#"{"a":1}"#), Some(r#"{ "a": 1 }"#), ""),
            ("both absent", None, None, ""),
            (
                "created",
                None,
                Some(r#"{"a":1}"#),
                "+ {\n+   \"a\": 1\n+ }",
            ),
            (
                "deleted",
                Some(r#"{"a":1}"#),
                None,
                "- {\n-   \"a\": 1\n- }",
            ),
            (
                "one value changed",
                Some(r#"{"a":1,"b":2,"c":3}"#),
                Some(r#"{"a":1,"b":5,"c":3}"#),
                "-   \"b\": 2,\n+   \"b\": 5,",
            ),
            (
                "key added at the end changes the comma of the line before",
                Some(r#"{"a":1}"#),
                Some(r#"{"a":1,"b":2}"#),
                "-   \"a\": 1\n+   \"a\": 1,\n+   \"b\": 2",
            ),
            (
                "list item removed in the middle",
                Some(r#"{"l":["x","y","z"]}"#),
                Some(r#"{"l":["x","z"]}"#),
                "-     \"y\",",
            ),
            (
                "not json is diffed as text",
                Some("a b"),
                Some("a c"),
                "- a b\n+ a c",
            ),
        ];
        for (what, old, new, want) in cases {
            assert_eq!(spec_diff(*old, *new), *want, "{what}");
        }
    }

    #[test]
    fn line_diff_keeps_common_lines_out_and_order_in() {
        type Case<'a> = (&'a [&'a str], &'a [&'a str], &'a [(char, &'a str)]);
        let cases: &[Case<'_>] = &[
            (&["a", "b", "c"], &["a", "b", "c"], &[]),
            (
                &["a", "b", "c"],
                &["a", "x", "c"],
                &[('-', "b"), ('+', "x")],
            ),
            (&["a", "b"], &["b", "a"], &[('-', "a"), ('+', "a")]),
            (&[], &["a"], &[('+', "a")]),
            (&["a"], &[], &[('-', "a")]),
            (
                &["a", "b", "c", "d"],
                &["b", "c", "e"],
                &[('-', "a"), ('-', "d"), ('+', "e")],
            ),
        ];
        for (old, new, want) in cases {
            assert_eq!(line_diff(old, new), *want, "{old:?} -> {new:?}");
        }
    }

    #[test]
    fn huge_inputs_fall_back_to_replace_all() {
        let old: Vec<String> = (0..1500).map(|i| format!("o{i}")).collect();
        let new: Vec<String> = (0..1500).map(|i| format!("n{i}")).collect();
        let old: Vec<&str> = old.iter().map(String::as_str).collect();
        let new: Vec<&str> = new.iter().map(String::as_str).collect();
        let diff = line_diff(&old, &new);
        assert_eq!(diff.len(), 3000);
        assert_eq!((diff[0], diff[1500]), (('-', "o0"), ('+', "n0")));
    }
}
