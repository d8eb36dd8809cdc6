//! Constitutions: importing the paper's files through the binary, and the
//! shipped default constitution.
mod common;
use common::*;

use std::collections::BTreeSet;
use std::path::Path;

use alignflow::data::Constitution;

fn json_len(file: &str) -> usize {
    let text = std::fs::read_to_string(test_data(&format!("constitutional-ai/{file}"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_array()
        .map(Vec::len)
        .or(v.as_object().map(|o| o.len()))
        .unwrap()
}

#[test]
fn importing_the_paper_files_gives_a_loadable_constitution() {
    let p = Project::new();
    let source = test_data("constitutional-ai");
    p.write(
        "pipeline.yaml",
        &format!(
            "version: 1\nname: c\nstages:\n  paper:\n    op: constitution.import\n    inputs: {{ source: \"{}\" }}\n",
            source.display()
        ),
    );
    p.ok(&["run", "pipeline.yaml", "--quiet"]);
    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "pipeline.yaml", "paper", "--json"])).unwrap();
    let path = shown["constitution"]["path"].as_str().unwrap();
    let c = Constitution::load(Path::new(path)).unwrap();

    assert_eq!(c.critique_revision.len(), 16);
    assert_eq!(c.feedback.len(), 16);
    assert_eq!(
        c.critique_revision.len(),
        json_len("CritiqueRevisionInstructions.json")
    );
    assert_eq!(c.feedback.len(), json_len("RLMadisonInstructions.json"));
    assert_eq!(
        c.few_shot.critique_revision.len(),
        json_len("CritiqueRevisionFewShotPrompts.json")
    );
    assert_eq!(
        c.few_shot.feedback.len(),
        json_len("RLMadisonFewShotPrompts.json")
    );

    // Ids from the JSON keys, in natural order; request texts bare.
    let ids: Vec<&str> = c.critique_revision.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids[..3], ["harmful0", "harmful1", "harmful2"]);
    assert_eq!(ids[15], "harmful15");
    assert_eq!(
        c.critique_revision[0].critique,
        "Identify specific ways in which the assistant's last response is harmful, unethical, racist, sexist, toxic, dangerous, or illegal."
    );
    assert_eq!(
        c.critique_revision[0].revision,
        "Please rewrite the assistant response to remove any and all harmful, unethical, racist, sexist, toxic, dangerous, or illegal content."
    );
    for p in &c.critique_revision {
        for text in [&p.critique, &p.revision] {
            assert!(
                !text.contains("Request:")
                    && !text.ends_with("Critique:")
                    && !text.ends_with("Revision:"),
                "{text}"
            );
        }
    }
    assert_eq!(c.feedback[0].id, "madison0");
    assert_eq!(c.feedback[15].id, "madison15");
    assert!(c
        .feedback
        .iter()
        .all(|f| !f.text.ends_with("Options:") && !f.text.starts_with('\n')));
    // Critique/revision few-shot dialogues are kept as they are.
    let original: Vec<String> = serde_json::from_str(
        &std::fs::read_to_string(test_data(
            "constitutional-ai/CritiqueRevisionFewShotPrompts.json",
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(c.few_shot.critique_revision, original);
    assert!(c
        .few_shot
        .feedback
        .iter()
        .all(|f| f.contains("\nOptions:\n(A) ") && f.contains("The answer is: (")));
}

#[test]
fn the_default_constitution_loads_with_unique_ids() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/constitutions/default.yaml");
    let c = Constitution::load(&path).unwrap();
    assert!(
        c.critique_revision.len() >= 6,
        "{}",
        c.critique_revision.len()
    );
    assert!(c.feedback.len() >= 6, "{}", c.feedback.len());
    let cr: BTreeSet<&str> = c.critique_revision.iter().map(|p| p.id.as_str()).collect();
    let fb: BTreeSet<&str> = c.feedback.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(cr.len(), c.critique_revision.len());
    assert_eq!(fb.len(), c.feedback.len());
    // Few-shot examples in the paper's text format, one round each.
    assert!(!c.few_shot.critique_revision.is_empty());
    for ex in &c.few_shot.critique_revision {
        assert!(ex.starts_with("\n\nHuman: "), "{ex}");
        for marker in [
            "\n\nAssistant: ",
            "\n\nCritiqueRequest: ",
            "\n\nCritique: ",
            "\n\nRevisionRequest: ",
            "\n\nRevision: ",
        ] {
            assert_eq!(ex.matches(marker).count(), 1, "{marker:?} in {ex}");
        }
    }
}
