//! `baseline_scores` moved to `crate::ops::baseline_scores` (it shares
//! nothing with `ppo` but the scoring in `crate::ops::scoring` and
//! `crate::ops::rollout`); this module stays empty until `ppo/mod.rs`
//! drops its `mod baseline_scores;`.
