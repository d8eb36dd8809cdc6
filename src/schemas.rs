//! The checked-in JSON schemas (`schemas/`): the manifest's and each op's
//! params, and the profile file's, generated from the same serde types that
//! validate them.
use std::path::Path;

use serde_json::Value;

/// Every schema file and its content: `pipeline.schema.json`,
/// `config.schema.json` (`alignflow.config.yaml`), `profile.schema.json`
/// (site settings, `--profile`) and `ops/<op>.schema.json`.
pub fn schema_files() -> Vec<(String, String)> {
    let pretty = |v: &Value| serde_json::to_string_pretty(v).expect("schemas serialise") + "\n";
    let config = serde_json::to_value(schemars::schema_for!(crate::remote::Config))
        .expect("schemas serialise");
    let profile = serde_json::to_value(schemars::schema_for!(crate::engine::Profile))
        .expect("schemas serialise");
    let mut files = vec![
        (
            "pipeline.schema.json".to_string(),
            pretty(&crate::manifest::pipeline_schema()),
        ),
        ("config.schema.json".to_string(), pretty(&config)),
        ("profile.schema.json".to_string(), pretty(&profile)),
    ];
    for op in crate::ops::REGISTRY {
        let schema = serde_json::to_value((op.params.schema)()).expect("schemas serialise");
        files.push((format!("ops/{}.schema.json", op.name), pretty(&schema)));
    }
    files
}

/// Writes [`schema_files`] under `dir`.
pub fn write_schemas(dir: &Path) -> anyhow::Result<()> {
    for (name, text) in schema_files() {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        crate::cache::atomic_write(&path, text.as_bytes())?;
    }
    Ok(())
}
