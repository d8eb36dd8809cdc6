//! How the sampling ops draw: their [`SamplingConfig`], the seed of each
//! batch, stop strings, and the text of an answer.

use alignflow_ops::text::Tokenizer;
use alignflow_ops::DecodingParams;

use super::load::stop_ids;
use crate::model::sample::{Sample, SamplingConfig};
use crate::model::Model;

/// Mixes a batch index into the stage seed (the golden ratio's bits).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Sampling `max_new_tokens` at `temperature` from `model`, stopping at its
/// EOS and padding with its pad token; the rest (no top-k or top-p, no
/// minimum length, seed 0) at [`SamplingConfig::default`], for the op to
/// override.
pub(crate) fn sampling_config(
    tokenizer: &Tokenizer,
    model: &Model,
    max_new_tokens: i64,
    temperature: f64,
) -> SamplingConfig {
    SamplingConfig {
        max_new_tokens,
        temperature,
        eos_token_ids: stop_ids(tokenizer, model),
        pad_token_id: model.lm.cfg.pad_id(),
        ..Default::default()
    }
}

/// [`sampling_config`] with a stage's decoding params and `seed`.
pub(crate) fn decoding_config(
    tokenizer: &Tokenizer,
    model: &Model,
    d: &DecodingParams,
    seed: u64,
) -> SamplingConfig {
    SamplingConfig {
        top_k: d.top_k,
        top_p: d.top_p,
        seed,
        ..sampling_config(tokenizer, model, d.max_new_tokens, d.temperature)
    }
}

/// The seed of batch `k` of a stage seeded with `seed`: each batch draws
/// from its own stream.
pub(crate) fn batch_seed(seed: u64, k: usize) -> u64 {
    seed ^ (k as u64).wrapping_mul(GOLDEN)
}

/// Whether `tokens` decode to a text holding one of `stops` (never with no
/// stop strings).
pub(crate) fn hits_stop(tokenizer: &Tokenizer, tokens: &[i64], stops: &[String]) -> bool {
    !stops.is_empty()
        && tokenizer
            .decode(tokens)
            .is_ok_and(|t| stops.iter().any(|s| t.contains(s.as_str())))
}

/// `text` cut before the earliest of `stops`.
pub(crate) fn cut_at_first_stop(text: &mut String, stops: &[String]) {
    if let Some(cut) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
        text.truncate(cut);
    }
}

/// The text of a sampled answer, without the EOS that ended it.
pub(crate) fn decode_answer(tokenizer: &Tokenizer, sample: &Sample) -> anyhow::Result<String> {
    tokenizer.decode(sample.without_eos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_stop_string_cuts_the_text() {
        let stops = ["END".to_string(), "STOP".to_string()];
        let mut text = "ab STOP cd END".to_string();
        cut_at_first_stop(&mut text, &stops);
        assert_eq!(text, "ab ");
        let mut none = "abc".to_string();
        cut_at_first_stop(&mut none, &stops);
        assert_eq!(none, "abc");
    }

    #[test]
    fn batch_zero_draws_with_the_stage_seed() {
        assert_eq!(batch_seed(42, 0), 42);
        assert_eq!(batch_seed(42, 1), 42 ^ GOLDEN);
    }
}
