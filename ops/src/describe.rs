//! `alignflow ops NAME`, generated from the same params structs that
//! validate manifests.

use std::fmt::Write as _;

use serde_json::Value;

use crate::{find, REGISTRY};

/// A readable description of op `name`: inputs, outputs, params with types,
/// defaults and docs.
pub fn describe(name: &str) -> anyhow::Result<String> {
    let op = find(name).ok_or_else(|| {
        let hint = crate::nearest(name, REGISTRY.iter().map(|o| o.name))
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_default();
        anyhow::anyhow!("unknown op `{name}`{hint}")
    })?;
    let mut out = String::new();
    let place = op.placement.label();
    let _ = writeln!(
        out,
        "{} (version {}, runs in the {place})\n  {}\n",
        op.name, op.version, op.summary
    );
    out.push_str("inputs:\n");
    if op.inputs.is_empty() {
        out.push_str(if op.outputs_from_stage() {
            "  any names; each path is in $ALIGNFLOW_IN_<NAME>\n"
        } else {
            "  (none)\n"
        });
    }
    for port in op.inputs {
        let req = if port.required {
            "required"
        } else {
            "optional"
        };
        let _ = writeln!(out, "  {:<14} {req:<9} {}", port.name, port.doc);
    }
    out.push_str("outputs:\n");
    if op.outputs_from_stage() {
        out.push_str("  declared by the stage's `outputs:` list\n");
    }
    for port in op.declared_outputs() {
        let _ = writeln!(out, "  {:<14} {}", port.name, port.doc);
    }
    out.push_str("params:\n");
    let schema = serde_json::to_value((op.params.schema)())?;
    let empty = serde_json::Map::new();
    let props = schema
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if props.is_empty() {
        out.push_str("  (none)\n");
    }
    // Named types (enums, nested structs) live here; users see their values.
    let defs = schema
        .get("$defs")
        .or_else(|| schema.get("definitions"))
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let mut rows = Vec::new();
    for (pname, p) in props {
        let ty = type_name(p, defs);
        let default = match p.get("default") {
            Some(d) => format!("default {d}"),
            None if required.contains(&pname.as_str()) => "required".into(),
            None => "optional".into(),
        };
        let doc = p
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("")
            .replace('\n', " ");
        rows.push([pname.clone(), ty, default, doc]);
    }
    // Columns as wide as their longest entry, so the docs line up; a
    // struct's long list of fields overflows its own row instead.
    let width = |c: usize, cap: usize| {
        let widest = rows.iter().map(|r| r[c].chars().count()).max();
        widest.unwrap_or(0).min(cap)
    };
    let (wn, wt, wd) = (width(0, usize::MAX), width(1, 32), width(2, 22));
    for [pname, ty, default, doc] in &rows {
        let _ = writeln!(out, "  {pname:<wn$} {ty:<wt$} {default:<wd$} {doc}");
    }
    if !op.conventions.is_empty() {
        out.push_str("conventions:\n");
        for line in op.conventions {
            let _ = writeln!(out, "  {line}");
        }
    }
    Ok(out)
}

/// A short type name for a property schema: an enum's allowed values, a
/// struct's fields in braces, never a Rust type name.
fn type_name(p: &Value, defs: &serde_json::Map<String, Value>) -> String {
    if let Some(values) = p.get("enum").and_then(Value::as_array) {
        return values
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect::<Vec<_>>()
            .join("|");
    }
    if let Some(r) = p.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or(r);
        return match defs.get(name) {
            Some(def) => type_name(def, defs),
            None => name.to_string(),
        };
    }
    if let Some(fields) = p.get("properties").and_then(Value::as_object) {
        let names: Vec<&str> = fields.keys().map(String::as_str).collect();
        return format!("{{{}}}", names.join(", "));
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(options) = p.get(key).and_then(Value::as_array) {
            return options
                .iter()
                .map(|o| type_name(o, defs))
                .filter(|t| t != "null")
                .collect::<Vec<_>>()
                .join("|");
        }
    }
    if let Some(c) = p.get("const") {
        return c
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| c.to_string());
    }
    match p.get("type") {
        Some(Value::String(t)) if t == "array" => {
            format!(
                "list of {}",
                p.get("items")
                    .map(|i| type_name(i, defs))
                    .unwrap_or_else(|| "any".into())
            )
        }
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join("|"),
        _ => "any".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Users see the values an enum takes and a struct's fields, never the
    /// Rust type behind them.
    #[test]
    fn enum_and_struct_params_show_their_values_not_rust_names() {
        let text = describe("ppo").unwrap();
        let line = |name: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no `{name}` line in\n{text}"))
                .to_string()
        };
        assert!(
            line("lr_schedule").contains("constant|linear"),
            "{}",
            line("lr_schedule")
        );
        assert!(
            line("advantage").contains("gae|grpo|rloo"),
            "{}",
            line("advantage")
        );
        assert!(
            line("kl_estimator").contains("k1|k2|k3"),
            "{}",
            line("kl_estimator")
        );
        assert!(
            line("lora").contains("{") && line("lora").contains("rank"),
            "{}",
            line("lora")
        );
        assert!(!text.contains("Ppo"), "a Rust type name leaked:\n{text}");
    }
}
