//! `generate`: `n` sampled responses per prompt, batched, with the
//! log-probability of every token (the model's, at temperature 1).

use alignflow_ops::data::JsonlWriter;
use alignflow_ops::protocol::Metrics;
use alignflow_ops::text::Tokenizer;
use alignflow_ops::{GenerateParams, StageContext};

use super::load;
use super::prompts::{read_prompts, truncated, with_answer, Prompt, PromptSource};
use super::sampling::{batch_seed, cut_at_first_stop, decode_answer, decoding_config, hits_stop};
use crate::model;
use crate::model::sample::{generate, Finish, Sample, SamplingConfig};

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
    // Rows: each prompt `n` times, in order.
    let rows: Vec<(usize, usize)> = (0..prompts.len())
        .flat_map(|i| (0..p.n).map(move |s| (i, s)))
        .collect();
    let mut out = JsonlWriter::create(&ctx.output("responses"))?;
    let start = std::time::Instant::now();
    let mut counts = Counts::default();
    for (done, chunk) in rows.chunks(p.batch_size.max(1)).enumerate() {
        ctx.cancel.check()?;
        let batch: Vec<Vec<i64>> = chunk.iter().map(|(i, _)| prompts[*i].ids.clone()).collect();
        let stop = |_: usize, toks: &[i64]| hits_stop(&tokenizer, toks, &p.stop);
        // Each batch draws from its own stream of the stage's seed.
        let cfg = SamplingConfig {
            seed: batch_seed(ctx.spec.seed, done),
            ..cfg.clone()
        };
        let samples = generate(&model.lm, &batch, &cfg, device, stop);
        for (&(i, s), sample) in chunk.iter().zip(samples) {
            let record = response_record(&p, &tokenizer, &prompts[i], i, s, &sample)?;
            counts.new_tokens += sample.tokens.len();
            counts.eos += usize::from(sample.finish == Finish::Eos);
            out.write(&record)?;
        }
        ctx.reporter.progress(
            ((done + 1) * p.batch_size).min(rows.len()) as u64,
            Some(rows.len() as u64),
            "sampling",
        );
    }
    out.finish()?;
    let secs = start.elapsed().as_secs_f64();
    let mut m = Metrics::new();
    m.insert("responses".into(), rows.len().into());
    m.insert("truncated_prompts".into(), truncated(&prompts).into());
    m.insert("new_tokens".into(), counts.new_tokens.into());
    m.insert(
        "eos_fraction".into(),
        serde_json::json!(counts.eos as f64 / rows.len().max(1) as f64),
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
