//! `generate`: `n` sampled responses per prompt, batched, with the
//! log-probability of every token (the model's, at temperature 1).

use anyhow::Context;

use alignflow_ops::data::{read_jsonl, JsonlWriter};
use alignflow_ops::protocol::Metrics;
use alignflow_ops::text::{apply_template, Tokenizer};
use alignflow_ops::{GenerateParams, StageContext};

use crate::model::sample::{generate, Finish, SamplingConfig};
use crate::model::{self, BuildOptions, Head, Model};

pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let p: GenerateParams = ctx.params()?;
    let device = model::device(&ctx.spec.device)?;
    let model_dir = ctx.input("model")?;
    let tokenizer = Tokenizer::from_dir(model_dir)?;
    let model = Model::load(
        model_dir,
        &BuildOptions {
            device,
            head: Head::Lm,
            lora: None,
        },
    )?;
    let cfg = SamplingConfig {
        max_new_tokens: p.max_new_tokens,
        min_new_tokens: p.min_new_tokens,
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        eos_token_id: tokenizer
            .eos_id
            .map(i64::from)
            .or(model.lm.cfg.eos_token_id),
        pad_token_id: model.lm.cfg.pad_id(),
        seed: ctx.spec.seed,
    };
    let budget = (model.lm.cfg.max_positions - p.max_new_tokens).max(1) as usize;

    let path = ctx.input("prompts")?;
    // (the prompt field, the text fed to the model, its tokens)
    let mut prompts: Vec<(String, String, Vec<i64>)> = Vec::new();
    for (line, record) in read_jsonl::<serde_json::Value>(path)? {
        let record = record.map_err(|e| {
            anyhow::anyhow!("stage `{}`: {}:{line}: {e}", ctx.spec.stage, path.display())
        })?;
        let prompt = record[&p.prompt_field].as_str().with_context(|| {
            format!(
                "stage `{}`: {}:{line}: no string field `{}`",
                ctx.spec.stage,
                path.display(),
                p.prompt_field
            )
        })?;
        let text = apply_template(&p.template, prompt);
        let mut ids = tokenizer.encode(&text)?;
        // Over-long prompts keep their end, which the response continues.
        ids.drain(..ids.len().saturating_sub(budget));
        anyhow::ensure!(
            !ids.is_empty(),
            "stage `{}`: {}:{line}: empty prompt",
            ctx.spec.stage,
            path.display()
        );
        prompts.push((prompt.to_string(), text, ids));
    }
    // Rows: each prompt `n` times, in order.
    let rows: Vec<(usize, usize)> = (0..prompts.len())
        .flat_map(|i| (0..p.n).map(move |s| (i, s)))
        .collect();
    let mut out = JsonlWriter::create(&ctx.output("responses"))?;
    let start = std::time::Instant::now();
    let (mut new_tokens, mut eos_count) = (0usize, 0usize);
    for (done, chunk) in rows.chunks(p.batch_size.max(1)).enumerate() {
        ctx.cancel.check()?;
        let batch: Vec<Vec<i64>> = chunk.iter().map(|(i, _)| prompts[*i].2.clone()).collect();
        let stop = |_: usize, toks: &[i64]| -> bool {
            !p.stop.is_empty()
                && tokenizer
                    .decode(toks)
                    .is_ok_and(|t| p.stop.iter().any(|s| t.contains(s.as_str())))
        };
        // Each batch draws from its own stream of the stage's seed.
        let cfg = SamplingConfig {
            seed: ctx.spec.seed ^ (done as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ..cfg.clone()
        };
        let samples = generate(&model.lm, &batch, &cfg, device, stop);
        for ((i, s), sample) in chunk.iter().zip(samples) {
            let body: Vec<i64> = match sample.finish {
                Finish::Eos => sample.tokens[..sample.tokens.len() - 1].to_vec(),
                _ => sample.tokens.clone(),
            };
            let mut text = tokenizer.decode(&body)?;
            if let Some(cut) = p.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(cut);
            }
            new_tokens += sample.tokens.len();
            eos_count += usize::from(sample.finish == Finish::Eos);
            let finish = match sample.finish {
                Finish::Eos => "eos",
                Finish::Stop => "stop",
                Finish::Length => "length",
            };
            out.write(&serde_json::json!({
                "prompt": prompts[*i].0,
                "prompt_text": prompts[*i].1,
                "prompt_index": i,
                "sample_index": s,
                "response": text,
                "response_ids": sample.tokens,
                "logprob": sample.logprobs.iter().map(|&l| l as f64).sum::<f64>(),
                "token_logprobs": sample.logprobs,
                "finish": finish,
            }))?;
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
    m.insert("new_tokens".into(), new_tokens.into());
    m.insert(
        "eos_fraction".into(),
        serde_json::json!(eos_count as f64 / rows.len().max(1) as f64),
    );
    m.insert(
        "tokens_per_s".into(),
        serde_json::json!(new_tokens as f64 / secs.max(1e-9)),
    );
    Ok(m)
}
