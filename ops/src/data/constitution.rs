//! Constitutions: the principles that drive critique/revision (SL-CAI) and
//! AI feedback (RL-CAI), with optional few-shot examples, each principle
//! under a stable id so trails and labels say which one was used.
//!
//! The YAML format (`pipelines/constitutions/*.yaml`):
//!
//! ```yaml
//! version: 1
//! name: alignflow-default
//! critique_revision:
//!   - id: harmful
//!     critique: Identify specific ways in which the assistant's last response is harmful.
//!     revision: Please rewrite the assistant response to remove any harmful content.
//! feedback:
//!   - id: less-harmful
//!     text: Which of these assistant responses is less harmful?
//! few_shot:
//!   critique_revision: ["\n\nHuman: ...\n\nAssistant: ...\n\nCritiqueRequest: ..."]
//!   feedback: ["Consider the following conversation ..."]
//! ```
//!
//! Request texts are stored bare; the ops add the paper's markers
//! (`CritiqueRequest:` ... `Critique:`, `RevisionRequest:` ... `Revision:`).

use std::collections::BTreeSet;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A constitution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Constitution {
    /// Format version; must be 1.
    pub version: u32,
    pub name: String,
    /// Critique/revision principle pairs.
    #[serde(default)]
    pub critique_revision: Vec<CritiqueRevision>,
    /// Principles for the multiple-choice feedback question.
    #[serde(default)]
    pub feedback: Vec<FeedbackPrinciple>,
    #[serde(default)]
    pub few_shot: FewShot,
}

/// One critique request and its matching revision request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CritiqueRevision {
    pub id: String,
    /// The critique request, without the `CritiqueRequest:` marker.
    pub critique: String,
    /// The revision request, without the `RevisionRequest:` marker.
    pub revision: String,
}

/// One feedback principle: the question put before the `(A)` / `(B)` options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedbackPrinciple {
    pub id: String,
    pub text: String,
}

/// Few-shot examples, as full texts in the paper's format, prepended to prompts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FewShot {
    #[serde(default)]
    pub critique_revision: Vec<String>,
    #[serde(default)]
    pub feedback: Vec<String>,
}

/// A constitution that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConstitutionError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Constitution {
    /// Reads and checks a YAML constitution.
    pub fn load(path: &Path) -> Result<Constitution, ConstitutionError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConstitutionError::Io {
            path: shown.clone(),
            source,
        })?;
        let c: Constitution =
            serde_yaml::from_str(&text).map_err(|e| ConstitutionError::Invalid {
                path: shown.clone(),
                message: e.to_string(),
            })?;
        c.check().map_err(|message| ConstitutionError::Invalid {
            path: shown,
            message,
        })?;
        Ok(c)
    }

    /// Version 1, non-empty texts, unique ids.
    pub fn check(&self) -> Result<(), String> {
        if self.version != 1 {
            return Err(format!(
                "version {} is not supported (expected 1)",
                self.version
            ));
        }
        let mut seen = BTreeSet::new();
        for p in &self.critique_revision {
            if p.id.is_empty() || p.critique.trim().is_empty() || p.revision.trim().is_empty() {
                return Err(format!(
                    "critique_revision `{}`: id, critique and revision must be non-empty",
                    p.id
                ));
            }
            if !seen.insert(format!("cr:{}", p.id)) {
                return Err(format!("critique_revision id `{}` appears twice", p.id));
            }
        }
        for p in &self.feedback {
            if p.id.is_empty() || p.text.trim().is_empty() {
                return Err(format!(
                    "feedback `{}`: id and text must be non-empty",
                    p.id
                ));
            }
            if !seen.insert(format!("fb:{}", p.id)) {
                return Err(format!("feedback id `{}` appears twice", p.id));
            }
        }
        Ok(())
    }
}
