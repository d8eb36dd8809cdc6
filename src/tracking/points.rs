//! A `metrics.jsonl` line as the scalars a tracker takes: the line's step
//! and each of its other finite numbers under its field name.

/// The counter fields a metrics line carries its step in, by preference
/// (`step` for the training loops, `iteration` for `ppo`).
const STEP_FIELDS: &[&str] = &["step", "iteration"];

/// One metrics line's scalars.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub step: i64,
    /// Field name and value, in the line's (sorted) field order.
    pub scalars: Vec<(String, f64)>,
}

/// The scalars of `line`, the `index`th line of its log (the step when the
/// line names none). `None` for a line that is not a JSON object: the
/// report shows those; a tracker has nothing to plot.
pub fn parse(line: &str, index: usize) -> Option<Point> {
    let serde_json::Value::Object(fields) = serde_json::from_str(line.trim()).ok()? else {
        return None;
    };
    let counter = STEP_FIELDS
        .iter()
        .find(|f| fields.get(**f).is_some_and(serde_json::Value::is_number));
    let step = counter
        .and_then(|f| fields[*f].as_f64())
        .map_or(index as i64, |s| s as i64);
    let scalars = fields
        .iter()
        .filter(|(name, _)| Some(&name.as_str()) != counter)
        .filter_map(|(name, value)| Some((name.clone(), value.as_f64()?)))
        .filter(|(_, v)| v.is_finite())
        .collect();
    Some(Point { step, scalars })
}

/// Every line of a finished log, in order.
pub fn parse_all(text: &str) -> Vec<Point> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| parse(line, i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_is_the_step_and_nulls_are_left_out() {
        let p = parse(r#"{"step": 3, "loss": 0.5, "kl": null, "note": "x"}"#, 7).unwrap();
        assert_eq!(p.step, 3);
        assert_eq!(p.scalars, vec![("loss".to_string(), 0.5)]);
        let p = parse(r#"{"iteration": 2, "score": 1.0}"#, 0).unwrap();
        assert_eq!((p.step, p.scalars.len()), (2, 1));
        assert_eq!(parse(r#"{"loss": 1}"#, 4).unwrap().step, 4);
        assert!(parse("not json", 0).is_none());
    }
}
