//! The first conversation an op renders through a chat template, logged
//! (info) as the model sees it: the messages and the exact text. A user
//! checks a template's work in the run log; the end-to-end chat test
//! re-renders the logged messages with transformers and compares.

/// What precedes the JSON record in the log line.
pub const MARKER: &str = "rendered for the model: ";

/// Logs `{what, messages, text}` as one JSON line after [`MARKER`] (the
/// run log puts the stage's name before each of its lines).
pub(crate) fn log(what: &str, messages: &serde_json::Value, text: &str) {
    let record = serde_json::json!({"what": what, "messages": messages, "text": text});
    tracing::info!("{MARKER}{record}");
}
