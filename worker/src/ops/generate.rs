//! `generate`: `n` sampled responses per prompt, batched, with the
//! log-probability of every token (the model's, at temperature 1).

use alignflow_ops::data::JsonlWriter;
use alignflow_ops::protocol::Metrics;
use alignflow_ops::text::Tokenizer;
use alignflow_ops::{GenerateParams, StageContext};

use super::load;
use super::prompts::{read_prompts, truncated, with_answer, Prompt, PromptSource};
use super::sampling::{
    cut_at_first_stop, decode_answer, decoding_config, hits_stop, sample_prompts,
};
use crate::model;
use crate::model::sample::{Finish, Sample, SamplingConfig};

/// What was sampled, for the metrics.
#[derive(Default)]
struct Counts {
    new_tokens: usize,
    eos: usize,
}

pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let p: GenerateParams = ctx.params()?;
    let device = model::device(&ctx.spec.device)?;
    let (tokenizer, model) = load::language_model(ctx.input("model")?, device, p.dtype)?;
    let cfg = SamplingConfig {
        min_new_tokens: p.min_new_tokens,
        ..decoding_config(&tokenizer, &model, &p.decoding, ctx.spec.seed)
    };
    let source = PromptSource::new(
        ctx,
        &p.prompt,
        ctx.input("model")?,
        model.lm.cfg.max_positions,
        p.decoding.max_new_tokens,
    )?;
    let prompts = read_prompts(ctx, &source, &tokenizer)?;
    // Rows: each prompt `n` times, in order; `batch_size` of them decode at
    // once, a finished row's slot going to the next.
    let cfg = SamplingConfig {
        max_rows: p.batch_size.max(1),
        ..cfg
    };
    let ids: Vec<&[i64]> = prompts.iter().map(|q| q.ids.as_slice()).collect();
    let start = std::time::Instant::now();
    let stop = |_: usize, toks: &[i64]| hits_stop(&tokenizer, toks, &p.stop);
    let sampled = sample_prompts(ctx, &model.lm, &ids, p.n, &cfg, stop, "sampling")?;
    let secs = start.elapsed().as_secs_f64();
    let mut out = JsonlWriter::create(&ctx.output("responses"))?;
    let mut counts = Counts::default();
    for (row, sample) in sampled.samples.iter().enumerate() {
        let (i, s) = (row / p.n, row % p.n);
        out.write(&response_record(&p, &tokenizer, &prompts[i], i, s, sample)?)?;
        counts.new_tokens += sample.tokens.len();
        counts.eos += usize::from(sample.finish == Finish::Eos);
    }
    out.finish()?;
    let mut m = Metrics::new();
    m.insert("responses".into(), sampled.samples.len().into());
    m.insert("truncated_prompts".into(), truncated(&prompts).into());
    m.insert("new_tokens".into(), counts.new_tokens.into());
    m.insert("prefills".into(), sampled.stats.prefills.into());
    m.insert(
        "eos_fraction".into(),
        serde_json::json!(counts.eos as f64 / sampled.samples.len().max(1) as f64),
    );
    m.insert(
        "tokens_per_s".into(),
        serde_json::json!(counts.new_tokens as f64 / secs.max(1e-9)),
    );
    Ok(m)
}

/// The `responses` record of sample `s` of prompt `i`.
fn response_record(
    p: &GenerateParams,
    tokenizer: &Tokenizer,
    prompt: &Prompt,
    i: usize,
    s: usize,
    sample: &Sample,
) -> anyhow::Result<serde_json::Value> {
    let mut text = decode_answer(tokenizer, sample)?;
    cut_at_first_stop(&mut text, &p.stop);
    let finish = match sample.finish {
        Finish::Eos => "eos",
        Finish::Stop => "stop",
        Finish::Length => "length",
    };
    let mut record = serde_json::json!({
        "prompt": prompt.raw,
        "prompt_text": prompt.text,
        "prompt_index": i,
        "sample_index": s,
        "response": text,
        "response_ids": sample.tokens,
        "logprob": sample.logprobs.iter().map(|&l| l as f64).sum::<f64>(),
        "token_logprobs": sample.logprobs,
        "finish": finish,
    });
    if let Some(messages) = with_answer(prompt, &text) {
        record["messages"] = messages;
    }
    Ok(record)
}
