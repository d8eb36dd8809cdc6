//! JSONL record types and the readers and writers the data ops share.
//!
//! Records are plain serde structs ([`Comparison`], [`PromptRecord`]); files
//! are read line by line with their 1-based line numbers so that every error
//! can point at `file:line`.

mod constitution;
mod jsonl;
mod records;

pub use constitution::{
    Constitution, ConstitutionError, CritiqueRevision, FeedbackPrinciple, FewShot,
};
pub use jsonl::{read_jsonl, read_lines, DataError, JsonlReader, JsonlWriter, LineError, RawLines};
pub use records::{Comparison, PromptRecord};

#[cfg(test)]
pub(crate) mod testing;
