//! How the sampling ops draw: their [`SamplingConfig`], the one call that
//! samples a stage's prompts, stop strings, and the text of an answer.

use alignflow_ops::text::Tokenizer;
use alignflow_ops::{DecodingParams, StageContext};

use super::load::stop_ids;
use crate::model::sample::{sample_requests, Request, Sample, Sampled, SamplingConfig};
use crate::model::{Model, Transformer};

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

/// Samples each of `prompts` `n` times through the continuous-batching
/// sampler: row `i * n + s` is sample `s` of prompt `i` (its random stream,
/// whatever the batch), `cfg.max_rows` rows decoding at once. Reports
/// progress as `label` and ends when the stage is cancelled.
pub(crate) fn sample_prompts(
    ctx: &StageContext<'_>,
    model: &Transformer,
    prompts: &[&[i64]],
    n: usize,
    cfg: &SamplingConfig,
    stop: impl FnMut(usize, &[i64]) -> bool,
    label: &str,
) -> anyhow::Result<Sampled> {
    let rows: Vec<Request<'_>> = prompts
        .iter()
        .enumerate()
        .flat_map(|(i, &prompt)| {
            (0..n).map(move |s| Request {
                prompt,
                prompt_index: i as u64,
                sample_index: s as u64,
            })
        })
        .collect();
    let total = rows.len() as u64;
    let device = model.embeddings().device();
    sample_requests(model, &rows, cfg, device, stop, |done| {
        ctx.reporter.progress(done as u64, Some(total), label);
        Ok(ctx.cancel.check()?)
    })
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
}
