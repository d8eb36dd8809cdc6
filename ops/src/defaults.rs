//! Default values several ops' params share, for serde's
//! `#[serde(default = "crate::defaults::NAME")]`; one place, so the ops that
//! sample or read prompts start from the same settings.

pub fn yes() -> bool {
    true
}
pub fn one() -> usize {
    1
}
pub fn one_f64() -> f64 {
    1.0
}
/// Sampling temperature 1: the model's own distribution.
pub fn temperature() -> f64 {
    1.0
}
/// Nucleus sampling off.
pub fn top_p() -> f64 {
    1.0
}
pub fn batch_size() -> usize {
    8
}
pub fn prompt_field() -> String {
    "prompt".into()
}
/// The prompt as it is, with no template text around it.
pub fn prompt_template() -> String {
    "{prompt}".into()
}
pub fn max_new_tokens() -> i64 {
    64
}
/// Longest training sequence in tokens.
pub fn max_len() -> i64 {
    256
}
