//! What the docs and checked-in files say matches the code.
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn checked_in_schemas_are_up_to_date() {
    let schemas = root().join("schemas");
    for (name, text) in alignflow::schemas::schema_files() {
        let checked_in = std::fs::read_to_string(schemas.join(&name)).unwrap_or_default();
        assert!(
            checked_in == text,
            "schemas/{name} is stale: run `make schemas` and commit it"
        );
    }
}

/// Every registered op has a row in the README's op table (a row's first
/// cell names one op or several, each in backticks).
#[test]
fn the_readme_op_table_lists_every_op() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let table = readme
        .split("| op | step |")
        .nth(1)
        .expect("README has the op table");
    let first_cells: Vec<&str> = table
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.split('|').nth(1))
        .collect();
    for op in alignflow::ops::REGISTRY {
        let name = format!("`{}`", op.name);
        assert!(
            first_cells.iter().any(|cell| cell.contains(&name)),
            "README's op table has no row for {name}"
        );
    }
}
