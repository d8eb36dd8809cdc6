//! `${...}` references inside manifest strings.
//!
//! `${params.NAME}` reads a pipeline param, `${stages.ID.OUTPUT}` names
//! another stage's output, `$${` writes a literal `${`. Anything else
//! inside `${...}` is an error, so a typo never reaches a shell command.

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
                    "unknown reference `${{{inner}}}`: only `${{params.NAME}}` and `${{stages.ID.OUTPUT}}` are allowed (write `$${{` for a literal `${{`)"
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
}
