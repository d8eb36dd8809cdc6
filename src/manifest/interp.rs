//! `${...}` references inside manifest strings.
//!
//! `${params.NAME}` reads a pipeline param, `${stages.ID.OUTPUT}` names
//! another stage's output, `${matrix.NAME}` is the matrix instance's value
//! (substituted first, as text, so it may sit inside another reference:
//! `${stages.${matrix.method}.model}`), and in a loop's stages
//! `${loop.NAME}` a carried value and `${loop.round}` the round (also
//! substituted first, as text), `$${` writes a literal `${`.
//! Anything else inside `${...}` is an error, so a typo never reaches a
//! shell command.

use std::collections::BTreeMap;

/// One piece of a string: literal text or a reference.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Piece {
    Text(String),
    /// `${params.NAME}`
    Param(String),
    /// `${stages.REST}`: REST is `ID.OUTPUT`, split later against the stage ids.
    Stage(String),
}

/// Splits `s` into pieces. Errors name the offending reference.
pub(crate) fn parse(s: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        text.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(tail) = after.strip_prefix("$${") {
            text.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let Some(end) = tail.find('}') else {
                return Err(format!(
                    "unterminated `${{` in `{s}` (write `$${{` for a literal `${{`)"
                ));
            };
            let inner = &tail[..end];
            let piece = if let Some(name) = inner.strip_prefix("params.") {
                Piece::Param(name.to_string())
            } else if let Some(r) = inner.strip_prefix("stages.") {
                Piece::Stage(r.to_string())
            } else {
                return Err(format!(
                    "unknown reference `${{{inner}}}`: only `${{params.NAME}}`, `${{stages.ID.OUTPUT}}`, in a matrix stage `${{matrix.NAME}}` and in a loop's stage `${{loop.NAME}}` are allowed (write `$${{` for a literal `${{`)"
                ));
            };
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(piece);
            rest = &tail[end + 1..];
        } else {
            text.push('$');
            rest = &after[1..];
        }
    }
    text.push_str(rest);
    if !text.is_empty() || pieces.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

/// Opens a `${matrix.NAME}` reference.
pub(crate) const MATRIX: &str = "${matrix.";
/// Opens a `${loop.NAME}` reference.
pub(crate) const LOOP: &str = "${loop.";

/// The `${matrix.NAME}` references of `s`, in order (escapes skipped).
pub(crate) fn matrix_names(s: &str) -> Vec<String> {
    names(s, MATRIX)
}

/// The names of the references `s` makes that `open` opens, in order
/// (escapes skipped).
pub(crate) fn names(s: &str, open: &str) -> Vec<String> {
    let mut names = Vec::new();
    let _ = substitute_refs(s, open, |name| {
        names.push(name.to_string());
        Ok(String::new())
    });
    names
}

/// `s` with every `${matrix.NAME}` replaced by this instance's value
/// (rendered as YAML writes scalars). `$${` escapes are kept for [`parse`].
/// Errors: a name the matrix lacks (with the nearest one), or any
/// `${matrix.` in a stage without a matrix.
pub(crate) fn substitute_matrix(
    s: &str,
    matrix: &BTreeMap<String, serde_json::Value>,
) -> Result<String, (String, Option<String>)> {
    substitute_refs(s, MATRIX, |name| match matrix.get(name) {
        Some(v) => Ok(render(v)),
        None if matrix.is_empty() => Err((
            format!("`${{matrix.{name}}}` in a stage without a `matrix`"),
            None,
        )),
        None => {
            let keys = matrix.keys().map(String::as_str);
            let msg = format!(
                "unknown matrix key `{name}` in `${{matrix.{name}}}` (this stage's matrix has: {})",
                keys.clone().collect::<Vec<_>>().join(", ")
            );
            Err((msg, crate::ops::nearest(name, keys)))
        }
    })
}

/// Copies `s`, replacing each reference that `open` opens (`${matrix.`,
/// `${loop.`) with `value(NAME)`; `$${` escapes are kept for [`parse`].
pub(crate) fn substitute_refs(
    s: &str,
    open: &str,
    mut value: impl FnMut(&str) -> Result<String, (String, Option<String>)>,
) -> Result<String, (String, Option<String>)> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("$${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix(open) {
            let Some(end) = tail.find('}') else {
                return Err((format!("unterminated `{open}` in `{s}`"), None));
            };
            out.push_str(&value(&tail[..end])?);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// A value as text inside a longer string: scalars as YAML writes them.
pub(crate) fn render(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "null".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces() {
        assert_eq!(
            parse("echo $${HOME} $x").unwrap(),
            vec![Piece::Text("echo ${HOME} $x".into())]
        );
        assert_eq!(
            parse("a${params.lr}b").unwrap(),
            vec![
                Piece::Text("a".into()),
                Piece::Param("lr".into()),
                Piece::Text("b".into())
            ]
        );
        assert_eq!(
            parse("${stages.a[k=0.1].m}").unwrap(),
            vec![Piece::Stage("a[k=0.1].m".into())]
        );
        assert!(parse("${env.HOME}").unwrap_err().contains("`${env.HOME}`"));
        assert!(parse("x ${params.lr")
            .unwrap_err()
            .starts_with("unterminated"));
    }

    #[test]
    fn matrix_values_are_substituted_first_even_inside_references() {
        let m: BTreeMap<String, serde_json::Value> = [
            ("method".to_string(), serde_json::json!("dpo")),
            ("beta".to_string(), serde_json::json!(0.1)),
        ]
        .into();
        assert_eq!(
            substitute_matrix("${stages.${matrix.method}.model}", &m).unwrap(),
            "${stages.dpo.model}"
        );
        assert_eq!(
            substitute_matrix("b=${matrix.beta} $${matrix.beta} $x", &m).unwrap(),
            "b=0.1 $${matrix.beta} $x"
        );
        assert_eq!(
            matrix_names("${stages.${matrix.method}.m} ${matrix.beta} $${matrix.no}"),
            vec!["method", "beta"]
        );
        let (msg, suggestion) = substitute_matrix("${matrix.methd}", &m).unwrap_err();
        assert!(msg.contains("unknown matrix key `methd`"), "{msg}");
        assert_eq!(suggestion.as_deref(), Some("method"));
        let (msg, _) = substitute_matrix("${matrix.method}", &BTreeMap::new()).unwrap_err();
        assert!(msg.contains("without a `matrix`"), "{msg}");
        assert!(substitute_matrix("${matrix.method", &m)
            .unwrap_err()
            .0
            .starts_with("unterminated"));
    }
}
